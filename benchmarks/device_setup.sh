# Sourced by the scripts that run on the GPU machine (h200_run.sh, card_rows.sh): the output folder and its log,
# the clips made here (bench_data/), the carried wheels installed into /tmp/site, and the environment.
#   OUT (default out): logs and results; BUDGET (560): seconds the script may take; WORKDIR (/tmp/bench_work)
OUT=${OUT:-out}
BUDGET=${BUDGET:-560}
WORKDIR=${WORKDIR:-/tmp/bench_work}
mkdir -p "$OUT" "$WORKDIR"
exec > >(tee -a "$OUT/log.txt") 2>&1
# Clips made on a machine with imageio-ffmpeg (bench_train.py's write_data, carried as bench_data/).
[[ -d bench_data ]] && cp -rn bench_data/. "$WORKDIR"/
if [[ ! -f /tmp/site/.installed ]]; then
  # FlashAttention-4's wheels (.whl-fa4/) and its CUDA library (/tmp/fa4) where an earlier call brought them.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl $(ls .whl-fa4/*.whl 2>/dev/null) || exit 1
  [[ -d /tmp/fa4 ]] && cp -a /tmp/fa4/. /tmp/site/
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
# imageio without imageio-ffmpeg cannot write mp4; without imageio, diffusers writes them with OpenCV.
python3 -c 'import imageio_ffmpeg' 2>/dev/null || python3 -m pip uninstall -y -q imageio 2>/dev/null
nvidia-smi -L
