#!/usr/bin/env bash
# Accelerator check: one command, under 7 minutes on one GPU (or a TPU VM), from a source checkout.
#
#   bash benchmarks/accelerator_check.sh                  # tables in ./accelerator_check_out/results.txt
#   OUT=/tmp/check bash benchmarks/accelerator_check.sh
#   SMOKE=1 bash benchmarks/accelerator_check.sh          # CPU-sized, about a minute (the tests)
#
# Each part of benchmarks/accelerator_check.py runs in its own process under its own time limit
# (their sum is 6.5 minutes) and appends its table to $OUT/results.txt; its log goes to
# $OUT/<part>.log. A part stopped by its limit keeps the rows it finished, and the results say so.
# It needs jax, flax, optax, einops and numpy; not grain, ml_collections or tensorflow_datasets.
# WHEELS=<dir of wheel files>: install ml_collections from there first if it is missing (it is
# optional: without it the script uses a stand-in config). PYTHON: the interpreter to use.
# Exit code 1 when a part failed or was stopped by its limit, or the correctness check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-./accelerator_check_out}"
mkdir -p "$OUT"
results="$OUT/results.txt"
: > "$results"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
status=0

# As in the launch scripts, so that the step runs as in training: XLA's flags (launch/xla_flags.sh)
# and the share of GPU memory JAX takes.
source launch/xla_flags.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
if [[ -e /dev/nvidiactl ]] || command -v nvidia-smi > /dev/null; then
  export XLA_FLAGS="$(gpu_xla_flags)"
fi
export LIBTPU_INIT_ARGS="$(tpu_init_args)"      # read by libtpu only

if [[ -n "${WHEELS:-}" ]] && ! "$PYTHON" -c 'import ml_collections' 2> /dev/null; then
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" ml_collections \
    || echo "ml_collections could not be installed from $WHEELS: using the stand-in config" | tee -a "$results"
fi

smoke=()
variants=(B/16 L/16)
if [[ -n "${SMOKE:-}" ]]; then smoke=(--smoke); variants=(mu/16); fi

# part NAME SECONDS [ARGS...]: one part under its time limit.
part() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT/${name}${1:+_${2//\//}}.log"
  timeout -k 10 "$limit" "$PYTHON" -u benchmarks/accelerator_check.py --part "$name" "${smoke[@]}" "$@" \
    2> "$log" | tee -a "$results"
  local rc=${PIPESTATUS[0]}
  if [[ $rc != 0 ]]; then status=1; fi
  if [[ $rc == 124 || $rc == 137 ]]; then
    echo "($name${*:+ $*}: stopped by its ${limit} s limit; the rows above are complete)" | tee -a "$results"
  elif [[ $rc != 0 ]]; then
    echo "($name${*:+ $*}: failed with exit code $rc: $(grep -v '^\s*$' "$log" | tail -n 1))" | tee -a "$results"
  fi
}

start=$SECONDS
part versions 20
part matmul 35
part attention 60
for v in "${variants[@]}"; do part steps 100 --variant "$v"; done
part correctness 75
echo "
accelerator check done in $((SECONDS - start)) s: $results" | tee -a "$results"
exit $status
