#!/usr/bin/env bash
# One part of the FlashAttention-4 and offloading measurements on the nvidia-h200 machine, within $BUDGET
# seconds (the device tool's calls last 10 minutes at most). Every bench_train.py row runs on its own, so a
# failing row costs only itself; the log and a JSON per row go to $OUT (rows.jsonl, log.txt).
#
#   PART=a OUT=/tmp/out bash benchmarks/h200_run.sh   # check: check_attention.py and the 2B profile
#                                                     # a: the 2B rows; b: the 5B rows; c, d: the 1.5 rows
#   PART="trace rows" ROWS="2b-flash4 5b-flash4" STEPS=5 ... # trace: the 2B step's idle time, without and with
#                                                     # checkpointing; rows: the rows named; parts run in turn
#   PART=ingraph POLICIES="full keep_attention" ...   # 2B and 5B with checkpointing, the checkpoint inside the
#                                                     # compiled blocks (the trainer) or around them (profile_step.py's around)
#   PART=fp8 [KERNEL=cudnn] ...                       # --fp8_compute linear against bf16: check_fp8.py's numerics and
#                                                     # speed (2B, 5B checkpointed), the 2B step's profile with it;
#                                                     # attention by FlashAttention-4 unless KERNEL=cudnn
#   PART=rows ROWS="2b-heldout 2b-heldout-fp8c" STEPS=300 BENCH_ARGS="--shape 49x240x368 -- --validation_loss_steps 50"
#                                                     # BENCH_ARGS: more bench_train.py arguments for every row
#   PART=compare REF=.old ROWS="2b-cudnn 2b-ckpt-cudnn" STEPS=6 ...   # the rows of this checkout and of a reference
#                                                     # one, alternately: a change that must leave speed and memory as
#                                                     # they were, against the code before it on one machine. Here first:
#                                                     # git archive COMMIT | tar -x -C .old --exclude=benchmarks/results
#                                                     # (.old/ is git-ignored: carry it)
#
# Before the first part, on the same machine: FlashAttention-4's CUDA-13 library unpacked into /tmp/fa4
# (../shared/device/fetch-fa4.sh prints that call); the wheels of .whl/ and .whl-fa4/ are installed here.
# The GPU machine cannot write mp4 clips (no imageio-ffmpeg): make them here first and carry bench_data/:
#   python -c "import sys; sys.path[:0] = ['.', 'benchmarks']; import bench_train; from pathlib import Path; \
#     [bench_train.write_data(Path('bench_data', 'data-' + 'x'.join(map(str, s))), *s) for s in \
#      [(49, 480, 720), (81, 768, 1360)]]"
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
export PYTHONPATH=$PWD:$PYTHONPATH
python3 -c 'import torch; print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())'
python3 -c 'import flash_attn.cute' 2>/dev/null && echo "FlashAttention-4 there" || echo "no FlashAttention-4"

# row NAME STEPS [CHECKOUT SIDE]: one bench_train.py row (of CHECKOUT's, its JSON marked with SIDE), given at most
# what is left of the budget. A checkout's bench_train.py puts its own folder first on the path, and the trainer
# runs from its folder, so each side runs its own code.
row() {
  local left=$((BUDGET - SECONDS)) dir=${3:-.} side=${4:-}
  if ((left < 60)); then echo "=== $side $1: skipped, ${left}s left"; return; fi
  echo "=== $side $1 ($2 steps): at most ${left}s"
  timeout --kill-after=15 "$left" python3 "$dir/benchmarks/bench_train.py" --workdir "$WORKDIR" --steps "$2" \
    --rows "$1" --out "$WORKDIR/row.json" ${BENCH_ARGS:-} && python3 -c "import json, sys; \
r = json.load(open(sys.argv[1])); side = {'side': sys.argv[2]} if sys.argv[2] else {}; \
print(json.dumps({**r['rows'][0], **side, 'environment': r['environment']}))" "$WORKDIR/row.json" "$side" \
    >> "$OUT/rows.jsonl"
  echo "=== $side $1: exit $? at ${SECONDS}s"
}

