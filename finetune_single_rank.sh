#!/usr/bin/env bash
# LoRA fine-tuning of CogVideoX on one GPU: the command of the project's original README.
# Set MODEL_PATH, DATA_ROOT and OUTPUT_DIR in the environment (or edit the defaults); any flag given
# to this script is passed on and wins over the one below, e.g.
#   MODEL_PATH=/models/CogVideoX-5b bash finetune_single_rank.sh --use_8bit_adam --gradient_checkpointing
# finetune_multi_rank.sh runs this same command with ACCELERATE_CONFIG and LAUNCH_ARGS set.
# Paths (MODEL_PATH, DATA_ROOT, OUTPUT_DIR, flags) are taken from where you run it, as any command's are: the
# script stays in your directory and finds its own files beside it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

MODEL_PATH=${MODEL_PATH:-THUDM/CogVideoX-2b}
DATA_ROOT=${DATA_ROOT:-~/disney/}
OUTPUT_DIR=${OUTPUT_DIR:-cogvideox-lora-single-gpu}
CACHE_DIR=${CACHE_DIR:-~/.cache}

# Expandable segments let PyTorch grow memory blocks instead of fragmenting: fewer out-of-memory errors.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# An ACCELERATE_CONFIG that is not a file here is one of the script's own.
config=${ACCELERATE_CONFIG:-accelerate_config_machine_single.yaml}
[[ -f $config ]] || config=$here/$config

# Ctrl-C (or a SIGTERM to the whole group) is for the trainer alone, which checkpoints and stops: the launcher
# inherits them ignored (Python keeps an ignored SIGINT), so it waits for the trainer and this script returns
# only once the trainer is done. --quiet: a trainer's error is the last thing on screen, without the
# launcher's traceback; under several processes torch's agent reports anyway, and the trainer writes its
# message again after that report (cogvideox_lora/launcher.py).
trap '' INT TERM
# (torch's elastic agent, for several processes, installs its own handlers: it passes the signal on to the
# workers, which take it and the terminal's as one request, and waits up to 30 s for them before SIGKILL.)
# shellcheck disable=SC2086  # LAUNCH_ARGS is a list of flags
exec accelerate launch --quiet --config_file "$config" ${LAUNCH_ARGS:-} \
  "$here/train_cogvideox_lora.py" \
  --pretrained_model_name_or_path "$MODEL_PATH" \
  --cache_dir "$CACHE_DIR" \
  --enable_tiling \
  --enable_slicing \
  --instance_data_root "$DATA_ROOT" \
  --caption_column prompts.txt \
  --video_column videos.txt \
  --validation_prompt "Mickey with the captain and friends:::Mickey and the bear" \
  --validation_prompt_separator ::: \
  --num_validation_videos 1 \
  --validation_epochs 2 \
  --seed 3407 \
  --rank 128 \
  --lora_alpha 128 \
  --mixed_precision bf16 \
  --output_dir "$OUTPUT_DIR" \
  --height 480 \
  --width 720 \
  --fps 8 \
  --max_num_frames 49 \
  --skip_frames_start 0 \
  --skip_frames_end 0 \
  --train_batch_size 1 \
  --num_train_epochs 10 \
  --checkpointing_steps 500 \
  --gradient_accumulation_steps 1 \
  --learning_rate 1e-4 \
  --optimizer AdamW \
  --adam_beta1 0.9 \
  --adam_beta2 0.95 \
  "$@"
