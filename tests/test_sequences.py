"""Step sequences: padding, next-token labels, response masks and micro-batches with their images."""

import pytest
import torch

from megatron_papo.training.sequences import (
    build_sequences,
    micro_batch,
    micro_batch_indices,
    response_token_values,
)


def _positions(input_ids, grid, attention_mask):
    return (attention_mask.cumsum(-1) - 1).clamp(min=0).expand(3, -1, -1)


def _example():
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7]), torch.tensor([9, 8])]
    responses = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([4, 4, 4])]
    images = [torch.full((4, 3), 1.0), None]
    grids = [torch.tensor([[1, 2, 2]]), None]
    return (
        build_sequences(
            prompts,
            responses,
            pixel_values=[images[0], images[0], images[1]],
            masked_pixel_values=[images[0] * 0, images[0] * 0, None],
            image_grid_thw=[grids[0], grids[0], grids[1]],
            advantages=torch.tensor([0.5, -0.5, 0.0]),
            pad_id=0,
            length=8,
            position_fn=_positions,
        ),
        prompts,
        responses,
    )


def test_labels_and_masks_select_exactly_the_response_tokens():
    seqs, prompts, responses = _example()
    assert seqs.input_ids.shape == (3, 8)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        picked = seqs.labels[i][seqs.loss_mask[i].bool()]
        assert picked.tolist() == r.tolist()  # position t scores token t + 1: exactly the response
        assert int(seqs.attention_mask[i].sum()) == len(p) + len(r)
    # a direct log-prob sum over the response equals the masked sum over label positions
    logits = torch.randn(3, 8, 10)
    lp = torch.log_softmax(logits, -1).gather(-1, seqs.labels.unsqueeze(-1)).squeeze(-1)
    direct = sum(
        float(
            torch.log_softmax(logits[i, len(p) - 1 : len(p) + len(r) - 1], -1)
            .gather(-1, r.unsqueeze(-1))
            .sum()
        )
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
    )
    assert abs(float((lp * seqs.loss_mask).sum()) - direct) < 1e-4


def test_response_token_values_sit_where_the_loss_mask_is():
    """Per-response-token values (an engine's log-probs) land on the label positions of their tokens."""
    seqs, prompts, responses = _example()
    values = [r.float() * 10 for r in responses]
    laid_out = response_token_values(prompts, values, seqs.length)
    assert torch.equal(laid_out != 0, seqs.loss_mask.bool())
    assert torch.equal(laid_out[seqs.loss_mask.bool()], seqs.labels[seqs.loss_mask.bool()].float() * 10)


def test_micro_batches_carry_their_images_in_order():
    seqs, _, _ = _example()
    seqs.token_data.old_log_probs = torch.arange(24.0).view(3, 8)
    batch = micro_batch(seqs, torch.tensor([2, 0]))
    assert batch.input_ids.shape == (2, 8) and batch.position_ids.shape == (3, 2, 8)
    assert torch.equal(batch.pixel_values, seqs.pixel_values[0])  # sequence 2 has no image
    assert torch.equal(batch.token_data.old_log_probs[0], torch.arange(16.0, 24.0))
    masked = micro_batch(seqs, torch.tensor([0, 1]), masked=True)
    assert masked.pixel_values.shape == (8, 3) and float(masked.pixel_values.abs().sum()) == 0
    assert torch.equal(masked.input_ids, micro_batch(seqs, torch.tensor([0, 1])).input_ids)
    assert micro_batch(seqs, torch.tensor([2])).pixel_values is None
    assert [c.tolist() for c in micro_batch_indices(torch.arange(4), 2)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="do not split into micro-batches of 2"):
        list(micro_batch_indices(torch.arange(3), 2))


def test_too_long_or_empty_responses_are_refused():
    with pytest.raises(ValueError, match="does not fit length 4"):
        build_sequences(
            [torch.tensor([1, 2, 3])],
            [torch.tensor([4, 5])],
            [None],
            [None],
            [None],
            torch.zeros(1),
            pad_id=0,
            length=4,
            position_fn=_positions,
        )
    with pytest.raises(ValueError, match="responses must be non-empty"):
        build_sequences(
            [torch.tensor([1])],
            [torch.tensor([], dtype=torch.long)],
            [None],
            [None],
            [None],
            torch.zeros(1),
            pad_id=0,
            length=4,
            position_fn=_positions,
        )
