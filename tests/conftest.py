"""Import the package from this checkout, whatever ``pip install -e`` last pointed at; shared fixtures."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny Qwen2.5-VL HF directory (the main job's model in the end-to-end tests)."""
    from megatron_papo.models.tiny import make_tiny_qwen25vl

    return make_tiny_qwen25vl(str(tmp_path_factory.mktemp("model") / "tiny"))
