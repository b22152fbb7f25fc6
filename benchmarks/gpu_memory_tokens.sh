#!/usr/bin/env bash
# Tokens/s of the memory models on a GPU, chunkwise against per-token paths (issue 6), in one call.
#
#   bash benchmarks/gpu_memory_tokens.sh                 # on the GPU machine, from the repository root
#   JAX_PLATFORMS=cpu MEMORY_TOKENS_TINY=1 bash benchmarks/gpu_memory_tokens.sh   # a quick check on a CPU
#
# Runs benchmarks/memory_primitive.py (the recurrence alone), memory_tokens.py --level memory (the
# memory layers alone) and memory_tokens.py on every model at lengths 256 1024 4096 16384, batch 16, into
# memory_primitive_gpu.json, memory_tokens_gpu_memory.json and
# ${OUT:-benchmarks/results}/memory_tokens_gpu.json (saved after every cell, so a killed run keeps what
# it measured). Nothing is installed or downloaded: the repository is put on PYTHONPATH and the machine's
# own python (${PYTHON:-python3}) must already import jax (with CUDA), flax, optax and jaxtyping; the
# script says which is missing otherwise. A total cap (MEMORY_TOKENS_TOTAL_CAP, default 240 s) skips the
# cells that would start later, and a per-cell cap (30 s of timing per path) skips slow per-token cells,
# so the whole call stays under ~8 minutes (compile time of the last cell comes on top of the cap).
# Extra arguments go to memory_tokens.py, e.g. `--models linear_attention deltanet --chunk 64`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-python3}"
out_dir="${OUT:-$root/benchmarks/results}"
mkdir -p "$out_dir"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # share the card politely; the models are small

"$py" - <<'EOF'
import importlib, os, sys
missing = [m for m in ("jax", "flax", "optax", "jaxtyping") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_memory_tokens.sh: {sys.executable} cannot import {missing}; install them first "
             "(this script downloads nothing)")
import jax
backend = jax.default_backend()
wanted_cpu = os.environ.get("JAX_PLATFORMS", "") == "cpu"
if backend not in ("gpu", "cuda", "rocm") and not wanted_cpu:
    sys.exit(f"gpu_memory_tokens.sh: jax sees no GPU (backend {backend!r}, devices {jax.devices()}); "
             "set JAX_PLATFORMS=cpu to run it on the CPU on purpose")
print(f"jax {jax.__version__} on {jax.devices()}")
EOF

if [[ "${MEMORY_TOKENS_TINY:-0}" == "1" ]]; then  # a quick end-to-end check of the script itself
  settings=(--models linear_attention deltanet transformer --lengths 32 64 --batch 2 --reps 1
            --d-model 16 --vocab 32 --cell-cap 30 --total-cap "${MEMORY_TOKENS_TOTAL_CAP:-120}")
else
  settings=(--lengths 256 1024 4096 16384 --batch 16 --reps 5 --cell-cap 30 --order model
            --total-cap "${MEMORY_TOKENS_TOTAL_CAP:-240}")
fi

status=0
# the memory recurrence alone, then the memory layers alone (the floor's cells; a minute or two each),
# then every whole model
if [[ "${MEMORY_TOKENS_TINY:-0}" != "1" ]]; then
  "$py" "$here/memory_primitive.py" --lengths 1024 4096 16384 --chunks 64 --sequences 32 --reps 5 \
    --out "$out_dir/memory_primitive_gpu.json" || true
  "$py" "$here/memory_tokens.py" --level memory --models linear_attention deltanet --lengths 1024 4096 16384 \
    --batch 16 --reps 5 --cell-cap 20 --total-cap 100 --out "$out_dir/memory_tokens_gpu_memory.json" || true
fi
"$py" "$here/memory_tokens.py" "${settings[@]}" --out "$out_dir/memory_tokens_gpu.json" "$@" || status=$?
case $status in
  0) echo "gpu_memory_tokens.sh: done, $out_dir/memory_tokens_gpu.json" ;;
  1) echo "gpu_memory_tokens.sh: results written, but the 5x chunk/token floor at 1024 FAILED (see above)" ;;
  2) echo "gpu_memory_tokens.sh: results written, but the 5x floor could not be measured (cells skipped)" ;;
  *) echo "gpu_memory_tokens.sh: the benchmark failed with status $status" ;;
esac
exit $status
