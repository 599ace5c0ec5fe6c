#!/bin/bash
# What fencing costs the teacher (a lease check before every attempt, states and outputs
# through the lease tokens, each shard's journal replaced when it is opened, the run lease):
# `capsfus teacher` on 2,000 rows against the local OpenAI-compatible test server (no added
# latency, so the client's own work is what is measured), with this checkout and with a
# baseline checkout, alternating, 3 runs each.
#   bash bench/teacher_fencing_overhead.sh BASELINE_SRC [PYTHON]
# e.g. BASELINE_SRC from `git archive ef2018e | tar -x -C /tmp/base`.
# Layouts: 1 shard of 2,000 rows; 400 shards of 5 rows (400 shard leases and journals, a
# leases folder of ~800 entries listed by every check).
set -e
BASE=${1:?baseline source folder}
PY=${2:-python}
NEW=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d)
cd "$W"
PYTHONPATH=$NEW $PY -c "
import sys; sys.path.insert(0, '$NEW/tests')
from runhelp import write_rows; from pathlib import Path
write_rows(Path('in.jsonl'), 2000)"
$PY "$NEW/tests/openai_server.py" --port 0 --key sk-bench >srv.out 2>srv.err &
SRV=$!
trap 'kill $SRV 2>/dev/null; rm -rf "$W"' EXIT
until grep -q READY srv.out; do sleep 0.1; done
URL="http://127.0.0.1:$(awk '/READY/{print $2}' srv.out)/v1"
for layout in "1shard 2000" "400shards 5"; do
  set -- $layout
  for rep in 1 2 3; do
    for code in baseline new; do
      src=$NEW; [ $code = baseline ] && src=$BASE
      rm -rf run
      PYTHONPATH=$src $PY -m capsfus.cli shard in.jsonl --out run --rows-per-shard "$2" >/dev/null 2>&1
      /usr/bin/time -f "$1 $code rep$rep wall %e user %U sys %S" env PYTHONPATH="$src" \
        OMP_NUM_THREADS=1 OPENAI_API_KEY=sk-bench $PY -m capsfus.cli teacher run \
        --endpoint "$URL" --model gpt-3.5-turbo --concurrency 16 >/dev/null 2>"$W/err" \
        || { tail -5 "$W/err"; exit 1; }
      tail -1 "$W/err"
    done
  done
done
