#!/usr/bin/env bash
# MaskFeat on one host with all of its GPUs: a single process that drives every GPU
# (JAX's single-controller model). No jax.distributed is needed.
#
#   WORKDIR=/data/runs/vit_l DATA_DIR=/data/tensorflow_datasets launch/gpu_local.sh [--config.x=y ...]
#
# Extra arguments go to maskfeat_jax.main. Rerunning the same command resumes from the
# latest checkpoint in WORKDIR (exit code 75 = preempted after saving). Install first with
#   pip install -U 'jax[cuda12]>=0.10,<0.11' && pip install -e .      (cuda13 also exists)
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${CONFIG:-configs/vit_in1k.py:L/16}"        # FILE[:ARG], e.g. configs/vit_in1k.py:L/16,ft
WORKDIR="${WORKDIR:?set WORKDIR=<local dir, or a mounted bucket>}"
DATA_DIR="${DATA_DIR:?set DATA_DIR=<dir with the TFDS array_record files, e.g. /data/tensorflow_datasets>}"

# Which GPUs, e.g. CUDA_VISIBLE_DEVICES=0,1,2,3. Unset: all of them.
# Share of each GPU's memory that JAX preallocates (the default is 0.75). Raise it when
# nothing else runs on the GPUs. XLA_PYTHON_CLIENT_PREALLOCATE=false allocates on demand,
# which is slower and fragments, so use it only to measure real usage.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# XLA's GPU flag set: collectives overlapped with compute, cuBLAS matmuls, no CUDA graphs, no
# automatic rematerialisation (each flag explained in launch/xla_flags.sh). Your own XLA_FLAGS
# come after them and win where they repeat one.
source launch/xla_flags.sh
export XLA_FLAGS="$(gpu_xla_flags)"
# NCCL: WARN is quiet; INFO prints the chosen rings/transports (useful once, on a new machine).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Compiled programs are reused across restarts; a ViT-L step takes a minute or more to compile.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jax_compilation}"
# tfds reads the dataset from here when config.input.data_dir is unset.
export TFDS_DATA_DIR="$DATA_DIR"

# --distributed=False: one process drives all GPUs. Inside an srun step with several tasks,
# main would otherwise call jax.distributed.initialize(), and on SLURM that gives each
# process a single GPU.
exec python -m maskfeat_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=False \
  --config.input.worker_count="${WORKERS:-16}" "$@"
