#!/usr/bin/env bash
# The same bench_train.py rows for this checkout and for a reference checkout, alternately, in one device call:
# a change that must leave speed and memory as they were, measured against the code before it on one machine.
#
#   git archive COMMIT | tar -x -C .old --exclude=benchmarks/results   # here; .old/ is git-ignored, carried
#   REF=.old ROWS="2b-cudnn 2b-ckpt-cudnn" STEPS=6 OUT=$OUT bash benchmarks/compare_rows.sh   # on the GPU machine
#
# Needs the wheels of ../shared/device/fetch-wheels.sh (.whl/) and clips made where imageio-ffmpeg is
# (bench_data/, see h200_run.sh). Each row's JSON, with "side": "this" or "reference", goes to $OUT/rows.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
# Not the checkout on PYTHONPATH: each side's bench_train.py puts its own first, and the trainer runs from its folder.
source benchmarks/device_setup.sh
for row in $ROWS; do
  for side in this reference; do
    dir=$([[ $side == this ]] && echo . || echo "$REF")
    left=$((BUDGET - SECONDS))
    if ((left < 60)); then echo "=== $side $row: skipped, ${left}s left"; continue; fi
    echo "=== $side $row (${STEPS:-6} steps): at most ${left}s"
    timeout --kill-after=15 "$left" python3 "$dir/benchmarks/bench_train.py" --workdir "$WORKDIR" \
      --steps "${STEPS:-6}" --rows "$row" --out "$WORKDIR/row.json" && python3 -c "import json, sys; \
r = json.load(open(sys.argv[1])); print(json.dumps({**r['rows'][0], 'side': sys.argv[2], \
'environment': r['environment']}))" "$WORKDIR/row.json" "$side" >> "$OUT/rows.jsonl"
  done
done
echo "=== rows"
[[ -f "$OUT/rows.jsonl" ]] && python3 - "$OUT/rows.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['side']:>9} {r['row']}: step {r['median_step_time_s']:.3f} s, train peak "
          f"{r['peak_memory_allocated_gib']:.2f} GiB, to first step {r['seconds_to_first_step']:.1f} s, "
          f"{r['environment']['device']}")
PY
