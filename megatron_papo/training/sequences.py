"""Prompt + response sequences of one RL step, padded to one length, and their micro-batches.

Sequence ``i`` is ``prompt(i) + response(i)`` right-padded to ``L``. Log-probs live at the position that
predicts a token: ``logits[:, t]`` scores ``labels[:, t] = input_ids[:, t + 1]``, and ``loss_mask[:, t]``
is 1 where that token is a response token (EOS included). Per-token tensors are ``[N, L]`` in this layout.
Each sequence keeps references to its prompt's images (original and masked): the ``n`` responses of a
prompt share one tensor, and a micro-batch concatenates the images of its sequences in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, TypeVar

import torch
from megatron.core import parallel_state as ps

from megatron_papo.training.packing import Packing

if TYPE_CHECKING:
    from megatron_papo.objectives.registry import Prepared


@dataclass
class TokenData:
    """Per-token values of a step's sequences, each [N, L] in ``build_sequences``' layout (at the positions
    where ``loss_mask`` is 1), None until computed. They live on the last pipeline stage only.

    old_log_probs: the pre-update policy's; masked_log_probs: the same with the masked images (no
    gradient: PAPO's reference default); ref_log_probs: the reference model's; rollout_log_probs: the
    rollout engine's; rollout_is_weights: truncated importance weights pi_old / pi_rollout.
    """

    old_log_probs: torch.Tensor | None = None
    masked_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    rollout_log_probs: torch.Tensor | None = None
    rollout_is_weights: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> TokenData:
        """The rows ``index`` ([b] int64) of every computed value."""
        return map_tensors(self, lambda x: x[index])


T = TypeVar("T")


def map_tensors(obj: T, fn: Callable[[torch.Tensor], torch.Tensor]) -> T:
    """A copy of dataclass ``obj`` with ``fn`` applied to every tensor field (None fields stay None)."""
    values = {f.name: getattr(obj, f.name) for f in fields(obj)}
    return replace(obj, **{k: fn(v) for k, v in values.items() if isinstance(v, torch.Tensor)})


@dataclass
class StepSequences:
    """Everything per sequence that the passes over the policy need.

    input_ids, attention_mask, labels: [N, L] int64; loss_mask: [N, L] float32; position_ids: [3, N, L];
    pixel_values / masked_pixel_values: per sequence [n_patches_i, 3*2*14*14] (or None: text only);
    image_grid_thw: per sequence [n_images_i, 3] (or None); advantages: [N]; sft_weights: [N] (1 on
    correct rollouts, for the SFT term) or None. Per-token tensors filled by
    the trainer (old / masked / reference log-probs) are [N, L] and live in ``token_data``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: list[torch.Tensor | None]
    masked_pixel_values: list[torch.Tensor | None]
    image_grid_thw: list[torch.Tensor | None]
    advantages: torch.Tensor
    sft_weights: torch.Tensor | None = None
    token_data: TokenData = field(default_factory=TokenData)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


PositionFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def build_sequences(
    prompts: list[torch.Tensor],
    responses: list[torch.Tensor],
    pixel_values: list[torch.Tensor | None],
    masked_pixel_values: list[torch.Tensor | None],
    image_grid_thw: list[torch.Tensor | None],
    advantages: torch.Tensor,
    pad_id: int,
    length: int,
    position_fn: PositionFn,
) -> StepSequences:
    """Right-pad ``prompt + response`` pairs to ``length``.

    prompts[i]: [P_i], responses[i]: [R_i] (non-empty); ``position_fn(input_ids [1, L], grid [n, 3] | None,
    attention_mask [1, L]) -> [3, 1, L]`` gives the multimodal RoPE positions of one sequence.
    """
    n = len(prompts)
    if not (len(responses) == len(pixel_values) == len(masked_pixel_values) == len(image_grid_thw) == n):
        raise ValueError(
            "build_sequences: prompts, responses and image lists must have one entry per sequence"
        )
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(n, length, dtype=torch.long)
    loss_mask = torch.zeros(n, length, dtype=torch.float32)
    position_ids = torch.zeros(3, n, length, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        total = len(p) + len(r)
        if len(r) == 0 or total > length:
            raise ValueError(
                f"sequence {i}: prompt {len(p)} + response {len(r)} tokens does not fit "
                f"length {length} (responses must be non-empty)"
            )
        input_ids[i, :total] = torch.cat([p, r])
        attention_mask[i, :total] = 1
        loss_mask[i, len(p) - 1 : total - 1] = 1.0  # positions predicting the response tokens
        position_ids[:, i : i + 1] = position_fn(
            input_ids[i : i + 1], image_grid_thw[i], attention_mask[i : i + 1]
        )
    labels = torch.cat([input_ids[:, 1:], torch.full((n, 1), pad_id, dtype=torch.long)], dim=1)
    return StepSequences(
        input_ids,
        attention_mask,
        labels,
        loss_mask,
        position_ids,
        list(pixel_values),
        list(masked_pixel_values),
        list(image_grid_thw),
        advantages.float(),
    )


def response_token_values(
    prompts: list[torch.Tensor], values: list[torch.Tensor], length: int
) -> torch.Tensor:
    """Per-response-token ``values[i]`` [R_i] laid out as ``build_sequences``' per-token tensors [N, L]:
    at the positions that predict the response tokens (where ``loss_mask`` is 1), 0 elsewhere."""
    out = torch.zeros(len(prompts), length, dtype=torch.float32)
    for i, (p, v) in enumerate(zip(prompts, values, strict=True)):
        out[i, len(p) - 1 : len(p) - 1 + len(v)] = v
    return out


def padded_length(prompts: list[torch.Tensor], responses: list[torch.Tensor]) -> int:
    """The longest prompt + response, rounded up to a multiple of 8 x TP (sequence-parallel splits it)."""
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    multiple = 8 * ps.get_tensor_model_parallel_world_size()
    return -(-longest // multiple) * multiple


def _cat_images(images: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [x for x in images if x is not None]
    return torch.cat(present) if present else None


@dataclass
class MicroBatch:
    """One micro-batch of ``b`` sequences: the model inputs and the loss's per-sequence data.

    input_ids, attention_mask: [b, L] ([2b, L] when doubled: the original images' sequences, then the same
    tokens with the masked images); position_ids: [3, b, L] (likewise [3, 2b, L]); pixel_values:
    [sum n_patches, 3*2*14*14] | None; image_grid_thw: [sum n_images, 3] | None; labels, loss_mask:
    [b, L]; advantages: [b]; sft_weights: [b] | None; token_data: each value [b, L]; prepared: this
    micro-batch's rows of the objective's ``prepare`` (the update pass, last pipeline stage) or None.
    Packed (``packing`` set, ``pack``): input_ids, attention_mask [1, T] and position_ids [3, 1, T] hold
    the sequences' tokens (twice when doubled) in one row; everything else keeps the [b, L] layout.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    labels: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    sft_weights: torch.Tensor | None = None
    token_data: TokenData = field(default_factory=TokenData)
    prepared: Prepared | None = None
    packing: Packing | None = None

    def pack(self, copies: int = 1) -> MicroBatch:
        """This micro-batch with its model inputs packed (``training.packing``): the tokens ``copies``
        times (2: ``update_micro_batch``'s doubled batch, whose images are already doubled), padded to a
        multiple of the TP size."""
        packing = Packing.of(self.attention_mask, copies, ps.get_tensor_model_parallel_world_size())
        return replace(
            self,
            input_ids=packing.pack(self.input_ids),
            attention_mask=packing.pack(self.attention_mask),
            position_ids=packing.pack(self.position_ids),
            packing=packing,
        )

    def to(self, device: torch.device | str) -> MicroBatch:
        """Every tensor, ``token_data``'s and ``prepared``'s included, on ``device``."""

        def move(x: torch.Tensor) -> torch.Tensor:
            return x.to(device, non_blocking=True)

        batch = map_tensors(self, move)
        batch.token_data = map_tensors(self.token_data, move)
        if self.prepared is not None:
            batch.prepared = map_tensors(self.prepared, move)
        if self.packing is not None:
            batch.packing = self.packing.to(device)
        return batch


def micro_batch(
    seqs: StepSequences, index: torch.Tensor, masked: bool = False, packed: bool = False
) -> MicroBatch:
    """The sequences ``index`` ([b] int64), in that order; ``masked``: with the masked images instead of
    the originals (same tokens and positions); ``packed``: the model inputs packed (``MicroBatch.pack``)."""
    idx = index.tolist()
    images = seqs.masked_pixel_values if masked else seqs.pixel_values
    batch = MicroBatch(
        input_ids=seqs.input_ids[index],
        attention_mask=seqs.attention_mask[index],
        position_ids=seqs.position_ids[:, index],
        pixel_values=_cat_images([images[i] for i in idx]),
        image_grid_thw=_cat_images([seqs.image_grid_thw[i] for i in idx]),
        labels=seqs.labels[index],
        loss_mask=seqs.loss_mask[index],
        advantages=seqs.advantages[index],
        sft_weights=seqs.sft_weights[index] if seqs.sft_weights is not None else None,
        token_data=seqs.token_data.select(index),
    )
    return batch.pack() if packed else batch


def update_micro_batch(
    seqs: StepSequences, index: torch.Tensor, with_masked: bool, packed: bool = False
) -> MicroBatch:
    """``micro_batch`` for the update pass; ``with_masked`` (``masked_grad``): the model inputs doubled,
    the original images' sequences then the same tokens with the masked images, in one forward."""
    batch = micro_batch(seqs, index)
    if not with_masked:
        return batch.pack() if packed else batch
    masked = micro_batch(seqs, index, masked=True)
    if batch.pixel_values is not None:
        batch.pixel_values = torch.cat([batch.pixel_values, masked.pixel_values])
        batch.image_grid_thw = torch.cat([batch.image_grid_thw, masked.image_grid_thw])
    if packed:
        return batch.pack(copies=2)
    batch.input_ids = torch.cat([batch.input_ids, masked.input_ids])
    batch.attention_mask = torch.cat([batch.attention_mask, masked.attention_mask])
    batch.position_ids = torch.cat([batch.position_ids, masked.position_ids], dim=1)
    return batch


def token_budget_bins(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Positions of ``lengths`` in bins of at most ``max_tokens`` tokens (a longer sequence alone), few
    and balanced: longest first (ties: earlier first), each into the least-loaded bin that fits it, else a
    new one. Each bin lists its positions in increasing order; bins ordered by their first position.
    Deterministic: it depends on the lengths only."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if loads[b] + lengths[i] <= max_tokens]
        if fits:
            target = min(fits, key=lambda b: (loads[b], b))
        else:
            target = len(bins)
            bins.append([])
            loads.append(0)
        bins[target].append(i)
        loads[target] += lengths[i]
    return sorted(sorted(b) for b in bins)


def micro_batches(
    seqs: StepSequences, order: torch.Tensor, micro_batch_size: int, max_tokens: int = 0, packed: bool = False
) -> list[torch.Tensor]:
    """The micro-batches of the sequences ``order`` ([n] indices): ``micro_batch_indices``, or with
    ``max_tokens`` > 0 (packed micro-batches only) ``token_budget_bins`` of their prompt + response
    tokens, each micro-batch in ``order``'s order."""
    if not max_tokens:
        return list(micro_batch_indices(order, micro_batch_size))
    if not packed:
        raise ValueError("micro-batches by token budget need packed sequences (trainer.pack_sequences)")
    lengths = seqs.attention_mask[order].sum(-1).tolist()
    return [order[torch.tensor(b)] for b in token_budget_bins(lengths, max_tokens)]


def micro_batch_indices(order: torch.Tensor, micro_batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive chunks of ``order`` ([n] sequence indices), ``micro_batch_size`` each.

    Pipeline schedules exchange activations of one fixed shape, so ``n`` must be a multiple of it.
    """
    if len(order) % micro_batch_size:
        raise ValueError(f"{len(order)} sequences do not split into micro-batches of {micro_batch_size}")
    for start in range(0, len(order), micro_batch_size):
        yield order[start : start + micro_batch_size]
