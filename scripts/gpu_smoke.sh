#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# GPU smoke check: this package on vLLM's CUDA build, on any CUDA machine that
# can reach the package index (README "vLLM versions": what the CPU tiers miss).
#
# Usage: scripts/gpu_smoke.sh [--dry-run] [--venv DIR] [--vllm VERSION] [SELECTION...]
#
#   --venv DIR      the venv to build (default .venv-gpu-smoke, relative to the
#                   repository root), recreated from scratch on every run; a DIR
#                   this script did not make is refused, never wiped.
#   --vllm VERSION  vLLM release to install (default 0.34.0).
#   --dry-run       create and install nothing: print the plan (venv, the exact
#                   pip and pytest command lines) and collect exactly each step's
#                   selection with $PYTHON; exit 1 if a test path or node is
#                   missing or a step collects nothing.
#   SELECTION...    more test paths or node ids, run as one last step ("extra").
#
# The real run: a fresh venv; `pip install vllm==VERSION` together with the test
# tools of setup.cfg's [test] extra (one resolve, so vLLM's pins hold); this
# package with `--no-deps -e .` (its requirements are vLLM's already); exit 2
# unless torch.cuda.is_available(); then these steps, each comparison a float32
# engine against the float32 reference, both on the GPU (the tests pin
# dtype="float32"; test_closed_reranker_refuses_calls alone takes the default,
# bf16 on CUDA, and compares nothing):
#   fidelity       tests/engine/test_fidelity.py without the bf16 test: every
#                  chunk size, two checkpoints, engine vs reference <= 1e-4
#   engine-api     tests/engine/test_reranker_api.py, test_shared_engine.py
#   bf16           the bf16 test alone, with -s: prints the bf16 engine's drift
#   openai-server  tests/server/test_vllm_openai_server.py: `vllm serve` with
#                  the plugin, multiprocess, against the offline reranker
#   store          tests/store: passages encoded once (float32 stores: the tests
#                  pass --dtype float32) and ranked by id, equal to by text
#
# Budget: install 3-5 min the first time (vLLM, CUDA torch and their libraries);
# tests about 6 min and at most 10 on a current GPU (~25 in-process engines of a
# tiny checkpoint at seconds each, one `vllm serve`). Every test is cut
# at its step's --timeout; the summary flags a run over the 10 minutes.
# Logs: DIR/logs/STEP.log.
#
# Environment: PYTHON (default python3) makes the venv, or collects in a dry run
# (e.g. PYTHON=.venv/bin/python on this project's CPU machines).
# Exit: 0 all passed; 1 a step failed, or a dry run found a broken selection;
# 2 no CUDA device; 64 usage error.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv-gpu-smoke"
VLLM_VERSION="0.34.0"
DRY_RUN=0
EXTRA=()
TEST_BUDGET_S=600
# Written into the venv: keeps it out of git, and marks it as safe to recreate.
MARKER="# made by scripts/gpu_smoke.sh"

