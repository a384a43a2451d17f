#!/usr/bin/env bash
# LoRA fine-tuning of CogVideoX on several GPUs and nodes. Run it on every node:
#   bash finetune_multi_rank.sh MACHINE_RANK MAIN_PROCESS_IP NUM_MACHINES [training flags...]
# or set MACHINE_RANK, MAIN_PROCESS_IP and NUM_MACHINES (and MAIN_PROCESS_PORT, GPUS_PER_MACHINE) in the
# environment. Node 0 is the main node; all nodes need the same data, model and a shared --output_dir
# (and --latent_cache_dir) path. MODEL_PATH, DATA_ROOT and OUTPUT_DIR work as in finetune_single_rank.sh;
# ACCELERATE_CONFIG=accelerate_config_deepspeed_zero2.yaml trains with DeepSpeed ZeRO-2 instead of DDP.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

positional=()
while (($#)) && [[ $1 != -* ]]; do positional+=("$1"); shift; done
MACHINE_RANK=${positional[0]:-${MACHINE_RANK:-0}}
MAIN_PROCESS_IP=${positional[1]:-${MAIN_PROCESS_IP:-127.0.0.1}}
NUM_MACHINES=${positional[2]:-${NUM_MACHINES:-1}}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
GPUS_PER_MACHINE=${GPUS_PER_MACHINE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}

export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_config_machine_multi.yaml}
export OUTPUT_DIR=${OUTPUT_DIR:-cogvideox-lora-multi-gpu}
export LAUNCH_ARGS="--machine_rank $MACHINE_RANK --num_machines $NUM_MACHINES \
--num_processes $((NUM_MACHINES * GPUS_PER_MACHINE)) --main_process_ip $MAIN_PROCESS_IP \
--main_process_port $MAIN_PROCESS_PORT ${LAUNCH_ARGS:-}"
exec bash "$here/finetune_single_rank.sh" "$@"
