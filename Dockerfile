# megatron-papo on NVIDIA's NGC PyTorch image (CUDA, cuDNN, NCCL, transformer-engine, apex included).
#
#   docker build -t megatron-papo .
#   docker run --gpus all --ipc=host --rm megatron-papo megatron-papo plan --model qwen2_5_vl_7b --gpus 8
#
# vLLM pins its own torch build, so it lives in a separate virtual environment (/opt/vllm): the rollout
# servers are separate processes (tools/launch_vllm.sh) and never import the trainer's torch. megatron-papo
# is installed there too, without dependencies: vLLM loads its broadcast weight-sync engine as a plugin.
ARG NGC_TAG=25.04-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

ARG VLLM_VERSION=0.32.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VLLM_PYTHON=/opt/vllm/bin/python

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Rollout: vLLM with its torch (0.32 brings the weight-transfer endpoints broadcast sync drives).
RUN python -m venv /opt/vllm \
    && /opt/vllm/bin/pip install --no-cache-dir "vllm==${VLLM_VERSION}" \
    && ln -s /opt/vllm/bin/vllm /usr/local/bin/vllm

WORKDIR /workspace/megatron-papo
COPY . .

# The trainer on the image's torch: the package with its GPU extras. transformer-engine and apex come with
# the base image; the constraint keeps pip from replacing its torch. Then the plugin into vLLM's venv.
RUN pip list --format=freeze | grep -E '^(torch|transformer[-_]engine|apex)==' > /tmp/ngc-constraints.txt \
    && PIP_CONSTRAINT=/tmp/ngc-constraints.txt pip install --no-cache-dir -e ".[gpu,test]" \
    && megatron-papo --help > /dev/null \
    && /opt/vllm/bin/pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && /opt/vllm/bin/python -c "from megatron_papo.rollout.vllm_plugin import register; register()"

CMD ["megatron-papo", "--help"]
