#!/bin/bash
# What "done means current" (issue 13 item 2) costs: `status --json` and a filter rerun that
# finds every shard done, on a run of 1,280 shards with fuse and filter done, code of BASE
# (the baseline checkout) against code of NEW, alternating, median of 5 each: wall seconds,
# and CPU seconds (user+sys, steadier on a loaded machine).
#   bash bench/stale_overhead.sh BASE_CHECKOUT NEW_CHECKOUT [WORKDIR]
set -e
BASE=$1; NEW=$2; W=${3:-/tmp/capsfus-stale-bench}
P=${PYTHON:-$NEW/.venv/bin/python}; [ -x "$P" ] || P=/work/main/.venv/bin/python
export OMP_NUM_THREADS=1
if [ ! -f "$W/run/filter/config.json" ]; then
  mkdir -p "$W"
  PYTHONPATH=$NEW $P -c "
import sys; sys.path.insert(0, '$NEW/tests')
from pathlib import Path; from runhelp import write_rows
write_rows(Path('$W/rows.jsonl'), 2560)"
  PYTHONPATH=$NEW $P -m capsfus.cli shard "$W/rows.jsonl" --out "$W/run" --rows-per-shard 2 >/dev/null
  PYTHONPATH=$NEW $P -m capsfus.cli fuse "$W/run" --engine echo >/dev/null
  PYTHONPATH=$NEW $P -m capsfus.cli filter "$W/run" >/dev/null
fi
for what in status filter; do
  for code in "$BASE" "$NEW"; do
    ts=(); cs=()
    for i in 1 2 3 4 5; do
      if [ $what = status ]; then args=(status "$W/run" --json); else args=(filter "$W/run"); fi
      out=$(PYTHONPATH=$code /usr/bin/time -f "%e %U %S" $P -m capsfus.cli "${args[@]}" 2>&1 \
            >/dev/null | tail -1)
      read -r e u sy <<<"$out"; ts+=("$e"); cs+=("$(echo "$u + $sy" | bc)")
    done
    med() { printf '%s\n' "$@" | sort -n | sed -n 3p; }
    echo "$what $code wall $(med "${ts[@]}")s cpu $(med "${cs[@]}")s (wall ${ts[*]}; cpu ${cs[*]})"
  done
done
