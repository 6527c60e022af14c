"""Multimodal RoPE positions ``[3, batch, seq]``, computed by transformers' own ``get_rope_index``."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

from megatron_papo.models.image_tokens import check_image_tokens

HF_MODELS = {"qwen2_5_vl": Qwen2_5_VLModel, "qwen3_vl": Qwen3VLModel}  # whose get_rope_index is used


def mrope_position_ids(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor, hf_config
) -> torch.Tensor:
    """Positions of ``input_ids`` [b, s] (right-padded, ``attention_mask`` [b, s] 1 on tokens): text tokens
    count up, each image's tokens take (t, h, w) grid positions, text after an image continues after it.

    Calls ``get_rope_index`` of transformers' ``Qwen2_5_VLModel`` or ``Qwen3VLModel`` (it uses only the
    config), so the trainer's positions are the ones transformers (and so the embedded rollout engine)
    uses. Padding positions are 0. Raises ``ValueError`` when the image placeholders do not match the
    image grids.
    """
    merge = hf_config.vision_config.spatial_merge_size
    check_image_tokens(input_ids, image_grid_thw, hf_config.image_token_id, merge)
    token_types = (input_ids == hf_config.image_token_id).int()
    if image_grid_thw is None or not bool(token_types.any()):
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * attention_mask.long()
        return positions.unsqueeze(0).expand(3, -1, -1).clone()
    hf_model = HF_MODELS[hf_config.model_type]
    owner = SimpleNamespace(
        config=hf_config,
        get_vision_position_ids=lambda *a, **k: hf_model.get_vision_position_ids(None, *a, **k),
    )
    positions, _ = hf_model.get_rope_index(
        owner,
        input_ids,
        mm_token_type_ids=token_types,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
    )
    return positions
