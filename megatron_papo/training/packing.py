"""Packed sequences (THD): a micro-batch's sequences concatenated into one row, no padding between them.

A micro-batch of ``b`` right-padded sequences [b, L] holds ``t`` real tokens (``attention_mask`` 1). Packed,
the model sees one row [1, T]: those ``t`` tokens in sequence order, ``copies`` times (``masked_grad``'s
doubled batch: the originals, then the same tokens with the masked images), then ``pad`` padding tokens
that round ``T`` up to a multiple of the TP size (sequence parallelism splits it). ``cu_seqlens`` bounds
the segments (one per sequence and copy, and one for the tail padding): attention never crosses one
(megatron-core's ``PackedSeqParams``, format ``thd``), and each token keeps its own multimodal RoPE
position. The loss side stays in the padded layout: per-token values computed on the packed tokens
[t] are scattered back to [b, L] (``scatter``), so everything per sequence (advantages, sequence means,
top-p per sample) is unchanged, and nothing vocab-sized is ever padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class Packing:
    """The packed layout of ``b`` sequences of a padded [b, L] micro-batch.

    index: [t] int64, each packed token's flat position ``row * L + column`` in [b, L], in sequence order;
    lengths: [b] int64, tokens per sequence; shape: (b, L); copies: how many times the row holds the
    ``t`` tokens; pad: padding tokens at the end of the row.
    """

    index: torch.Tensor
    lengths: torch.Tensor
    shape: tuple[int, int]
    copies: int = 1
    pad: int = 0

    @classmethod
    def of(cls, attention_mask: torch.Tensor, copies: int = 1, multiple: int = 1) -> Packing:
        """The layout of ``attention_mask`` [b, L] (1 on tokens, right padding), its row ``copies`` times
        and padded to a multiple of ``multiple`` tokens."""
        b, length = attention_mask.shape
        lengths = attention_mask.long().sum(-1)
        index = attention_mask.flatten().nonzero().squeeze(-1)
        total = copies * len(index)
        return cls(index, lengths, (b, length), copies, -total % multiple)

    @property
    def tokens(self) -> int:
        """t: the real tokens of one copy."""
        return len(self.index)

    @property
    def row_length(self) -> int:
        """T: the packed row's length, padding included."""
        return self.copies * self.tokens + self.pad

    def cu_seqlens(self) -> torch.Tensor:
        """[copies * b + 1 (+ 1 with padding)] int32: where each segment of the row starts, then T."""
        segments = [self.lengths] * self.copies + ([torch.tensor([self.pad])] if self.pad else [])
        return torch.nn.functional.pad(torch.cat(segments).cumsum(0), (1, 0)).to(torch.int32)

    def params(self) -> PackedSeqParams:
        """megatron-core's ``PackedSeqParams`` (format ``thd``) of the row, on the index's device."""
        cu_seqlens = self.cu_seqlens().to(self.index.device)
        longest = int(max(int(self.lengths.max()), self.pad))
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """[b, L, ...] -> [t, ...]: the values of the real tokens, in packed order."""
        return values.flatten(0, 1)[self.index]

    def pack(self, values: torch.Tensor, fill: int = 0) -> torch.Tensor:
        """[..., b, L] -> [..., 1, T]: the real tokens ``copies`` times, then ``pad`` x ``fill``."""
        lead = values.shape[:-2]
        tokens = values.reshape(*lead, -1)[..., self.index]
        tail = tokens.new_full((*lead, self.pad), fill)
        return torch.cat([tokens] * self.copies + [tail], dim=-1).unsqueeze(-2)

    def copy(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """[1, T, ...] model output -> [t, ...]: its ``k``-th copy of the real tokens."""
        return logits[0, k * self.tokens : (k + 1) * self.tokens]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """[t] -> [b, L]: per-token values back in the padded layout, 0 on padding (keeps the gradient)."""
        b, length = self.shape
        out = values.new_zeros(b * length)
        return out.index_put((self.index,), values).view(b, length)

    def to(self, device: torch.device | str) -> Packing:
        return Packing(self.index.to(device), self.lengths, self.shape, self.copies, self.pad)


def flat_tokens(
    logits: torch.Tensor, labels: torch.Tensor, packing: Packing | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, vocab/tp], labels [n]) of the tokens a loss reads: ``logits`` [b, s, vocab/tp] and
    ``labels`` [b, s] flattened (n = b * s), or packed ``logits`` [t, vocab/tp] (one ``Packing.copy``)
    with the labels of its tokens (n = t)."""
    if packing is None:
        return logits.reshape(-1, logits.shape[-1]), labels.flatten()
    return logits, packing.gather(labels)


def token_rows(values: torch.Tensor, shape: torch.Size, packing: Packing | None) -> torch.Tensor:
    """[n] per-token values of ``flat_tokens`` -> [b, s] (``shape``), 0 on padding when packed."""
    return values.view(shape) if packing is None else packing.scatter(values)
