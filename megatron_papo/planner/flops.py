"""Model FLOPs of one Qwen2.5-VL forward pass from the architecture numbers, for MFU.

Counted, at 2 FLOPs per multiply-add: every parameter of the decoder layers and vision blocks (their few
norm weights and biases included: < 0.1%), the output layer, the patch embedding and the vision merger,
and attention's two batched matmuls (Q K^T and P V): causal in the LM (half of the s x s scores),
within each window or over the whole image in the vision tower. Not counted: norms, activations,
softmax, RoPE and the embedding lookup. A backward pass is twice its forward; recomputation is not
counted (model FLOPs, as in PaLM's and Megatron-LM's MFU).
"""

from __future__ import annotations

from megatron_papo.planner.architectures import LanguageArch, VisionArch


def language_forward_flops(lm: LanguageArch, sequences: int, length: int) -> int:
    """The decoder and output layer over ``sequences`` sequences of ``length`` tokens."""
    weights = lm.num_layers * lm.layer_params(1) + lm.vocab_size * lm.hidden_size
    attention = lm.num_layers * 2 * length * length * lm.q_size  # causal: 4 s^2 q / 2
    return sequences * (2 * length * weights + attention)


def _sum_of_squares(size: int, window: int) -> int:
    """Sum of the squared lengths of the windows that cut ``size`` into pieces of ``window`` (last cut)."""
    return size // window * window**2 + (size % window) ** 2


def vision_forward_flops(vision: VisionArch, grid_h: int, grid_w: int) -> int:
    """The vision tower over one image of ``grid_h`` x ``grid_w`` patches (windows of
    ``vision.window_size`` pixels, whole-image attention in ``vision.fullatt_block_indexes``; DeepStack
    mergers not counted)."""
    patches = grid_h * grid_w
    merge = vision.spatial_merge_size
    window = vision.window_size // merge // vision.patch_size * merge  # in patches, as Qwen cuts them
    full_blocks = len(vision.fullatt_block_indexes)
    embed = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * vision.hidden_size
    merged = patches // merge**2
    m = vision.merge_hidden
    matmuls = patches * (embed + vision.depth * vision.block_params(1)) + merged * (
        m * m + m * vision.out_hidden_size
    )
    windowed_blocks = vision.depth - full_blocks  # none in Qwen3-VL
    windowed = _sum_of_squares(grid_h, window) * _sum_of_squares(grid_w, window) if windowed_blocks else 0
    scores = windowed_blocks * windowed + full_blocks * patches**2
    return 2 * matmuls + 4 * scores * vision.hidden_size
