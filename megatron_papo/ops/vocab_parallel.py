"""Log-probs, entropies and KLs of vocab-parallel logits, never gathering the vocabulary.

Logits are sharded on the vocabulary across the tensor-parallel (TP) group: each rank holds
``[tokens, vocab/tp]``, rank ``r`` the columns ``[r * vocab/tp, (r + 1) * vocab/tp)``. With
``z = logits / temperature`` and per-token ``logZ = log sum_v exp(z_v)``:

- ``log_probs_and_entropy``: ``lp = z[target] - logZ`` and ``H = logZ - sum_v p_v z_v``;
- ``full_kl``: ``KL(p || q) = sum_v p_v (z^p_v - z^q_v) - logZ_p + logZ_q``;
- ``log_probs_entropies_and_kl``: both distributions' lp and H and their KL in one pass (the PAPO loss);
- ``kl_estimate``: the per-token sample estimators k1 / k2 / k3 of the reference implementations.

Forward: each chunk of tokens computes local per-token statistics (max, sum of exp relative to the local
max, partial sums); then ONE all-reduce MAX and ONE all-reduce SUM of per-token scalars combine the
shards. Backward recomputes ``p`` chunk by chunk from the saved logits and per-token scalars, with no
communication (the gradients are local to each shard):

    d lp / dz_j = 1[j = target] - p_j          d H / dz_j = -p_j (log p_j + H)
    d KL / dz^p_j = p_j (log p_j - log q_j - KL)     d KL / dz^q_j = q_j - p_j

so the extra memory is a few ``[chunk, vocab/tp]`` float32 temporaries, whatever the number of tokens (the
default chunk holds ``CHUNK_ELEMENTS`` logits). Statistics are computed and returned in float32 (float64
for float64 logits), also from bfloat16 logits; gradients come in the logits' dtype.

Logits may contain ``-inf`` (masked vocabulary entries); NaN, ``+inf``, a token with every entry
masked, out-of-range token ids and unequal vocabulary shards are refused with the same error on every
TP rank (the checks ride on the two all-reduces).
``KL(p || q)`` is ``+inf`` where ``q`` masks an entry that ``p`` does not; such tokens get zero gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MiB per float32 temporary


def _tp_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    if group is not None:
        return group
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_group()
        if parallel_state.model_parallel_is_initialized()
        else None
    )


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if _world(group)[1] > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def _chunk_rows(chunk_size: int | None, shard: int) -> int:
    return chunk_size if chunk_size is not None else max(1, CHUNK_ELEMENTS // max(shard, 1))


def _local_max(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (max, bad) of a chunk z [c, v]: bad (1.0) where the row holds NaN or +inf; the max is 0
    where it is not finite (a row masked on the whole shard: its exp terms are then 0)."""
    m = z.max(dim=-1).values
    bad = ~(m < torch.inf)  # NaN anywhere makes the max NaN; +inf makes it +inf
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m)), bad.to(z.dtype)


