#!/usr/bin/env bash
# MaskFeat on a Cloud TPU VM pod slice: install on every worker, then run the same command
# on all of them. jax.distributed.initialize() finds the other workers by itself.
#
#   TPU=<tpu-name> ZONE=<zone> WORKDIR=gs://<bucket>/maskfeat/vit_l \
#   DATA_DIR=gs://<bucket>/tensorflow_datasets launch/tpu_pod.sh [--config.x=y ...]
#
# WORKDIR is one place every worker sees: a gs:// URL (written through gcsfs and Orbax's
# TensorStore, installed below with the package's [gcs] extra) or a GCS FUSE mount path.
#
# Things marked <LIKE_THIS> are placeholders: set them in the environment or edit the
# defaults below. Extra arguments are passed on to maskfeat_jax.main.
# Exit code 75 from main means a worker was preempted after saving: run this script again
# and it resumes from the latest checkpoint in WORKDIR.
set -euo pipefail

TPU="${TPU:?set TPU=<tpu-name>}"
ZONE="${ZONE:?set ZONE=<zone, e.g. us-central2-b>}"
PROJECT="${PROJECT:-}"                                 # empty: gcloud's default project
WORKDIR="${WORKDIR:?set WORKDIR=gs://<bucket>/maskfeat/<run-name>}"
DATA_DIR="${DATA_DIR:?set DATA_DIR=gs://<bucket>/tensorflow_datasets (TFDS array_record files)}"
CONFIG="${CONFIG:-configs/vit_in1k.py:L/16}"        # FILE[:ARG], e.g. configs/vit_in1k.py:L/16,ft
# Where the code comes from: "copy" ships this checkout (uncommitted edits included),
# otherwise a git URL, e.g. https://github.com/<org>/maskfeat_jax.git, cloned at GIT_REF.
SOURCE="${SOURCE:-copy}"
GIT_REF="${GIT_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-maskfeat_jax}"               # on each worker, relative to $HOME
CACHE_DIR="${CACHE_DIR:-\$HOME/jax_cache}"             # persistent compilation cache, on each worker's disk
INSTALL="${INSTALL:-1}"                                # 0: skip installation (already done)

gc=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE")
if [[ -n "$PROJECT" ]]; then where+=(--project "$PROJECT"); fi

if [[ "$INSTALL" == 1 ]]; then
  if [[ "$SOURCE" == copy ]]; then
    here="$(cd "$(dirname "$0")/.." && pwd)"
    tarball="$(mktemp -t maskfeat_jax.XXXXXX).tgz"
    tar -C "$here" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ -czf "$tarball" .
    "${gc[@]}" scp "$tarball" "$TPU:maskfeat_jax.tgz" --worker=all "${where[@]}"
    rm -f "$tarball"
    fetch="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/maskfeat_jax.tgz -C ~/$REMOTE_DIR"
  else
    fetch="rm -rf ~/$REMOTE_DIR && git clone --depth 1 --branch $GIT_REF $SOURCE ~/$REMOTE_DIR"
  fi
  # jax[tpu] pulls the matching libtpu from PyPI; the package pins jax to the tested range.
  "${gc[@]}" ssh "$TPU" --worker=all "${where[@]}" --command="set -e; $fetch; \
    python3 -m pip install -q -U 'jax[tpu]>=0.10,<0.11' && python3 -m pip install -q -e \"\$HOME/$REMOTE_DIR[gcs]\""
fi

# Quote each extra argument so it reaches main unchanged through the remote shell.
extra=""
for a in "$@"; do extra+=" $(printf '%q' "$a")"; done
# libtpu's flags for overlapping collectives with compute (each one explained in
# launch/xla_flags.sh), then your own LIBTPU_INIT_ARGS, which win where they repeat one.
source "$(dirname "$0")/xla_flags.sh"
tpu_args="$(printf '%q' "$(tpu_init_args)")"

# Every worker runs the same command. --distributed=True makes main call
# jax.distributed.initialize(), which reads the pod topology from the TPU metadata.
# The dataset location goes in TFDS_DATA_DIR, which tfds reads when config.input.data_dir
# is unset (see launch/README.md).
"${gc[@]}" ssh "$TPU" --worker=all "${where[@]}" --command="cd ~/$REMOTE_DIR && \
  TFDS_DATA_DIR=$DATA_DIR JAX_COMPILATION_CACHE_DIR=$CACHE_DIR LIBTPU_INIT_ARGS=$tpu_args \
  python3 -m maskfeat_jax.main --config=$CONFIG --workdir=$WORKDIR --distributed=True \
    $extra 2>&1 | tee -a ~/maskfeat_run.log; exit \${PIPESTATUS[0]}"