usage() {
  grep -m1 '^# Usage:' "$0" | sed 's/^# //' >&2
  exit 64
}

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --venv) (($# >= 2)) || usage; VENV="$2"; shift ;;
    --vllm) (($# >= 2)) || usage; VLLM_VERSION="$2"; shift ;;
    -h | --help) sed -n '3,/^set /s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) echo "gpu_smoke: unknown option $1" >&2; usage ;;
    *) EXTRA+=("$1") ;;
  esac
  shift
done

VPY="$VENV/bin/python"
BF16_TEST="tests/engine/test_fidelity.py::test_bfloat16_margin_difference_is_measured"
# name|per-test --timeout (s)|selection. The first engine test of each pytest
# process also pays CUDA initialisation; the server step waits up to 240 s for
# its server to start (tests/server/conftest.py).
STEPS=(
  "fidelity|300|tests/engine/test_fidelity.py --deselect $BF16_TEST"
  "engine-api|300|tests/engine/test_reranker_api.py tests/engine/test_shared_engine.py"
  "bf16|300|-s $BF16_TEST"
  "openai-server|480|tests/server/test_vllm_openai_server.py"
  "store|300|tests/store"
)
if ((${#EXTRA[@]})); then
  STEPS+=("extra|480|${EXTRA[*]}")
fi

# The test tools come from setup.cfg's [test] extra, so they are listed once.
mapfile -t TEST_REQS < <("$PYTHON" - <<'PY'
import configparser

cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
for line in cfg["options.extras_require"]["test"].splitlines():
    if line.strip():
        print(line.strip())
PY
)
((${#TEST_REQS[@]})) || { echo "gpu_smoke: no [test] extra in setup.cfg" >&2; exit 1; }

VENV_CMD=("$PYTHON" -m venv --clear "$VENV")
PIP=("$VPY" -m pip install --disable-pip-version-check)
PIP_VLLM=("${PIP[@]}" "vllm==$VLLM_VERSION" "${TEST_REQS[@]}")
PIP_SELF=("${PIP[@]}" --no-deps -e .)

pytest_cmd() {  # NUL-separated pytest argv for per-test timeout "$1", selection "$2"
  local -a selection
  read -ra selection <<<"$2"
  printf '%s\0' "$VPY" -m pytest -q -p no:cacheprovider "--timeout=$1" \
    "${selection[@]}"
}

quoted() { local line; line=$(printf '%q ' "$@"); echo "${line% }"; }
show() { echo "  $(quoted "$@")"; }

echo "gpu_smoke plan (vllm==$VLLM_VERSION, venv $VENV):"
show "${VENV_CMD[@]}"
show "${PIP_VLLM[@]}"
show "${PIP_SELF[@]}"
echo "  $VPY - <<CUDA_CHECK  # exit 2 unless torch.cuda.is_available()"
for step in "${STEPS[@]}"; do
  IFS='|' read -r name timeout selection <<<"$step"
  mapfile -d '' -t cmd < <(pytest_cmd "$timeout" "$selection")
  show "${cmd[@]}"
done
echo "budget: install 3-5 min; tests ~5 min, at most ${TEST_BUDGET_S}s"

# A missing file would only show up as a pytest usage error minutes into a run.
missing=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name _ selection <<<"$step"
  read -ra args <<<"$selection"
  for arg in "${args[@]}"; do
    if [[ "$arg" != -* && ! -e "${arg%%::*}" ]]; then
      echo "gpu_smoke: step $name selects $arg: no such file" >&2
      missing=1
    fi
  done
done
((missing == 0)) || exit 1

if ((DRY_RUN)); then
  # One interpreter collects every step with its exact argv: torch and
  # transformers are imported once, not once per step.
  collect_args=()
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name timeout selection <<<"$step"
    mapfile -d '' -t cmd < <(pytest_cmd "$timeout" "$selection")
    collect_args+=("$name" "${cmd[*]:3}")  # argv after "python -m pytest"
  done
  echo "dry run: collecting with $PYTHON"
  exec "$PYTHON" - "${collect_args[@]}" <<'PY'
import shlex
import sys

import pytest


class Count:
    n = 0

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.n = len(session.items)  # after --deselect


counts, broken = {}, []
args = iter(sys.argv[1:])
for name, argv in zip(args, args):
    count = Count()
    rc = pytest.main(["--collect-only", *shlex.split(argv)], plugins=[count])
    counts[name] = count.n
    if rc != 0 or count.n == 0:
        broken.append(f"{name} (pytest exit {int(rc)}, {count.n} tests)")
total = sum(counts.values())
listed = ", ".join(f"{name} {n}" for name, n in counts.items())
print(f"collected: {listed} = {total} tests")
if broken:
    print("gpu_smoke: broken selection:", "; ".join(broken), file=sys.stderr)
    sys.exit(1)
PY
fi

step_rc=()
step_s=()
SMOKE_START=$SECONDS

timed() {  # run "${@:2}", printing its wall time under label "$1"
  local start=$SECONDS
  "${@:2}"
  echo "== $1: done in $((SECONDS - start))s"
}

if [[ -e "$VENV" ]] && ! grep -qsxF "$MARKER" "$VENV/.gitignore"; then
  echo "gpu_smoke: $VENV exists and was not made by this script;" \
    "remove it or pass --venv" >&2
  exit 1
fi
timed venv "${VENV_CMD[@]}"
printf '*\n%s\n' "$MARKER" >"$VENV/.gitignore"
timed "pip vllm" "${PIP_VLLM[@]}"
timed "pip package" "${PIP_SELF[@]}"
# CUDA_CHECK: exit 2 (this script's "no GPU"), anything else is a broken install.
"$VPY" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    print(
        f"gpu_smoke: torch {torch.__version__} sees no CUDA device "
        "(no GPU, or a driver too old for this build); nothing was tested",
        file=sys.stderr,
    )
    sys.exit(2)
import vllm

print(
    f"gpu_smoke: vllm {vllm.__version__}, torch {torch.__version__} "
    f"(CUDA {torch.version.cuda}), {torch.cuda.get_device_name(0)}"
)
PY
mkdir -p "$VENV/logs"
# As if activated: vLLM and its JIT helpers may look up tools (ninja) on PATH.
PATH="$(cd "$VENV" && pwd)/bin:$PATH"
export PATH

for step in "${STEPS[@]}"; do
  IFS='|' read -r name timeout selection <<<"$step"
  mapfile -d '' -t cmd < <(pytest_cmd "$timeout" "$selection")
  echo "== $name: $(quoted "${cmd[@]}")"
  start=$SECONDS
  rc=0
  PYTHONUNBUFFERED=1 "${cmd[@]}" 2>&1 | tee "$VENV/logs/$name.log" || rc=$?
  step_rc+=("$rc")
  step_s+=("$((SECONDS - start))")
  echo "== $name: exit $rc in $((SECONDS - start))s" \
    "($((SECONDS - SMOKE_START))s since the start)"
done

echo "gpu_smoke summary (vllm==$VLLM_VERSION):"
failed=0
tests_s=0
for i in "${!STEPS[@]}"; do
  IFS='|' read -r name _ _ <<<"${STEPS[$i]}"
  printf '  %-14s %-17s %4ss\n' "$name" \
    "$( ((step_rc[i] == 0)) && echo passed || echo "FAILED (exit ${step_rc[i]})")" \
    "${step_s[$i]}"
  ((step_rc[i] == 0)) || failed=1
  tests_s=$((tests_s + step_s[i]))
done
figure=$(grep -h "max |margin diff|" "$VENV/logs/bf16.log" || true)
echo "  bf16: ${figure:-no figure printed (see $VENV/logs/bf16.log)}"
if ((tests_s > TEST_BUDGET_S)); then
  echo "  tests took ${tests_s}s: OVER the ${TEST_BUDGET_S}s budget"
else
  echo "  tests took ${tests_s}s (budget ${TEST_BUDGET_S}s);" \
    "whole run $((SECONDS - SMOKE_START))s"
fi
exit "$failed"
