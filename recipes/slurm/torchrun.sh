#!/bin/bash
# Multi-GPU / multi-node pretraining with torchrun (no SLURM), e.g. on Kubernetes or plain hosts.
#
#   one node, 8 GPUs:  bash recipes/slurm/torchrun.sh recipes/imagenet/simclr.yaml
#   node r of N:       NNODES=N NODE_RANK=r MASTER_ADDR=host0 bash recipes/slurm/torchrun.sh RECIPE.yaml
#
# Lightning's TorchElasticEnvironment reads the variables torchrun sets. On SIGTERM every rank saves
# <root>/checkpoints/last.ckpt after its current step and exits 0; rerun the same command to resume.
set -euo pipefail
RECIPE=${1:?usage: torchrun.sh RECIPE.yaml [selfsup fit flags]}
shift
GPUS=${GPUS:-8}
NNODES=${NNODES:-1}
ROOT=${ROOT:-runs/torchrun-$(basename "$RECIPE" .yaml)}
export OMP_NUM_THREADS=1

torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m selfsup.cli fit --config "$RECIPE" \
    --trainer.accelerator gpu --trainer.devices "$GPUS" --trainer.num_nodes "$NNODES" \
    --trainer.strategy ddp --trainer.precision bf16-mixed \
    --trainer.default_root_dir "$ROOT" --ckpt_path last \
    "$@"