for part in ${PART:-a}; do case $part in
  rows)
    for r in $ROWS; do row $r "${STEPS:-4}"; done ;;
  compare)
    for r in $ROWS; do row $r "${STEPS:-6}" . this; row $r "${STEPS:-6}" "$REF" reference; done ;;
  trace)
    for policy in none full; do
      timeout $((BUDGET - SECONDS)) python3 benchmarks/profile_step.py --size 2b --variants flash4+compile \
        $([[ $policy == full ]] && echo --checkpointing full) --warmup 2 --steps 3 --ahead 6 --profile 0 \
        --trace "$OUT" > "$OUT/profile_2b_${policy}_idle.txt" 2>&1
      tail -12 "$OUT/profile_2b_${policy}_idle.txt"
    done ;;
  ingraph)
    for policy in ${POLICIES:-full}; do for size in 2b 5b; do
      timeout $((BUDGET - SECONDS)) python3 benchmarks/profile_step.py --size $size --checkpointing $policy \
        --variants flash4+compile,flash4+compile+around --warmup 2 --steps 4 --profile 0 \
        > "$OUT/ingraph_${size}_$policy.txt" 2>&1
      tail -5 "$OUT/ingraph_${size}_$policy.txt"
    done; done ;;
  fp8)
    kernel=${KERNEL:-flash4}
    timeout $((BUDGET - SECONDS)) python3 benchmarks/check_fp8.py --rows ${FP8_ROWS:-2b,5b-ckpt} \
      $([[ $kernel == flash4 ]] && echo --kernel flash4) --out "$OUT/check_fp8_$kernel.json"
    ((BUDGET - SECONDS < 60)) || timeout $((BUDGET - SECONDS)) python3 benchmarks/profile_step.py --size 2b \
      --variants $kernel+compile,$kernel+compile+fp8c --warmup 2 --steps 4 --profile 30 \
      > "$OUT/profile_2b_fp8c_$kernel.txt" 2>&1 && tail -80 "$OUT/profile_2b_fp8c_$kernel.txt" ;;
  check)
    timeout 200 python3 benchmarks/check_attention.py --out "$OUT/check_attention.json"
    timeout $((BUDGET - SECONDS)) python3 benchmarks/profile_step.py --size 2b --variants flash4+compile \
      --warmup 2 --steps 3 --profile 25 > "$OUT/profile_2b_flash4.txt" 2>&1 ;;
  a)
    for r in 2b-flash4 2b-cudnn 2b-ckpt-flash4 2b-ckpt-cudnn 2b-keep-flash4 2b-offload-8gb-flash4; do row $r 6; done ;;
  b)
    for r in 5b-fp8-offload-12gb-flash4 5b-ckpt-flash4 5b-offload-16gb-flash4 5b-ckpt-cudnn 2b-offload-8gb-flash4 \
             5b-keep-flash4 5b-flash4; do row $r 5; done ;;
  c)
    for r in 1.5-5b-ckpt-flash4 1.5-5b-fp8-offload-16gb-flash4; do row $r 4; done ;;
  d)
    for r in 1.5-5b-ckpt-cudnn 1.5-5b-i2v-fp8-offload-16gb-flash4; do row $r 4; done ;;
esac; done
echo "=== rows"
[[ -f "$OUT/rows.jsonl" ]] && python3 - "$OUT/rows.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    fmt = lambda key, spec=".2f": "—" if r.get(key) is None else format(r[key], spec)  # noqa: E731
    print(f"{r.get('side', ''):>9} {r['row']}: step {fmt('median_step_time_s', '.3f')} s, train peak "
          f"{fmt('peak_memory_allocated_gib')} GiB (on the card {fmt('peak_device_memory_gib')}), validation peak "
          f"{fmt('peak_memory_validation_gib')} (decode {fmt('peak_memory_decode_gib')}), estimate "
          f"{fmt('estimated_peak_gib')} (train {fmt('estimated_training_gib')}, validation "
          f"{fmt('estimated_validation_gib')}), launch to first step done {fmt('launch_to_first_step_s', '.1f')} s, "
          f"held-out {r.get('heldout_losses')}, {r['attention'][:40]}, {r['environment']['device']}")
PY
