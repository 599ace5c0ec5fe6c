#!/bin/bash
# What the write tokens and the highest-epoch fencing check cost: `capsfus fuse --engine echo`
# on 20,000 rows, with this checkout and with a baseline checkout, alternating, 3 runs each.
#   bash bench/fencing_overhead.sh BASELINE_SRC [PYTHON]
# e.g. BASELINE_SRC from `git archive 78df3ef | tar -x -C /tmp/base`.
# Layouts: 1 shard, chunks of 50 (400 commits); 400 shards of 50 rows, chunks of 10 (2,000
# commits, 400 lease takes, a leases folder of ~800 entries listed by every fencing check).
set -e
BASE=${1:?baseline source folder}
PY=${2:-python}
NEW=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d)
cd "$W"
PYTHONPATH=$NEW $PY -c "
import sys; sys.path.insert(0, '$NEW/tests')
from runhelp import write_rows; from pathlib import Path
write_rows(Path('in.jsonl'), 20000)"
for layout in "1shard 20000 50" "400shards 50 10"; do
  set -- $layout
  for rep in 1 2 3; do
    for code in baseline new; do
      src=$NEW; [ $code = baseline ] && src=$BASE
      rm -rf run
      PYTHONPATH=$src $PY -m capsfus.cli shard in.jsonl --out run --rows-per-shard "$2" >/dev/null 2>&1
      /usr/bin/time -f "$1 $code rep$rep wall %e user %U sys %S" env PYTHONPATH="$src" \
        OMP_NUM_THREADS=1 $PY -m capsfus.cli fuse run --engine echo --chunk-size "$3" \
        >/dev/null 2>"$W/err" || { tail -5 "$W/err"; exit 1; }
      tail -1 "$W/err"
    done
  done
done
rm -rf "$W"