def _to_global(
    local_max: torch.Tensor, mass: torch.Tensor, shard: int, group
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All-reduce MAX of the local maxes [T, k] (and of the shard widths, to check they are equal).

    Returns (global max [T, k], exp(local max - global max) [T, k], vocab size): the factor rescales this
    shard's ``sum exp(z - local max)`` terms (0 where ``mass`` [T, k] is 0).
    """
    masked = torch.where(mass > 0, local_max, torch.full_like(local_max, -torch.inf))
    widths = torch.tensor([shard, -shard], dtype=masked.dtype, device=masked.device)
    reduced = _all_reduce(torch.cat([masked.flatten(), widths]), dist.ReduceOp.MAX, group)
    widest, narrowest = int(reduced[-2]), -int(reduced[-1])
    if widest != narrowest:
        raise ValueError(
            f"vocab shards differ across the TP group ({narrowest} to {widest} columns): the (padded) "
            f"vocabulary must divide evenly by the TP size {_world(group)[1]}"
        )
    global_max = reduced[:-2].view_as(masked)
    global_max = torch.where(torch.isinf(global_max), torch.zeros_like(global_max), global_max)
    factor = torch.where(mass > 0, torch.exp(masked - global_max), torch.zeros_like(mass))
    return global_max, factor, shard * _world(group)[1]


class NonFiniteError(ValueError):
    """Logits or log-probs hold NaN / +inf: a diverged model rather than a caller's mistake. The trainer
    turns it into a skipped update (``training.schedule.tolerate_non_finite``)."""


def _check_reduced(name: str, bad: torch.Tensor, mass: torch.Tensor) -> None:
    """Raise (on every rank alike: the inputs are all-reduced) on NaN / +inf or fully masked tokens."""
    for what, rows in (
        ("NaN or +inf (only -inf, a masked entry, is allowed)", bad > 0),
        ("-inf only", mass <= 0),
    ):
        if rows.any():
            tokens = rows.nonzero().flatten()
            error = NonFiniteError if what.startswith("NaN") else ValueError
            raise error(f"{name} holds {what} at token(s) {tokens[:8].tolist()} ({len(tokens)} in all)")


def _shard_sums(z: torch.Tensor, local_t: torch.Tensor, in_shard: torch.Tensor):
    """One distribution's statistics on a chunk z [c, v] of this shard, relative to its local max m:
    (m [c], e = exp(z - m) [c, v], z - m [c, v], [sum e, sum e (z - m), (z - m)[target], bad] [c, 4])."""
    m, bad = _local_max(z)
    zc = z - m.unsqueeze(-1)
    e = torch.exp(zc)
    picked = zc.gather(-1, local_t.unsqueeze(-1)).squeeze(-1)
    sums = torch.stack(
        [e.sum(-1), torch.where(e > 0, e * zc, 0.0).sum(-1), torch.where(in_shard, picked, 0.0), bad], dim=-1
    )
    return m, e, zc, sums


def _globalize(sums: torch.Tensor, factor: torch.Tensor, shift: torch.Tensor, in_shard: torch.Tensor) -> None:
    """Rescale one distribution's [T, 4] sums from this shard's max to the global max, in place:
    ``factor`` = exp(m_local - m_global), ``shift`` = m_local - m_global (both [T])."""
    sums[:, 1] = factor * (sums[:, 1] + sums[:, 0] * shift)
    sums[:, 0] = factor * sums[:, 0]
    sums[:, 2] = torch.where(in_shard, sums[:, 2] + shift, 0.0)


class _VocabStats(torch.autograd.Function):
    """Per-token (lp, H) of p, and with q also (lp_q, H_q, KL(p || q)), in one pass over the chunks.

    Sums are taken relative to maxes (``z - m``), so large offsets cancel exactly, even in float32. The
    backward writes each logit gradient once: per token, with scalars a, b, c, a_q, b_q,
        dL/dz^p = p (a + b log p + c log q) + g_lp 1[target],    dL/dz^q = q (a_q + b_q log q) - g_kl p + ...
    """

    @staticmethod
    def forward(ctx, p_logits, q_logits, targets, temperature, chunk_size, group):
        rank, _ = _world(group)
        tokens, shard = p_logits.shape
        dtype, device = _compute_dtype(p_logits), p_logits.device
        k = 1 if q_logits is None else 2
        local_t = targets - rank * shard
        in_shard = (local_t >= 0) & (local_t < shard)
        local_t = local_t.clamp(0, shard - 1)
        m_local = torch.empty(tokens, k, dtype=dtype, device=device)
        sums = torch.zeros(tokens, k, 4, dtype=dtype, device=device)
        cross = torch.zeros(tokens, dtype=dtype, device=device)  # sum e_p ((zp - mp) - (zq - mq))
        for rows in _chunks(tokens, chunk_size):
            z = p_logits[rows].to(dtype) / temperature
            m_local[rows, 0], e_p, zpc, sums[rows, 0] = _shard_sums(z, local_t[rows], in_shard[rows])
            if q_logits is not None:
                z = q_logits[rows].to(dtype) / temperature
                m_local[rows, 1], _, zqc, sums[rows, 1] = _shard_sums(z, local_t[rows], in_shard[rows])
                cross[rows] = torch.where(e_p > 0, e_p * (zpc - zqc), 0.0).sum(-1)
        m_global, factor, vocab = _to_global(m_local, sums[..., 0], shard, group)
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            raise ValueError(
                f"token ids must be in [0, {vocab}), got range [{int(targets.min())}, {int(targets.max())}]"
            )
        shift = torch.where(factor > 0, m_local - m_global, 0.0)
        if q_logits is not None:
            cross = factor[:, 0] * (cross + sums[:, 0, 0] * (shift[:, 0] - shift[:, 1]))
        for i in range(k):
            _globalize(sums[:, i], factor[:, i], shift[:, i], in_shard)
        reduced = _all_reduce(
            torch.cat([sums.flatten(1), cross.unsqueeze(-1)], dim=-1), dist.ReduceOp.SUM, group
        )
        sums, cross = reduced[:, :-1].view(tokens, k, 4), reduced[:, -1]
        for i, name in enumerate(("p_logits", "q_logits")[:k]):
            _check_reduced(name, sums[:, i, 3], sums[:, i, 0])
        log_s = torch.log(sums[..., 0])  # [T, k]; logZ = m_global + log_s
        lp = sums[..., 2] - log_s
        entropy = log_s - sums[..., 1] / sums[..., 0]
        kl = cross / sums[:, 0, 0] - log_s[:, 0] + log_s[:, 1] if q_logits is not None else None
        ctx.save_for_backward(p_logits, q_logits, local_t, in_shard, m_global, log_s, entropy, kl)
        ctx.set_materialize_grads(False)  # unused outputs get None: their terms are skipped
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        out = [lp[:, 0], entropy[:, 0]] + ([lp[:, 1], entropy[:, 1], kl] if q_logits is not None else [])
        return tuple(out)  # float32 (float64 for float64 logits), even from bfloat16 logits

    @staticmethod
    def backward(ctx, *grads):
        p_logits, q_logits, local_t, in_shard, m_global, log_s, entropy, kl = ctx.saved_tensors
        # q's gradient only when q asks for one (masked logits are detached in the reference default)
        grad_q_needed = q_logits is not None and ctx.needs_input_grad[1]
        if q_logits is not None and not grad_q_needed and grads[4] is None:
            q_logits = None  # nor does p's gradient read q: the KL output is unused
        zero = torch.zeros_like(log_s[:, 0])
        g_lp, g_h, g_lq, g_hq, g_kl = (
            zero if g is None else g.to(zero.dtype) for g in (grads + (None,) * 3)[:5]
        )
        offset = m_global + log_s  # [T, k]: log p = z - offset
        if q_logits is None:
            h_q, offset_q, kl = zero, zero, zero
        else:  # tokens with KL = +inf (q masks an entry p does not) get no KL gradient
            h_q, offset_q = entropy[:, 1], offset[:, 1]
            g_kl = torch.where(torch.isfinite(kl), g_kl, 0.0)
            kl = torch.where(torch.isfinite(kl), kl, 0.0)
        # dL/dz^p = p (a + b log p + c log q) + g_lp 1[t];  dL/dz^q = q (a_q + b_q log q) - g_kl p + g_lq 1[t]
        coef = torch.stack(
            [
                -g_lp - g_h * entropy[:, 0] - g_kl * kl,
                g_kl - g_h,
                -g_kl,
                -g_lq - g_hq * h_q + g_kl,
                -g_hq,
                offset[:, 0],
                offset_q,
            ],
            dim=-1,
        )
        hits = torch.where(in_shard.unsqueeze(-1), torch.stack([g_lp, g_lq], dim=-1), 0.0)
        grad_p = torch.empty_like(p_logits)
        grad_q = torch.empty_like(q_logits) if grad_q_needed else None
        for rows in _chunks(p_logits.shape[0], ctx.chunk_size):
            a, b, c, a_q, b_q, off_p, off_q = coef[rows].unsqueeze(-1).unbind(1)  # each [chunk, 1]
            target = local_t[rows].unsqueeze(-1)
            log_p = p_logits[rows].to(coef.dtype) / ctx.temperature - off_p
            p = torch.exp(log_p)
            inner = a + b * log_p
            if q_logits is not None:
                log_q = q_logits[rows].to(coef.dtype) / ctx.temperature - off_q
                q = torch.exp(log_q)
                inner = inner + c * torch.where(q > 0, log_q, 0.0)
                if grad_q is not None:
                    g = torch.where(q > 0, q * (a_q + b_q * log_q), 0.0) + c * p
                    g.scatter_add_(-1, target, hits[rows, 1:])
                    grad_q[rows] = (g / ctx.temperature).to(grad_q.dtype)
            g = torch.where(p > 0, p * inner, 0.0).scatter_add_(-1, target, hits[rows, :1])
            grad_p[rows] = (g / ctx.temperature).to(grad_p.dtype)
        return grad_p, grad_q, None, None, None, None


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name} must be [tokens, vocab/tp], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {logits.dtype}")


def _check_temperature_chunk(temperature: float, chunk_size: int | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_targets(targets: torch.Tensor, tokens: int) -> torch.Tensor:
    if targets.shape != (tokens,) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be integer [{tokens}], got {targets.dtype} {tuple(targets.shape)}")
    return targets.long()


def _check_pair(p_logits: torch.Tensor, q_logits: torch.Tensor) -> None:
    _check_logits("p_logits", p_logits)
    _check_logits("q_logits", q_logits)
    if p_logits.shape != q_logits.shape:
        raise ValueError(
            f"p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} differ in shape"
        )


def log_probs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [T], entropy [T]) of ``softmax(logits / temperature)`` in one pass.

    logits: [T, vocab/tp] (this rank's vocabulary shard); targets: [T] global token ids.
    ``chunk_size``: tokens per chunk (default: ``CHUNK_ELEMENTS / (vocab/tp)``).
    ``group``: the TP group (default: megatron-core's, or a single process).
    """
    _check_logits("logits", logits)
    _check_temperature_chunk(temperature, chunk_size)
    targets = _check_targets(targets, logits.shape[0])
    rows = _chunk_rows(chunk_size, logits.shape[1])
    return _VocabStats.apply(logits, None, targets, float(temperature), rows, _tp_group(group))


def log_probs_entropies_and_kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lp_p, H_p, lp_q, H_q, KL(p || q)), each [T], of two vocab-sharded distributions in one pass.

    p_logits, q_logits: [T, vocab/tp] (original-image and masked-image logits); targets: [T]. Cheaper than
    the separate calls: each logit tensor is read once per pass and its gradient written once.
    """
    _check_pair(p_logits, q_logits)
    _check_temperature_chunk(temperature, chunk_size)
    targets = _check_targets(targets, p_logits.shape[0])
    rows = _chunk_rows(chunk_size, p_logits.shape[1])
    return _VocabStats.apply(p_logits, q_logits, targets, float(temperature), rows, _tp_group(group))


def full_kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Exact ``KL(p || q)`` [T] over the whole vocabulary; gradients flow to both logits.

    p_logits, q_logits: [T, vocab/tp] (e.g. original-image and masked-image logits).
    """
    _check_pair(p_logits, q_logits)
    _check_temperature_chunk(temperature, chunk_size)
    targets = torch.zeros(p_logits.shape[0], dtype=torch.long, device=p_logits.device)
    rows = _chunk_rows(chunk_size, p_logits.shape[1])
    return _VocabStats.apply(p_logits, q_logits, targets, float(temperature), rows, _tp_group(group))[4]


KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(
    log_p: torch.Tensor, log_q: torch.Tensor, kind: KLEstimator, clamp: float | None = None
) -> torch.Tensor:
    """Per-token sample estimate of ``KL(p || q)`` from log-probs of the sampled tokens (drawn from p).

    With ``x = log_q - log_p``: k1 = -x, k2 = x^2 / 2 ("mse"), k3 = exp(x) - x - 1 ("low_var_kl").
    ``clamp``: clamp the estimate to ``[-clamp, clamp]`` (the reference clamps k3 to 10). ``x`` is first
    clamped to ``+-(clamp + 1)``, where every estimator is already saturated: the values and gradients are
    those of the clamped estimate, but ``exp(x)`` cannot overflow (its gradient would be ``0 * inf``).
    Shapes: any, equal for both; the result has the same shape.
    """
    if log_p.shape != log_q.shape:
        raise ValueError(f"log_p {tuple(log_p.shape)} and log_q {tuple(log_q.shape)} differ in shape")
    if kind not in ("k1", "k2", "k3"):
        raise ValueError(f"unknown KL estimator {kind!r}; choose k1, k2 or k3")
    x = log_q - log_p
    if clamp is not None:
        x = x.clamp(-(clamp + 1), clamp + 1)
    if kind == "k1":
        kl = -x
    elif kind == "k2":
        kl = 0.5 * x * x
    else:
        kl = torch.exp(x) - x - 1
    return kl.clamp(-clamp, clamp) if clamp is not None else kl
