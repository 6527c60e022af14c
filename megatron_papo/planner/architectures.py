"""Qwen2.5-VL architecture numbers and their parameter counts per tensor-parallel rank.

The numbers are those of the released ``config.json`` files (3B, 7B, 32B, 72B Instruct). Parameter counts
follow the megatron-core layout: column-parallel weights and biases are split over TP, row-parallel weights
are split and their biases replicated, norms and the patch embedding are replicated, embeddings are split
on the vocabulary. At ``tp=1`` the counts equal transformers' model. Layouts follow ``megatron_papo.models``:
everything (vision tower included) splits evenly over TP or the layout is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LanguageArch:
    """The decoder: RMSNorm, GQA attention with QKV bias, SwiGLU MLP, RoPE (no position parameters)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    tie_embeddings: bool
    head_dim: int = 128

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self, tp: int) -> int:
        """Parameters of one decoder layer on one TP rank."""
        h, f = self.hidden_size, self.ffn_hidden_size
        qkv = (self.q_size + 2 * self.kv_size) // tp
        return (
            2 * h  # input and pre-MLP RMSNorm weights
            + h * qkv
            + qkv  # column-parallel QKV with bias
            + self.q_size // tp * h  # row-parallel output projection, no bias
            + h * 2 * f // tp  # column-parallel gate and up projections
            + f // tp * h  # row-parallel down projection
        )

    def embedding_params(self, tp: int) -> int:
        return self.vocab_size // tp * self.hidden_size

    def tp_problem(self, tp: int) -> str | None:
        """Why the decoder cannot split over ``tp`` ranks (heads, KV groups, FFN and vocabulary split
        evenly in megatron-core and ``megatron_papo.models``), or None."""
        for what, size in (
            ("attention heads", self.num_heads),
            ("KV heads", self.num_kv_heads),
            ("FFN size", self.ffn_hidden_size),
            ("vocabulary", self.vocab_size),
        ):
            if size % tp:
                return f"{what} {size} not divisible by TP={tp}"
        return None


@dataclass(frozen=True)
class VisionArch:
    """The ViT: 3D patch embedding, RMSNorm blocks (MHA with QKV bias, SwiGLU with biases), 2x2 merger."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    ffn_hidden_size: int = 3420
    out_hidden_size: int = 2048
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112  # pixels: the side of a windowed-attention block's window
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # blocks attending over the whole image

    @property
    def merge_hidden(self) -> int:
        return self.hidden_size * self.spatial_merge_size**2

    def tp_problem(self, tp: int) -> str | None:
        """Why the vision tower cannot split over ``tp`` ranks (megatron's parallel linears need even
        splits of heads, MLP columns and the merger width), or None."""
        for what, size in (
            ("heads", self.num_heads),
            ("MLP size", self.ffn_hidden_size),
            ("merger width", self.merge_hidden),
        ):
            if size % tp:
                return f"vision {what} {size} not divisible by TP={tp}"
        return None

    def block_params(self, tp: int) -> int:
        """Parameters of one vision block on one TP rank."""
        h, f = self.hidden_size, self.ffn_hidden_size
        return (
            2 * h  # norm1, norm2
            + h * 3 * h // tp
            + 3 * h // tp  # column-parallel QKV with bias
            + h // tp * h
            + h  # row-parallel projection, replicated bias
            + h * 2 * f // tp
            + 2 * f // tp  # gate and up projections with bias
            + f // tp * h
            + h  # down projection, replicated bias
        )

    def params(self, tp: int) -> int:
        """Parameters of the whole vision tower on one TP rank (it lives on the first pipeline stage)."""
        vtp = tp
        patch = self.in_channels * self.temporal_patch_size * self.patch_size**2 * self.hidden_size
        m = self.merge_hidden
        merger = (
            self.hidden_size
            + m * m // vtp
            + m // vtp
            + m // vtp * self.out_hidden_size
            + self.out_hidden_size
        )
        return patch + self.depth * self.block_params(vtp) + merger

    def patches(self, pixels: int) -> int:
        """Vision-tower tokens of one image of ``pixels`` pixels (before the 2x2 merge)."""
        return pixels // self.patch_size**2

    def tokens(self, pixels: int) -> int:
        """Language-model tokens of one image of ``pixels`` pixels (after the merge)."""
        return self.patches(pixels) // self.spatial_merge_size**2


@dataclass(frozen=True)
class ModelArch:
    name: str
    language: LanguageArch
    vision: VisionArch

    def params(self, tp: int = 1) -> int:
        """All parameters of the model on one TP rank (PP=1). At ``tp=1``: transformers' count."""
        return self.stage_params(tp, 1, 0)

    def stage_params(self, tp: int, pp: int, stage: int) -> int:
        """Parameters on one rank of pipeline stage ``stage`` (of ``pp``) at tensor-parallel size ``tp``.

        The first stage holds the vision tower and the token embedding, the last the final norm and the
        output layer; with tied embeddings and PP>1 the last stage keeps its own copy of the embedding
        (megatron-core's shared embedding, kept equal by an all-reduce of its gradient).
        """
        lm = self.language
        first, last = stage == 0, stage == pp - 1
        total = lm.num_layers // pp * lm.layer_params(tp)
        if first:
            total += lm.embedding_params(tp) + self.vision.params(tp)
        if last:
            total += lm.hidden_size
            if not lm.tie_embeddings or not first:
                total += lm.embedding_params(tp)
        return total

    def layout_problem(self, tp: int, pp: int) -> str | None:
        """Why ``tp`` x ``pp`` cannot hold this model, or None."""
        if tp < 1 or pp < 1:
            return f"TP and PP must be >= 1, got TP={tp} PP={pp}"
        if self.language.num_layers % pp:
            return f"{self.language.num_layers} layers not divisible by PP={pp}"
        return self.language.tp_problem(tp) or self.vision.tp_problem(tp)

    @classmethod
    def from_hf_config(cls, name: str, hf_config) -> ModelArch:
        """The architecture of a transformers ``Qwen2_5_VLConfig`` (e.g. a local model directory's)."""
        text, vis = hf_config.get_text_config(), hf_config.vision_config
        language = LanguageArch(
            **{ours: getattr(text, theirs) for ours, theirs in _LANGUAGE_HF.items()},
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False) or text.tie_word_embeddings),
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        )
        vision = VisionArch(**{ours: getattr(vis, theirs) for ours, theirs in _VISION_HF.items()})
        return cls(name, language, replace(vision, fullatt_block_indexes=tuple(vision.fullatt_block_indexes)))

    def to_hf_config(self):
        """A transformers ``Qwen2_5_VLConfig`` of this architecture (for random-weight models). The special
        tokens take the last ids of the vocabulary: image, video, vision start, vision end, EOS, padding
        (also BOS)."""
        from transformers import Qwen2_5_VLConfig

        from megatron_papo.models.image_tokens import VISION_TOKEN_FIELDS

        lm, top = self.language, self.language.vocab_size
        half = lm.head_dim // 2  # rotary frequencies, split over (temporal, height, width) as Qwen's
        mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        text = {theirs: getattr(lm, ours) for ours, theirs in _LANGUAGE_HF.items()}
        text |= dict(
            tie_word_embeddings=lm.tie_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
            eos_token_id=top - 5,
            pad_token_id=top - 6,
            bos_token_id=top - 6,
        )
        return Qwen2_5_VLConfig(
            text_config=text,
            vision_config={theirs: getattr(self.vision, ours) for ours, theirs in _VISION_HF.items()},
            tie_word_embeddings=lm.tie_embeddings,
            **{key: top - 1 - i for i, key in enumerate(VISION_TOKEN_FIELDS)},
        )


