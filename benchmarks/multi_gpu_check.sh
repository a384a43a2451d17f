#!/usr/bin/env bash
# One call on a machine with 2 GPUs, within 9 minutes: CogVideoX-2B (random weights, 4 clips of
# 49x480x720) trained by the real trainer
#   1. on 1 GPU, then on 2 GPUs with the same batch per GPU, 12 steps each: step time, samples/s and
#      their scaling, peak memory of each GPU;
#   2. the 2-GPU run continued to 16 steps from its last checkpoint (--resume_from_checkpoint latest);
#      both 2-GPU runs end with validation videos of two prompts, one made on each GPU;
#   3. if deepspeed imports: DeepSpeed ZeRO-2 on 2 GPUs, 4 steps, then continued to 8.
# Each part is bench_train.py (which reads the trainer's train_summary.json) and gets its share of the
# time. The log and a JSON per part go to $OUT.
#
#   OUT=/tmp/out bash benchmarks/multi_gpu_check.sh
#   OUT=/tmp/out TINY=1 ACCELERATE_USE_CPU=1 PYTHON=.venv/bin/python WHEELS= bash benchmarks/multi_gpu_check.sh
#
# The wheels in the folders $WHEELS (default .whl .whl-ds: diffusers, decord, ...; deepspeed and its
# needs) are installed first, for a machine without an index. Clips come from $CLIPS (default
# bench_clips/, see bench_train.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
PYTHON=${PYTHON:-python3}
CLIPS=${CLIPS:-bench_clips}
WORKDIR=${WORKDIR:-/tmp/multi-gpu-check}
BUDGET=${BUDGET:-530}  # seconds for everything
mkdir -p "$OUT"
exec > >(tee "$OUT/multi_gpu_check.log") 2>&1

shopt -s nullglob
wheels=()
for folder in ${WHEELS-.whl .whl-ds}; do wheels+=("$folder"/*.whl); done
if ((${#wheels[@]})); then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export NCCL_NVLS_ENABLE=0
# imageio without imageio-ffmpeg cannot write mp4; without imageio, diffusers writes them with OpenCV.
"$PYTHON" -c 'import imageio_ffmpeg' 2>/dev/null || "$PYTHON" -m pip uninstall -y -q imageio
nvidia-smi -L 2>/dev/null
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "GPUs:", torch.cuda.device_count())'

# bench PART SECONDS FLAGS...: one call of bench_train.py, stopped (with its trainers) after SECONDS.
failed=0
bench() {
  local part=$1 limit=$2 started=$SECONDS status
  shift 2
  echo "=== $part: at most ${limit}s"
  timeout --kill-after=20 "$limit" "$PYTHON" benchmarks/bench_train.py --workdir "$WORKDIR" --clips "$CLIPS" \
    --out "$OUT/bench_$part.json" ${TINY:+--tiny} "$@"
  status=$?
  echo "=== $part: exit $status after $((SECONDS - started))s"
  ((status == 0)) || failed=1
}

# The first part builds the model folder and encodes the clips (cold cache); the others reuse both.
bench 1gpu $((BUDGET * 45 / 100)) --rows 2b --steps 12
bench 2gpu $((BUDGET * 85 / 100 - SECONDS)) --rows 2b-x2 --steps 12 --resume_steps 16 -- \
  --validation_prompt "a red square:::a brown bear" --validation_num_inference_steps 4
if "$PYTHON" -c 'import deepspeed' 2>/dev/null; then
  bench zero2 $((BUDGET - SECONDS)) --rows 2b-x2-zero2 --steps 4 --resume_steps 8
else
  echo "=== zero2: skipped, deepspeed does not import"
fi
summary=$(grep -E '^\| [0-9a-z]|resumed at step|Process [0-9]+ wrote|^=== [a-z0-9]+: (exit|skipped)' \
  "$OUT/multi_gpu_check.log")
echo "=== summary"
echo "$summary"
exit $failed
