#!/usr/bin/env bash
# README rows on the card they claim, on a big GPU (issue 27): each bench_train.py row runs under
# benchmarks/ballast.py, which takes all of the GPU but what such a card has free, while nvidia-smi samples the
# GPU's memory every 100 ms beside it. A row passes if it finishes under the ballast; its device peak is the most
# nvidia-smi saw less what it saw before the trainer started (the ballast), beside the trainer's own NVML figures
# (train_summary.json) and the plan's estimate; the host's too, as MemAvailable (/proc/meminfo, every 100 ms) fell.
# Every row runs on its own, so a failing row costs only itself.
#
#   ROWS="2b-auto-8gb-cudnn:7.5 5b-fp8-auto-12gb-cudnn:11.5 5b-auto-16gb-cudnn:15.5" OUT=$OUT \
#     bash benchmarks/card_rows.sh          # on the GPU machine; a row is NAME:GIB_LEFT_FREE
#
# Needs, carried: .whl/ (../shared/device/fetch-wheels.sh, and nvidia-ml-py for the trainer's NVML figures:
# pip download --no-deps nvidia-ml-py -d .whl) and bench_data/ (clips made where imageio-ffmpeg is, see
# h200_run.sh). Each row's JSON goes to $OUT/rows.jsonl, the nvidia-smi samples to $OUT/smi-ROW.csv. Rows left
# when $BUDGET seconds are near spent are skipped: a second call (same warm machine, same $WORKDIR) runs them on
# the model folders and latent cache of the first.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-570}
STEPS=${STEPS:-4}
GPU=${GPU:-0}
source benchmarks/device_setup.sh
export PYTHONPATH=$PWD:$PYTHONPATH
python3 -c 'import torch, pynvml; print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), "nvml ok")'

for spec in $ROWS; do
  row=${spec%%:*} leave=${spec#*:}
  left=$((BUDGET - SECONDS))
  if ((left < 90)); then echo "=== $row: skipped, ${left}s left"; continue; fi
  # The row's model folder and clips first, without a ballast: building them takes the GPU, and the process that
  # builds them holds its CUDA context until it ends.
  timeout $((left - 60)) python3 benchmarks/bench_train.py --workdir "$WORKDIR" --rows "$row" --build_only \
    || { echo "=== $row: its model folder could not be built"; continue; }
  left=$((BUDGET - SECONDS))
  echo "=== $row ($STEPS steps) under a ballast leaving $leave GiB free: at most ${left}s (built at ${SECONDS}s)"
  rm -f "$WORKDIR/ballast.ready" "$WORKDIR/row.json"
  python3 benchmarks/ballast.py --leave_gib "$leave" --ready "$WORKDIR/ballast.ready" &
  ballast=$!
  until [[ -s $WORKDIR/ballast.ready ]] || ! kill -0 $ballast 2>/dev/null; do sleep 0.5; done
  if [[ ! -s $WORKDIR/ballast.ready ]]; then echo "=== $row: the ballast did not start"; continue; fi
  nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/smi-$row.csv" &
  smi=$!
  while sleep 0.1; do awk '/^MemAvailable:/ {print $2}' /proc/meminfo; done > "$OUT/meminfo-$row.csv" &
  meminfo=$!
  sleep 1  # readings of the ballast alone, before the trainer
  timeout --kill-after=15 $((BUDGET - SECONDS - 15)) python3 benchmarks/bench_train.py --workdir "$WORKDIR" \
    --steps "$STEPS" --rows "$row" --out "$WORKDIR/row.json"
  status=$?
  kill $smi $meminfo $ballast 2>/dev/null
  wait $smi $meminfo $ballast 2>/dev/null
  python3 benchmarks/card_report.py row "$row" "$leave" "$status" "$OUT/smi-$row.csv" "$WORKDIR/row.json" \
    "$(cat "$WORKDIR/ballast.ready")" "$OUT/meminfo-$row.csv" >> "$OUT/rows.jsonl"
  echo "=== $row: exit $status at ${SECONDS}s"
done
echo "=== rows"
[[ ! -f "$OUT/rows.jsonl" ]] || python3 benchmarks/card_report.py summary "$OUT/rows.jsonl"
