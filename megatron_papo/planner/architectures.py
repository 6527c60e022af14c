"""Qwen2.5-VL and Qwen3-VL architecture numbers and their parameter counts per tensor-parallel rank.

The numbers are those of the released ``config.json`` files (Qwen2.5-VL 3B, 7B, 32B, 72B and Qwen3-VL 2B,
4B, 8B, 32B Instruct). Parameter counts
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
    """The decoder: RMSNorm, GQA attention with QKV bias (Qwen2.5-VL) or q/k RMSNorm (Qwen3-VL), SwiGLU
    MLP, RoPE (no position parameters)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    tie_embeddings: bool
    head_dim: int = 128
    qkv_bias: bool = True
    qk_norm: bool = False

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
            + (qkv if self.qkv_bias else 0)  # column-parallel QKV
            + (2 * self.head_dim if self.qk_norm else 0)  # q and k RMSNorm weights, replicated
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
    """The ViT: 3D patch embedding, RMSNorm blocks (MHA with QKV bias, SwiGLU with biases), 2x2 merger;
    Qwen3-VL's: a biased patch embedding, learned positions, LayerNorm blocks with a plain MLP, whole-image
    attention in every block, DeepStack mergers (norm over the merged width)."""

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
    layer_norm: bool = False  # LayerNorm (weight and bias) instead of RMSNorm
    gated_mlp: bool = True
    patch_bias: bool = False
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()

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
        up = 2 * f if self.gated_mlp else f
        return (
            2 * self.norm_params(h)  # norm1, norm2
            + h * 3 * h // tp
            + 3 * h // tp  # column-parallel QKV with bias
            + h // tp * h
            + h  # row-parallel projection, replicated bias
            + h * up // tp
            + up // tp  # gate and up (or fc1) projections with bias
            + f // tp * h
            + h  # down projection, replicated bias
        )

    def norm_params(self, width: int) -> int:
        return 2 * width if self.layer_norm else width

    def params(self, tp: int) -> int:
        """Parameters of the whole vision tower on one TP rank (it lives on the first pipeline stage)."""
        vtp = tp
        patch = self.in_channels * self.temporal_patch_size * self.patch_size**2 * self.hidden_size
        patch += self.hidden_size * (self.patch_bias + self.num_position_embeddings)
        m = self.merge_hidden
        linears = m * m // vtp + m // vtp + m // vtp * self.out_hidden_size + self.out_hidden_size
        merger = self.norm_params(self.hidden_size) + linears
        deepstack = len(self.deepstack_visual_indexes) * (self.norm_params(m) + linears)
        return patch + self.depth * self.block_params(vtp) + merger + deepstack

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
    model_type: str = "qwen2_5_vl"  # the HF config's

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
        """The architecture of a transformers ``Qwen2_5_VLConfig`` or ``Qwen3VLConfig`` (e.g. a local model
        directory's)."""
        text, vis = hf_config.get_text_config(), hf_config.vision_config
        qwen3 = hf_config.model_type == "qwen3_vl"
        language = LanguageArch(
            **{ours: getattr(text, theirs) for ours, theirs in _LANGUAGE_HF.items()},
            tie_embeddings=any(getattr(c, "tie_word_embeddings", False) for c in (hf_config, text)),
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            qkv_bias=text.attention_bias if qwen3 else True,
            qk_norm=qwen3,
        )
        fields = _QWEN3_VISION_HF if qwen3 else _VISION_HF
        vision = VisionArch(**{ours: getattr(vis, theirs) for ours, theirs in fields.items()})
        if qwen3:
            deepstack, every_block = tuple(vis.deepstack_visual_indexes), tuple(range(vision.depth))
            vision = replace(
                vision, **_QWEN3_VISION, deepstack_visual_indexes=deepstack, fullatt_block_indexes=every_block
            )
        else:
            vision = replace(vision, fullatt_block_indexes=tuple(vision.fullatt_block_indexes))
        return cls(name, language, vision, hf_config.model_type)

    def to_hf_config(self):
        """A transformers ``Qwen2_5_VLConfig`` or ``Qwen3VLConfig`` of this architecture (for random-weight
        models). The special tokens take the last ids of the vocabulary: image, video, vision start,
        vision end, EOS, padding (also BOS)."""
        from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

        from megatron_papo.models.image_tokens import VISION_TOKEN_FIELDS

        lm, top = self.language, self.language.vocab_size
        half = lm.head_dim // 2  # rotary frequencies, split over (temporal, height, width) as Qwen's
        mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        text = {theirs: getattr(lm, ours) for ours, theirs in _LANGUAGE_HF.items()}
        text |= dict(
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
            eos_token_id=top - 5,
            pad_token_id=top - 6,
            bos_token_id=top - 6,
        )
        tokens = {key: top - 1 - i for i, key in enumerate(VISION_TOKEN_FIELDS)}
        if self.model_type == "qwen3_vl":
            vision = {theirs: getattr(self.vision, ours) for ours, theirs in _QWEN3_VISION_HF.items()}
            return Qwen3VLConfig(
                text_config=text | dict(head_dim=lm.head_dim, attention_bias=lm.qkv_bias),
                vision_config=vision
                | dict(deepstack_visual_indexes=list(self.vision.deepstack_visual_indexes)),
                tie_word_embeddings=lm.tie_embeddings,
                **tokens,
            )
        return Qwen2_5_VLConfig(
            text_config=text | dict(tie_word_embeddings=lm.tie_embeddings),
            vision_config={theirs: getattr(self.vision, ours) for ours, theirs in _VISION_HF.items()},
            tie_word_embeddings=lm.tie_embeddings,
            **tokens,
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


# Qwen3-VL's vision config fields (no windows), and what its tower is beyond them
_QWEN3_VISION_HF = {
    ours: theirs
    for ours, theirs in _VISION_HF.items()
    if ours not in ("window_size", "fullatt_block_indexes")
} | {"num_position_embeddings": "num_position_embeddings"}
_QWEN3_VISION = dict(layer_norm=True, gated_mlp=False, patch_bias=True, window_size=0)


def _qwen2_5_vl(name: str, language: LanguageArch) -> ModelArch:
    return ModelArch(name, language, VisionArch(out_hidden_size=language.hidden_size))


def _qwen3_vl(name: str, language: LanguageArch, vision: VisionArch) -> ModelArch:
    language = replace(language, qkv_bias=False, qk_norm=True)
    return ModelArch(name, language, replace(vision, out_hidden_size=language.hidden_size), "qwen3_vl")


# Qwen3-VL's two vision towers: 2B / 4B, 8B / 32B
_QWEN3_VISION_SMALL = VisionArch(
    depth=24,
    hidden_size=1024,
    num_heads=16,
    ffn_hidden_size=4096,
    patch_size=16,
    fullatt_block_indexes=tuple(range(24)),
    num_position_embeddings=2304,
    deepstack_visual_indexes=(5, 11, 17),
    **_QWEN3_VISION,
)
_QWEN3_VISION_LARGE = replace(
    _QWEN3_VISION_SMALL,
    depth=27,
    hidden_size=1152,
    ffn_hidden_size=4304,
    fullatt_block_indexes=tuple(range(27)),
    deepstack_visual_indexes=(8, 16, 24),
)


QWEN2_5_VL = {
    m.name: m
    for m in (
        _qwen2_5_vl("qwen2_5_vl_3b", LanguageArch(36, 2048, 16, 2, 11008, 151936, tie_embeddings=True)),
        _qwen2_5_vl("qwen2_5_vl_7b", LanguageArch(28, 3584, 28, 4, 18944, 152064, tie_embeddings=False)),
        _qwen2_5_vl("qwen2_5_vl_32b", LanguageArch(64, 5120, 40, 8, 27648, 152064, tie_embeddings=False)),
        _qwen2_5_vl("qwen2_5_vl_72b", LanguageArch(80, 8192, 64, 8, 29568, 152064, tie_embeddings=False)),
    )
}
QWEN3_VL = {
    m.name: m
    for m in (
        _qwen3_vl("qwen3_vl_2b", LanguageArch(28, 2048, 16, 8, 6144, 151936, True), _QWEN3_VISION_SMALL),
        _qwen3_vl("qwen3_vl_4b", LanguageArch(36, 2560, 32, 8, 9728, 151936, True), _QWEN3_VISION_SMALL),
        _qwen3_vl("qwen3_vl_8b", LanguageArch(36, 4096, 32, 8, 12288, 151936, False), _QWEN3_VISION_LARGE),
        _qwen3_vl("qwen3_vl_32b", LanguageArch(64, 5120, 64, 8, 25600, 151936, False), _QWEN3_VISION_LARGE),
    )
}
MODELS = QWEN2_5_VL | QWEN3_VL


def get_model(name: str) -> ModelArch:
    """Architecture by name (``qwen2_5_vl_3b`` ... ``qwen2_5_vl_72b``, ``qwen3_vl_2b`` ... ``qwen3_vl_32b``)
    or from an HF model directory."""
    if name in MODELS:
        return MODELS[name]
    if os.path.isfile(os.path.join(name, "config.json")):
        from megatron_papo.models.config import load_hf_config

        return ModelArch.from_hf_config(os.path.basename(os.path.normpath(name)), load_hf_config(name))
    raise ValueError(f"unknown model {name!r}: give one of {', '.join(MODELS)} or an HF model directory")
