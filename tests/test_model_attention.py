"""SDPAttention (megatron-core core-attention submodule) vs softmax attention written out in float64."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_papo.models.attention import SDPAttention

S, B, HEADS, GROUPS, D = 7, 3, 4, 2, 8


def reference(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """q [s, b, h, d], k/v [s, b, g, d], allowed [b, s, s] -> [s, b, h*d], float64, GQA by repetition."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (t.repeat_interleave(HEADS // GROUPS, dim=2) for t in (k, v))
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(D)
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # a row with nothing allowed sees every key
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(S, B, HEADS * D)


def module(mask_type: AttnMaskType) -> SDPAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * D, num_attention_heads=HEADS)
    return SDPAttention(config, layer_number=1, attn_mask_type=mask_type, attention_type="self").eval()


def test_sdpa_matches_float64_softmax_for_each_mask_type():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(S, B, HEADS, D, generator=g)
    k, v = (torch.randn(S, B, GROUPS, D, generator=g) for _ in range(2))
    causal = torch.ones(S, S, dtype=torch.bool).tril().expand(B, S, S)
    lengths = torch.tensor([7, 4, 1])
    keys_real = torch.arange(S)[None, :] < lengths[:, None]  # [b, s] right padding
    padding = ~keys_real[:, None, None, :]  # megatron: True = masked
    arbitrary = torch.rand(B, 1, S, S, generator=g) < 0.5
    arbitrary[1, 0, 2] = True  # a query row with every key masked
    cases = [
        (AttnMaskType.causal, None, causal),
        (AttnMaskType.no_mask, None, torch.ones(B, S, S, dtype=torch.bool)),
        (AttnMaskType.padding, padding, keys_real[:, None, :].expand(B, S, S)),
        (AttnMaskType.arbitrary, arbitrary, ~arbitrary[:, 0]),
        (AttnMaskType.causal, arbitrary, ~arbitrary[:, 0]),  # a given mask replaces the causal one
    ]
    for mask_type, mask, allowed in cases:
        out = module(mask_type)(q, k, v, attention_mask=mask)
        torch.testing.assert_close(out.double(), reference(q, k, v, allowed), atol=1e-5, rtol=0)
        assert torch.isfinite(out).all()


def test_sdpa_refuses_a_missing_mask():
    q = torch.randn(S, B, HEADS, D)
    with pytest.raises(ValueError, match="needs an attention_mask"):
        module(AttnMaskType.arbitrary)(q, q[:, :, :GROUPS], q[:, :, :GROUPS])
