"""Bad model input is refused with an error naming what is wrong (no processes spawned)."""

import json
import os

import pytest
import torch

from megatron_papo.models import ModelConfig, check_image_tokens, mrope_position_ids
from megatron_papo.models.config import check_layout, load_hf_config
from megatron_papo.models.tiny import make_tiny_qwen25vl
from megatron_papo.models.weights import HFCheckpoint

IMAGE = 9
GRIDS = torch.tensor([[1, 4, 6], [1, 2, 2]])  # 6 and 1 image tokens


def _ids(*rows: list[int]) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [0] * (width - len(row)) for row in rows])


def test_image_placeholders_must_match_the_grids():
    ok = _ids([1, 2, *[IMAGE] * 6, 3], [4], [5, IMAGE, 6])
    check_image_tokens(ok, GRIDS, IMAGE, 2)
    check_image_tokens(_ids([1, *[IMAGE] * 7]), GRIDS, IMAGE, 2)  # two images back to back
    check_image_tokens(_ids([1, 2, 3]), None, IMAGE, 2)
    cases = [
        (
            _ids([1, *[IMAGE] * 5, 3], [IMAGE]),
            "sample 0: a run of 5 image placeholder tokens at position 1 ends inside image 0",
        ),
        (
            _ids([1, *[IMAGE] * 6], [IMAGE, IMAGE]),
            "sample 1: 1 image placeholder tokens with no image grid left",
        ),
        (_ids([1, *[IMAGE] * 6], [2]), "cover 1 images, image_grid_thw has 2"),
        (
            _ids([IMAGE], [*[IMAGE] * 6]),
            "sample 0: a run of 1 image placeholder tokens at position 0 ends inside image 0",
        ),
    ]
    for ids, message in cases:
        with pytest.raises(ValueError, match=message):
            check_image_tokens(ids, GRIDS, IMAGE, 2)
    with pytest.raises(ValueError, match="no image grid left"):
        check_image_tokens(_ids([IMAGE]), None, IMAGE, 2)


def test_bad_model_directories_and_layouts(tmp_path):
    tiny = make_tiny_qwen25vl(str(tmp_path / "tiny"))
    hf_config = load_hf_config(tiny)
    with pytest.raises(ValueError, match="does not divide the model's 2 KV heads"):
        check_layout(hf_config, 4, 1)
    with pytest.raises(ValueError, match="pipeline_model_parallel_size 3 does not divide 2 layers"):
        check_layout(hf_config, 1, 3)
    with pytest.raises(ValueError, match="no such directory"):
        load_hf_config(str(tmp_path / "nowhere"))
    other = tmp_path / "qwen2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="holds a 'qwen2' model"):
        load_hf_config(str(other))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        HFCheckpoint(str(other))
    with pytest.raises(ValueError, match="model.attention must be one of .* got 'flash'"):
        ModelConfig(hf_path=tiny, attention="flash")
    # the positions refuse a sample whose placeholders do not fit its image
    ids = torch.tensor([[1, hf_config.vision_start_token_id, *[hf_config.image_token_id] * 5, 2]])
    with pytest.raises(ValueError, match="sample 0: a run of 5 image placeholder tokens at position 2"):
        mrope_position_ids(ids, GRIDS[:1], torch.ones_like(ids), hf_config)
    os.remove(os.path.join(tiny, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="tiny: no model.safetensors"):
        HFCheckpoint(tiny)
