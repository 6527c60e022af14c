"""Log-probs, entropies and KLs of vocab-parallel logits, never gathering the vocabulary.

Logits are sharded on the vocabulary across the tensor-parallel (TP) group: each rank holds
``[tokens, vocab/tp]``, rank ``r`` the columns ``[r * vocab/tp, (r + 1) * vocab/tp)``. With
``z = logits / temperature`` and per-token ``logZ = log sum_v exp(z_v)``:

- ``log_probs_and_entropy``: ``lp = z[target] - logZ`` and ``H = logZ - sum_v p_v z_v``;
- ``full_kl``: ``KL(p || q) = sum_v p_v (z^p_v - z^q_v) - logZ_p + logZ_q``;
- ``kl_estimate``: the per-token sample estimators k1 / k2 / k3 of the reference implementations.

Forward: each chunk of tokens computes local per-token statistics (max, sum of exp relative to the local
max, partial sums); then ONE all-reduce MAX and ONE all-reduce SUM of per-token scalars combine the
shards. Backward recomputes ``p`` chunk by chunk from the saved logits and per-token scalars, with no
communication (the gradients are local to each shard):

    d lp / dz_j = 1[j = target] - p_j          d H / dz_j = -p_j (log p_j + H)
    d KL / dz^p_j = p_j (log p_j - log q_j - KL)     d KL / dz^q_j = q_j - p_j

so the extra memory is a few ``[chunk, vocab/tp]`` temporaries, whatever the number of tokens (the
default chunk holds ``CHUNK_ELEMENTS`` logits). Logits may contain ``-inf`` (masked vocabulary entries);
NaN, ``+inf``, a token with every entry masked, out-of-range token ids and unequal vocabulary shards
are refused with the same error on every TP rank (the checks ride on the two all-reduces).
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


def _check_reduced(name: str, bad: torch.Tensor, mass: torch.Tensor) -> None:
    """Raise (on every rank alike: the inputs are all-reduced) on NaN / +inf or fully masked tokens."""
    for what, rows in (
        ("NaN or +inf (only -inf, a masked entry, is allowed)", bad > 0),
        ("-inf only", mass <= 0),
    ):
        if rows.any():
            tokens = rows.nonzero().flatten()
            raise ValueError(f"{name} holds {what} at token(s) {tokens[:8].tolist()} ({len(tokens)} in all)")


class _LogProbEntropy(torch.autograd.Function):
    """Sums are taken relative to maxes (``z - m``), so large offsets cancel exactly, even in float32."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk_size, group):
        rank, _ = _world(group)
        tokens, shard = logits.shape
        dtype = _compute_dtype(logits)
        lo = rank * shard
        m_local = torch.empty(tokens, dtype=dtype, device=logits.device)
        # sum e, sum e (z - m), z[t] - m, bad; e = exp(z - m) with this shard's max m
        sums = torch.zeros(tokens, 4, dtype=dtype, device=logits.device)
        local_t = targets - lo
        in_shard = (local_t >= 0) & (local_t < shard)
        for rows in _chunks(tokens, chunk_size):
            z = logits[rows].to(dtype) / temperature
            m, sums[rows, 3] = _local_max(z)
            zc = z - m.unsqueeze(-1)
            e = torch.exp(zc)
            m_local[rows] = m
            sums[rows, 0] = e.sum(-1)
            sums[rows, 1] = torch.where(e > 0, e * zc, 0.0).sum(-1)
            picked = zc.gather(-1, local_t[rows].clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
            sums[rows, 2] = torch.where(in_shard[rows], picked, 0.0)
        m_global, factor, vocab = _to_global(m_local.unsqueeze(-1), sums[:, :1], shard, group)
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            raise ValueError(
                f"token ids must be in [0, {vocab}), got range [{int(targets.min())}, {int(targets.max())}]"
            )
        m_global, factor = m_global.squeeze(-1), factor.squeeze(-1)
        shift = torch.where(factor > 0, m_local - m_global, 0.0)
        sums[:, 1] = factor * (sums[:, 1] + sums[:, 0] * shift)
        sums[:, 0] = factor * sums[:, 0]
        owner_shift = torch.where(in_shard, m_local - m_global, 0.0)
        sums[:, 2] = torch.where(in_shard, sums[:, 2] + owner_shift, 0.0)
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        _check_reduced("logits", sums[:, 3], sums[:, 0])
        log_s = torch.log(sums[:, 0])  # logZ = m_global + log_s
        lp = sums[:, 2] - log_s
        entropy = log_s - sums[:, 1] / sums[:, 0]
        ctx.save_for_backward(logits, targets, m_global, log_s, entropy)
        ctx.temperature, ctx.chunk_size, ctx.lo = temperature, chunk_size, lo
        return lp.to(logits.dtype), entropy.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_lp, grad_entropy):
        logits, targets, m_global, log_s, entropy = ctx.saved_tensors
        shard = logits.shape[1]
        dtype = log_s.dtype
        grad = torch.empty_like(logits)
        local_t = targets - ctx.lo
        in_shard = (local_t >= 0) & (local_t < shard)
        g_lp = grad_lp.to(dtype) if grad_lp is not None else torch.zeros_like(log_s)
        g_h = grad_entropy.to(dtype) if grad_entropy is not None else torch.zeros_like(log_s)
        for rows in _chunks(logits.shape[0], ctx.chunk_size):
            z = logits[rows].to(dtype) / ctx.temperature
            log_p = (z - m_global[rows].unsqueeze(-1)) - log_s[rows].unsqueeze(-1)
            p = torch.exp(log_p)
            d_entropy = torch.where(p > 0, -p * (log_p + entropy[rows].unsqueeze(-1)), 0.0)
            g = d_entropy * g_h[rows].unsqueeze(-1) - p * g_lp[rows].unsqueeze(-1)
            hit = torch.where(in_shard[rows], g_lp[rows], 0.0).unsqueeze(-1)
            g.scatter_add_(-1, local_t[rows].clamp(0, shard - 1).unsqueeze(-1), hit)
            grad[rows] = (g / ctx.temperature).to(logits.dtype)
        return grad, None, None, None, None


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p_logits, q_logits, temperature, chunk_size, group):
        tokens, shard = p_logits.shape
        dtype = _compute_dtype(p_logits)
        m_local = torch.empty(tokens, 2, dtype=dtype, device=p_logits.device)
        # sum e_p, sum e_q, sum e_p ((zp - mp) - (zq - mq)), bad p, bad q; relative to this shard's maxes
        sums = torch.zeros(tokens, 5, dtype=dtype, device=p_logits.device)
        for rows in _chunks(tokens, chunk_size):
            zp = p_logits[rows].to(dtype) / temperature
            zq = q_logits[rows].to(dtype) / temperature
            (mp, sums[rows, 3]), (mq, sums[rows, 4]) = _local_max(zp), _local_max(zq)
            zpc, zqc = zp - mp.unsqueeze(-1), zq - mq.unsqueeze(-1)
            ep = torch.exp(zpc)
            m_local[rows, 0], m_local[rows, 1] = mp, mq
            sums[rows, 0], sums[rows, 1] = ep.sum(-1), torch.exp(zqc).sum(-1)
            sums[rows, 2] = torch.where(ep > 0, ep * (zpc - zqc), 0.0).sum(-1)
        m_global, factor, _ = _to_global(m_local, sums[:, :2], shard, group)
        shift = torch.where(factor > 0, m_local - m_global, 0.0)
        sums[:, 2] = factor[:, 0] * (sums[:, 2] + sums[:, 0] * (shift[:, 0] - shift[:, 1]))
        sums[:, :2] = factor * sums[:, :2]
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        _check_reduced("p_logits", sums[:, 3], sums[:, 0])
        _check_reduced("q_logits", sums[:, 4], sums[:, 1])
        log_sp, log_sq = torch.log(sums[:, 0]), torch.log(sums[:, 1])
        kl = sums[:, 2] / sums[:, 0] - log_sp + log_sq
        ctx.save_for_backward(p_logits, q_logits, m_global, log_sp, log_sq, kl)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return kl.to(p_logits.dtype)

    @staticmethod
    def backward(ctx, grad_kl):
        p_logits, q_logits, m_global, log_sp, log_sq, kl = ctx.saved_tensors
        dtype = log_sp.dtype
        g = torch.where(torch.isfinite(kl), grad_kl.to(dtype), 0.0).unsqueeze(-1)
        grad_p, grad_q = torch.empty_like(p_logits), torch.empty_like(q_logits)
        for rows in _chunks(p_logits.shape[0], ctx.chunk_size):
            zp = p_logits[rows].to(dtype) / ctx.temperature
            zq = q_logits[rows].to(dtype) / ctx.temperature
            log_p = zp - m_global[rows, 0:1] - log_sp[rows].unsqueeze(-1)
            log_q = zq - m_global[rows, 1:2] - log_sq[rows].unsqueeze(-1)
            p, q = torch.exp(log_p), torch.exp(log_q)
            finite = torch.isfinite(kl[rows]).unsqueeze(-1) & (p > 0)
            d_p = torch.where(finite, p * (log_p - log_q - kl[rows].unsqueeze(-1)), 0.0)
            grad_p[rows] = (d_p * g[rows] / ctx.temperature).to(p_logits.dtype)
            grad_q[rows] = ((q - p) * g[rows] / ctx.temperature).to(q_logits.dtype)
        return grad_p, grad_q, None, None, None


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
    if targets.shape != logits.shape[:1] or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"targets must be integer [{logits.shape[0]}], got {targets.dtype} {tuple(targets.shape)}"
        )
    rows = _chunk_rows(chunk_size, logits.shape[1])
    return _LogProbEntropy.apply(logits, targets.long(), float(temperature), rows, _tp_group(group))


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
    _check_logits("p_logits", p_logits)
    _check_logits("q_logits", q_logits)
    _check_temperature_chunk(temperature, chunk_size)
    if p_logits.shape != q_logits.shape:
        raise ValueError(
            f"p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} differ in shape"
        )
    rows = _chunk_rows(chunk_size, p_logits.shape[1])
    return _FullKL.apply(p_logits, q_logits, float(temperature), rows, _tp_group(group))


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
