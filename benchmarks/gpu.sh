#!/usr/bin/env bash
# The step benchmarks on one GPU: benchmarks/torch_step.py and benchmarks/jax_step.py at the
# reference sizes (MLP batch 1024, CNN 512, LSTM 256, transformer d 256 batch 64 and d 768
# batch 32, GPT-2 batch 32), fp32 and bf16, dp_torch beside Opacus and dp_jax beside optax
# contrib, in about 8 minutes.
#
# Usage:  benchmarks/gpu.sh OUTDIR            on a machine with a GPU and the checkout's venv
#         benchmarks/gpu.sh --dry-run OUTDIR  the same lines at --smoke sizes on the CPU
#
# Nothing is installed: the script uses $PYTHON (default: the checkout's .venv) and exits 0
# with a notice when that interpreter is missing. Each model runs in its own process under a
# time limit (the remaining share of an overall deadline), so one slow or hung model costs
# only its own row. OUTDIR receives environment.txt, torch_<model>.json / .log,
# jax_<model>.json / .log, and the combined tables torch_step.md and jax_step.md.
# GPU_SH_MODELS, GPU_SH_TORCH_MODES and GPU_SH_JAX_MODES override the model and mode lists.
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:?usage: benchmarks/gpu.sh [--dry-run] OUTDIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if ! [ -x "$PY" ]; then echo "gpu.sh: no Python at $PY (set PYTHON=...); skipping" >&2; exit 0; fi
mkdir -p "$OUT"
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

MODELS="${GPU_SH_MODELS:-mlp cnn lstm transformer transformer-768 gpt2}"
TORCH_MODES="${GPU_SH_TORCH_MODES:-nonprivate,dp_torch-hooks,dp_torch-ghost,opacus-hooks,opacus-ghost}"
JAX_MODES="${GPU_SH_JAX_MODES:-nonprivate,dp_jax,dp_jax-ghost,optax-contrib}"
TORCH_FLAGS=(--device cuda --steps 10 --warmup 2)
JAX_FLAGS=(--steps 10 --warmup 2 --mode-budget 4)
JAX_ENV=()
TORCH_LIMIT=40   # seconds per torch model
JAX_LIMIT=50     # seconds per JAX model (compiling is most of it)
DEADLINE=$((SECONDS + 470))
if [ "$DRY" = 1 ]; then
  TORCH_FLAGS=(--device cpu --smoke --threads 1 --no-memory)
  JAX_FLAGS=(--smoke)
  JAX_ENV=(JAX_PLATFORMS=cpu XLA_FLAGS=--xla_backend_optimization_level=0)
  TORCH_LIMIT=120
  JAX_LIMIT=240
  DEADLINE=$((SECONDS + 900))
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  dry-run: $DRY"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
             torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
  env "${JAX_ENV[@]}" "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/environment.txt"

# run NAME LIMIT COMMAND...: COMMAND under min(LIMIT, time left), stderr to OUT/NAME.log.
run() {
  local name="$1" limit="$2"; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 10 ]; then echo "$name: skipped (deadline reached)" | tee -a "$OUT/skipped.txt"; return; fi
  [ "$left" -lt "$limit" ] && limit="$left"
  echo "== $name (limit ${limit} s)"
  timeout -k 5 "$limit" "$@" >/dev/null 2>"$OUT/$name.log" \
    || echo "$name: exit $? (see $name.log)" | tee -a "$OUT/skipped.txt"
}

for model in $MODELS; do
  run "torch_$model" "$TORCH_LIMIT" "$PY" "$ROOT/benchmarks/torch_step.py" "${TORCH_FLAGS[@]}" \
    --bf16 --models "$model" --modes "$TORCH_MODES" --json "$OUT/torch_$model.json"
done
for model in $MODELS; do
  run "jax_$model" "$JAX_LIMIT" env "${JAX_ENV[@]}" "$PY" "$ROOT/benchmarks/jax_step.py" \
    "${JAX_FLAGS[@]}" --bf16 --models "$model" --modes "$JAX_MODES" --json "$OUT/jax_$model.json"
done

shopt -s nullglob
"$PY" "$ROOT/benchmarks/torch_step.py" --report "$OUT"/torch_*.json > "$OUT/torch_step.md"
env "${JAX_ENV[@]}" "$PY" "$ROOT/benchmarks/jax_step.py" --report "$OUT"/jax_*.json > "$OUT/jax_step.md"
echo "== torch (ours beside Opacus)"; cat "$OUT/torch_step.md"
echo "== JAX (ours beside optax contrib)"; cat "$OUT/jax_step.md"
echo "== total ${SECONDS} s; results in $OUT"
