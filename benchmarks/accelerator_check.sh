#!/usr/bin/env bash
# The accelerator check in one command, on a fresh GPU or TPU machine:
#
#   benchmarks/accelerator_check.sh [--wheels=DIR] [--out=DIR] [--budget_s=480] [--smoke]
#
# 1. Checks that JAX sees an accelerator (unless --smoke) and that the project's Python packages
#    import; installs the missing ones: from DIR with --wheels (an offline machine: make DIR
#    elsewhere with `pip download` of requirements.txt's pins for the machine's Python, see
#    benchmarks/NOTES.md) into a private folder on PYTHONPATH, else from PyPI at requirements.txt's
#    pinned versions. JAX itself is never installed here: it must match the machine's CUDA or TPU
#    runtime (pip install -U "jax[cuda12]" or "jax[tpu]").
# 2. Runs python -m benchmarks.accelerator_check with the other flags; it writes
#    OUT/accelerator_check.json and OUT/accelerator_check.md (default OUT: ./accelerator_check).
#
# PYTHON selects the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=""
ARGS=()
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --wheels=*) WHEELS="${arg#--wheels=}" ;;
    --smoke) SMOKE=1; ARGS+=("$arg") ;;
    *) ARGS+=("$arg") ;;
  esac
done

# import name -> requirements.txt name, for what the check imports (not TensorFlow: nothing here
# needs it).
MODULES="absl:absl-py flax:flax optax:optax orbax.checkpoint:orbax-checkpoint
ml_collections:ml_collections clu:clu grain:grain tensorflow_datasets:tensorflow-datasets
array_record:array_record cv2:opencv-python-headless rasterio:rasterio scipy:scipy
portpicker:portpicker"
missing=()
for pair in $MODULES; do
  if ! "$PYTHON" -c "import ${pair%%:*}" >/dev/null 2>&1; then missing+=("${pair#*:}"); fi
done
if ((${#missing[@]})); then
  echo "accelerator_check: installing ${missing[*]}" >&2
  if [[ -n "$WHEELS" ]]; then
    site="${TMPDIR:-/tmp}/cmmp_accel_site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
      "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    pins=()
    for name in "${missing[@]}"; do
      pins+=("$(grep -i "^${name}==" requirements.txt || echo "$name")")
    done
    "$PYTHON" -m pip install -q "${pins[@]}"
  fi
fi
if ! "$PYTHON" -c "import jax" >/dev/null 2>&1; then
  echo "accelerator_check: JAX is not installed: pip install -U 'jax[cuda12]' (or 'jax[tpu]')" >&2
  exit 2
fi
if ((!SMOKE)); then
  platform="$("$PYTHON" -c 'import jax; print(jax.default_backend())')"
  if [[ "$platform" == "cpu" ]]; then
    echo "accelerator_check: JAX sees no GPU or TPU (backend: cpu); install jax[cuda12] or" \
         "jax[tpu], or pass --smoke to check the command on a CPU" >&2
    exit 2
  fi
fi
exec "$PYTHON" -m benchmarks.accelerator_check "${ARGS[@]}"
