"""Bytes a transformer layer keeps for its backward pass, per micro-batch, on one rank.

Two kernel sets are modelled, each by the tensors its autograd graph saves:

``fused`` (GPU: transformer-engine / flash attention, megatron-core's TE spec), per token:
  LayerNorm-linear input and output for QKV and FC1           4 h   (/ tp with sequence parallelism)
  mixed QKV (kept alive by the V view), rotated Q and K      (2 q + 3 kv) / tp
  attention output (= projection input)                        q / tp
  SwiGLU input (FC1 output) and output (= FC2 input)           3 f / tp
  softmax log-sum-exp, fp32                                    heads / tp  (4 bytes each)
  No seq x seq term: flash attention recomputes the scores.

``local`` (CPU: megatron-core's local spec, torch RMSNorm, unfused attention), per token:
  RMSNorm input, normalised input, and its output (x2 norms)  6 h
  Q, expanded K, expanded V (GQA repeats K/V per head), context  4 q / tp
  FC1 output, SiLU input/output, product (= FC2 input)         5 f / tp
  two fp32 RMSNorm reciprocal std                              2     (4 bytes each)
  plus softmax probabilities [batch, heads/tp, seq, seq], the bool causal mask [seq, seq] and
  the multimodal RoPE cos/sin [seq, batch, head_dim] of Q and K (4 tensors).
  megatron-core's torch norms do not support sequence parallelism.

The ``local`` counts were taken from megatron-core 0.16's autograd graph (``tests/test_planner.py`` checks
them against ``torch.autograd.graph.saved_tensors_hooks`` at several sizes and TP degrees); the ``fused``
counts follow the same accounting for the TE / flash-attention code paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_papo.planner.architectures import VisionArch

Kernels = Literal["fused", "local"]
FP32 = 4


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one transformer layer as its activations see them."""

    hidden: int
    q_size: int  # heads x head_dim
    kv_size: int  # kv_heads x head_dim
    ffn: int
    heads: int
    head_dim: int


def layer_activation_bytes(
    layer: LayerShape,
    seq: int,
    batch: int,
    tp: int,
    sequence_parallel: bool,
    kernels: Kernels,
    elem: int,
    attention_span: int | None = None,
) -> int:
    """Bytes saved for backward by one layer for a ``[seq, batch, hidden]`` input.

    ``elem`` is the activation element size (2 for bf16, 4 for fp32). ``attention_span`` is the length of
    each attention block for the unfused scores (default ``seq``; the vision tower attends within images
    or windows).
    """
    tokens = seq * batch
    span = seq if attention_span is None else attention_span
    if kernels == "fused":
        h_div = tp if sequence_parallel else 1
        per_token = 4 * layer.hidden // h_div + (2 * layer.q_size + 3 * layer.kv_size + layer.q_size) // tp
        per_token += 3 * layer.ffn // tp
        return tokens * (per_token * elem + FP32 * layer.heads // tp)
    if sequence_parallel:
        raise ValueError("kernels='local' (torch norms) does not support sequence parallelism")
    per_token = 6 * layer.hidden + 4 * layer.q_size // tp + 5 * layer.ffn // tp
    scores = tokens * span * (layer.heads // tp)  # softmax output, [heads/tp, span, span] per block
    rope = 4 * tokens * layer.head_dim
    return tokens * (per_token * elem + 2 * FP32) + scores * elem + span * span + rope * elem


def norm_activation_bytes(
    hidden: int, tokens: int, tp: int, sequence_parallel: bool, kernels: Kernels, elem: int
) -> int:
    """The final RMSNorm before the output layer (its input, output and reciprocal std)."""
    if kernels == "fused":
        return tokens * (2 * hidden // (tp if sequence_parallel else 1) * elem + FP32)
    return tokens * (3 * hidden * elem + FP32)


def vision_activation_bytes(vision: VisionArch, patches: int, tp: int, elem: int) -> int:
    """Bytes the vision tower (``megatron_papo.models.vision``) saves for the ``patches`` of a micro-batch.

    Per block and patch: the norms' and residual tensors (6 h, replicated), Q, K, the QKV output and the
    attention output (6 h / tp), the SwiGLU's four ``[ffn / tp]`` tensors (a plain MLP's two), fp32
    log-sum-exp and reciprocal stds; and per block the attention mask over all patches of the micro-batch,
    ``[patches, patches]`` in the activation dtype (SDPA turns the boolean block-diagonal mask into an
    additive one). Once: the patch embedding input ``[patches, 3 * 2 * 14 * 14]``, the 2D RoPE cos/sin,
    and the merger (its norm, then its replicated input and two split tensors of the merged width per 4
    patches).
    """
    h, f = vision.hidden_size, vision.ffn_hidden_size
    mlp = (4 if vision.gated_mlp else 2) * f // tp  # SwiGLU's four tensors, a plain MLP's two
    per_patch = (6 * h + 6 * h // tp + mlp) * elem + FP32 * (vision.num_heads // tp + 2)
    block = patches * per_patch + patches * patches * elem
    head_dim = h // vision.num_heads
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    merged = patches // vision.spatial_merge_size**2
    merger = (
        patches * (2 * h * elem + FP32)
        + merged * (vision.merge_hidden + 2 * vision.merge_hidden // tp) * elem
    )
    return vision.depth * block + patches * (patch_dim + 2 * head_dim) * elem + merger


def logits_bytes(tokens: int, vocab: int, tp: int, elem: int) -> int:
    """The vocab-parallel logits ``[batch, seq, vocab / tp]`` the PAPO loss keeps for its backward, plus its
    fp32 per-token statistics (max, log-sum-exp, entropy)."""
    return tokens * (vocab // tp * elem + 3 * FP32)


def loss_chunk_bytes(tokens: int, vocab: int, tp: int, chunk_elements: int) -> int:
    """About five fp32 temporaries of one chunk of ``chunk_elements`` logits, live while the loss's
    forward or backward walks the vocabulary (``megatron_papo.ops.vocab_parallel``)."""
    shard = vocab // tp
    return 5 * min(max(1, chunk_elements // shard), tokens) * shard * FP32


def loss_backward_bytes(tokens: int, vocab: int, tp: int, elem: int, chunk_elements: int) -> int:
    """What the loss's backward adds at its peak on the last stage: the logits' gradient, its copy
    transposed back to ``[seq, batch, vocab / tp]``, and the chunk temporaries."""
    return 2 * tokens * (vocab // tp) * elem + loss_chunk_bytes(tokens, vocab, tp, chunk_elements)