# our field -> transformers' Qwen2.5-VL config field
_LANGUAGE_HF = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size",
}
_VISION_HF = {
    "depth": "depth",
    "hidden_size": "hidden_size",
    "num_heads": "num_heads",
    "ffn_hidden_size": "intermediate_size",
    "out_hidden_size": "out_hidden_size",
    "patch_size": "patch_size",
    "temporal_patch_size": "temporal_patch_size",
    "spatial_merge_size": "spatial_merge_size",
    "in_channels": "in_channels",
    "window_size": "window_size",
    "fullatt_block_indexes": "fullatt_block_indexes",
}


def _qwen2_5_vl(name: str, language: LanguageArch) -> ModelArch:
    return ModelArch(name, language, VisionArch(out_hidden_size=language.hidden_size))


QWEN2_5_VL = {
    m.name: m
    for m in (
        _qwen2_5_vl("qwen2_5_vl_3b", LanguageArch(36, 2048, 16, 2, 11008, 151936, tie_embeddings=True)),
        _qwen2_5_vl("qwen2_5_vl_7b", LanguageArch(28, 3584, 28, 4, 18944, 152064, tie_embeddings=False)),
        _qwen2_5_vl("qwen2_5_vl_32b", LanguageArch(64, 5120, 40, 8, 27648, 152064, tie_embeddings=False)),
        _qwen2_5_vl("qwen2_5_vl_72b", LanguageArch(80, 8192, 64, 8, 29568, 152064, tie_embeddings=False)),
    )
}


def get_model(name: str) -> ModelArch:
    """Architecture by name (``qwen2_5_vl_3b`` ... ``qwen2_5_vl_72b``) or from an HF model directory."""
    if name in QWEN2_5_VL:
        return QWEN2_5_VL[name]
    if os.path.isfile(os.path.join(name, "config.json")):
        from megatron_papo.models.config import load_hf_config

        return ModelArch.from_hf_config(os.path.basename(os.path.normpath(name)), load_hf_config(name))
    raise ValueError(f"unknown model {name!r}: give one of {', '.join(QWEN2_5_VL)} or an HF model directory")
