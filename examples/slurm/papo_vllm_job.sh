# Shared body of the GPU sbatch scripts in this folder (sourced, not run): a heterogeneous job whose
# group 0 trains with megatron-core (one task per GPU) and group 1 serves rollouts with vLLM.
#
# The sourcing script sets: MODEL (planner name), TRAIN_NODES, GPUS_PER_NODE, TP, PP, MICRO_BATCH,
# RECOMPUTE, ALGORITHM, VLLM_TP; the user sets MODEL_DIR (the HF Qwen2.5-VL or Qwen3-VL directory, on
# shared storage) and may set CONFIG (a YAML config), VLLM_PORT (first port, default 8000), PAPO_ENTRY,
# WEIGHT_SYNC: directory (default: a safetensors directory under the run directory, on storage both groups
# see) or broadcast (NCCL from trainer rank 0 into the servers' GPUs; see docs/vllm.md), RUN_DIR (default
# runs/JOB_NAME: the same for a requeued or resubmitted job, which continues the run there) and
# SAVE_INTERVAL (steps between checkpoints, default 10).
# Extra sbatch arguments are config overrides (key.sub=value) appended last.
# Before the time limit SLURM signals the trainer (#SBATCH --signal in the sourcing script): it saves and
# the job requeues itself (requeue.sh).
# Check a layout before queueing: megatron-papo plan --model "$MODEL" --gpus N --tp TP --pp PP ...
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
: "${MODEL_DIR:?set MODEL_DIR to the Hugging Face Qwen2.5-VL or Qwen3-VL directory (shared by all nodes)}"
VLLM_PORT=${VLLM_PORT:-8000}
WEIGHT_SYNC=${WEIGHT_SYNC:-directory}
RUN_DIR=${RUN_DIR:-runs/$SLURM_JOB_NAME}
SAVE_INTERVAL=${SAVE_INTERVAL:-10}
read -r -a ENTRY <<< "${PAPO_ENTRY:-megatron-papo}"
# a fresh weight-sync secret per job, in the environment of both groups (never on a command line):
# the servers accept weight syncs from this run's trainer only (docs/security.md)
MEGATRON_PAPO_SYNC_TOKEN=$(python3 -m megatron_papo.rollout.sync_auth)
export MEGATRON_PAPO_SYNC_TOKEN
# shellcheck source=examples/slurm/requeue.sh
source examples/slurm/requeue.sh

# --- rollout: GPUS_PER_NODE / VLLM_TP servers per rollout node, each on its own GPUs and port
servers_per_node=$((GPUS_PER_NODE / VLLM_TP))
urls=()
for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1"); do
  for ((i = 0; i < servers_per_node; i++)); do urls+=("http://$node:$((VLLM_PORT + i))"); done
done
# shellcheck disable=SC2016  # expanded by the remote bash, per node
srun --het-group=1 --ntasks-per-node=1 --kill-on-bad-exit=1 \
  --export=ALL,MODEL_DIR="$MODEL_DIR",VLLM_PORT="$VLLM_PORT",VLLM_TP="$VLLM_TP",N="$servers_per_node",WEIGHT_SYNC="$WEIGHT_SYNC" \
  bash -c 'trap "" USR1  # the time-limit signal is for the trainer: the servers serve until it has saved
           for ((i = 0; i < N; i++)); do
             gpus=$(seq -s, $((i * VLLM_TP)) $((i * VLLM_TP + VLLM_TP - 1)))
             CUDA_VISIBLE_DEVICES=$gpus tools/launch_vllm.sh --model "$MODEL_DIR" --host "$(hostname)" \
               --port $((VLLM_PORT + i)) --weight-sync "$WEIGHT_SYNC" --tensor-parallel-size "$VLLM_TP" &
           done; wait' &
rollout_step=$!
trap 'kill "$rollout_step" 2>/dev/null || true' EXIT

for url in "${urls[@]}"; do  # vLLM's OpenAI server answers /health once the model is loaded
  for ((t = 0; ; t++)); do
    curl -sf "$url/health" >/dev/null && break
    kill -0 "$rollout_step" 2>/dev/null || { echo "vLLM servers exited before $url was ready" >&2; exit 1; }
    ((t < 180)) || { echo "vLLM at $url not ready after 30 min" >&2; exit 1; }
    sleep 10
  done
done

# --- training: one task per GPU; ranks come from SLURM_PROCID / SLURM_NTASKS, master = first node
url_list=$(IFS=,; echo "${urls[*]}")
run_or_requeue srun --het-group=0 --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 \
  "${ENTRY[@]}" train ${CONFIG:+--config "$CONFIG"} \
  model.hf_path="$MODEL_DIR" model.dtype=bfloat16 model.recompute="$RECOMPUTE" optimizer.bf16=true \
  parallel.tensor_model_parallel_size="$TP" parallel.pipeline_model_parallel_size="$PP" \
  algorithm.name="$ALGORITHM" trainer.micro_batch_size="$MICRO_BATCH" \
  rollout.backend=vllm "rollout.vllm_urls=[$url_list]" rollout.vllm_weight_sync="$WEIGHT_SYNC" \
  trainer.output_dir="$RUN_DIR" checkpoint.dir="$RUN_DIR/checkpoints" \
  checkpoint.resume=auto checkpoint.save_interval="$SAVE_INTERVAL" \
  "$@"
