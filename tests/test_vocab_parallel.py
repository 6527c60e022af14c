"""Vocab-parallel log-probs, entropies and KLs against float64 single-process math, at TP = 1, 2, 4."""

import pytest
import torch
from multiprocess import run_distributed

from megatron_papo.ops.vocab_parallel import (
    full_kl,
    kl_estimate,
    log_probs_and_entropy,
    log_probs_entropies_and_kl,
)

T, V = 45, 64
TEMPERATURES = (1.0, 0.6)
CHUNKS = (7, None)  # several chunks per call, and the default (one chunk)
DTYPES = (torch.float64, torch.float32)


def _case(dtype: torch.dtype):
    """Random logits with extremes: large magnitudes, -inf entries (a fully masked shard too), ties."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(T, V, generator=g, dtype=torch.float64) * 4
    q = torch.randn(T, V, generator=g, dtype=torch.float64) * 4
    p[1] *= 100  # large magnitudes
    q[2] = p[2] + 1e3  # same distribution, shifted logits
    p[3, : V // 2] = -float("inf")  # a whole TP=2 shard masked for this token
    p[4, ::3] = -float("inf")
    q[4, ::3] = -float("inf")  # q masks where p does, elsewhere finite
    p[5] = 0.0  # uniform
    targets = torch.randint(0, V, (T,), generator=g)
    targets[3] = V - 1
    targets[4] = 1
    weights = torch.randn(5, T, generator=g, dtype=torch.float64)
    return p.to(dtype), q.to(dtype), targets, weights.to(dtype)


def _reference(p, q, targets, weights, temperature):
    """Straight from the formulas, float64, gradients by autograd (-inf as a finite value whose exp is 0)."""
    finite = lambda x: torch.where(torch.isinf(x), torch.full_like(x, -1e5), x)  # noqa: E731
    p = finite(p.double()).requires_grad_()
    q = finite(q.double()).requires_grad_()
    log_p = torch.log_softmax(p / temperature, -1)
    log_q = torch.log_softmax(q / temperature, -1)
    outputs = (
        log_p.gather(-1, targets[:, None]).squeeze(-1),
        -(log_p.exp() * log_p).sum(-1),
        log_q.gather(-1, targets[:, None]).squeeze(-1),
        -(log_q.exp() * log_q).sum(-1),
        (log_p.exp() * (log_p - log_q)).sum(-1),
    )
    sum((w * o).sum() for w, o in zip(weights.double(), outputs, strict=True)).backward()
    return [t.detach() for t in (*outputs, p.grad, q.grad)]


def _ours(dtype, temperature, chunk, combined, rank=0, world=1, group=None):
    """The five outputs and both gradients, from one combined call or from the three separate ops."""
    p, q, targets, weights = _case(dtype)
    cols = slice(rank * V // world, (rank + 1) * V // world)
    p_local = p[:, cols].clone().requires_grad_()
    q_local = q[:, cols].clone().requires_grad_()
    if combined:
        outputs = log_probs_entropies_and_kl(p_local, q_local, targets, temperature, chunk, group)
    else:
        outputs = (
            *log_probs_and_entropy(p_local, targets, temperature, chunk, group),
            *log_probs_and_entropy(q_local, targets, temperature, chunk, group),
            full_kl(p_local, q_local, temperature, chunk, group),
        )
    sum((w * o).sum() for w, o in zip(weights, outputs, strict=True)).backward()
    return [t.detach() for t in (*outputs, p_local.grad, q_local.grad)]


def _all_cases(rank=0, world=1, group=None):
    return {
        (dtype, temperature, chunk, combined): _ours(dtype, temperature, chunk, combined, rank, world, group)
        for dtype in DTYPES
        for temperature in TEMPERATURES
        for chunk in CHUNKS
        for combined in (False, True)
    }


def _check(world: int, rank: int, results) -> None:
    cols = slice(rank * V // world, (rank + 1) * V // world)
    names = ("lp_p", "entropy_p", "lp_q", "entropy_q", "kl", "grad_p", "grad_q")
    for (dtype, temperature, chunk, combined), ours in results.items():
        ref = _reference(*_case(dtype), temperature)
        ref[5], ref[6] = ref[5][:, cols], ref[6][:, cols]
        tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
        where = f"TP={world} rank {rank} {dtype} T={temperature} chunk={chunk} combined={combined}"
        for name, a, b in zip(names, ours, ref, strict=True):
            torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, n=name, w=where: f"{n} {w}: {m}")


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _bad_inputs(rank: int, group) -> dict[str, str]:
    """Bad input on ONE rank of a TP=2 group: every rank must raise the same error (no hang)."""
    logits, targets = torch.randn(6, V // 2, dtype=torch.float64), torch.arange(6)
    nan = logits.clone()
    if rank == 1:
        nan[5, 3] = float("nan")
    masked = logits.clone()
    masked[2] = -float("inf")
    uneven = torch.randn(6, V // 2 + (1 if rank == 0 else -1))
    posinf = logits.clone()
    if rank == 0:
        posinf[4, 0] = float("inf")
    return {
        "nan": _error(lambda: log_probs_and_entropy(nan, targets, group=group)),
        "masked": _error(lambda: log_probs_and_entropy(masked, targets, group=group)),
        "uneven": _error(lambda: log_probs_and_entropy(uneven, targets, group=group)),
        "posinf_q": _error(lambda: full_kl(logits, posinf, group=group)),
        "target": _error(
            lambda: log_probs_and_entropy(logits, torch.tensor([0, 1, 2, 3, 4, V]), group=group)
        ),
    }


def _distributed():
    """World of 4: TP=4 (megatron-core's group) and TP=2 (two groups of 2), then bad inputs at TP=2."""
    import torch.distributed as dist

    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    out = {}
    for world, group in ((4, None), (2, pairs[rank // 2])):
        tp_rank = rank % world
        out[world] = (tp_rank, _all_cases(tp_rank, world, group))
    return out, _bad_inputs(rank % 2, pairs[rank // 2])


def test_single_process_matches_reference():
    _check(1, 0, _all_cases())


def test_tensor_parallel_matches_reference_and_refuses_bad_input():
    per_rank = run_distributed(_distributed, 4, tp=4)
    for results, errors in per_rank:
        for world, (tp_rank, cases) in results.items():
            _check(world, tp_rank, cases)
        assert "logits holds NaN or +inf" in errors["nan"] and "token(s) [5]" in errors["nan"], errors
        assert "-inf only at token(s) [2]" in errors["masked"], errors
        assert "vocab shards differ across the TP group (31 to 33 columns)" in errors["uneven"], errors
        assert "q_logits holds NaN or +inf" in errors["posinf_q"], errors
        assert f"token ids must be in [0, {V})" in errors["target"], errors


def test_sample_estimators():
    log_p = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    log_q = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    x = log_q - log_p
    torch.testing.assert_close(kl_estimate(log_p, log_q, "k1"), log_p - log_q)
    torch.testing.assert_close(kl_estimate(log_p, log_q, "k2"), 0.5 * (log_p - log_q) ** 2)
    torch.testing.assert_close(kl_estimate(log_p, log_q, "k3"), x.exp() - x - 1)
    assert kl_estimate(log_p, log_q, "k3")[2] == 0 and (kl_estimate(log_p, log_q, "k3") >= 0).all()
    # k1 and k3 are unbiased for KL(p || q) when tokens are drawn from p
    g = torch.Generator().manual_seed(0)
    p, q = (
        torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0),
        torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0),
    )
    draws = torch.multinomial(p, 200_000, replacement=True, generator=g)
    exact = float((p * (p / q).log()).sum())
    for kind in ("k1", "k3"):
        assert abs(float(kl_estimate(p.log()[draws], q.log()[draws], kind).mean()) - exact) < 1e-2, kind
    # clamped: the values of the clamped estimate, and finite gradients even where exp(x) overflows
    log_q = torch.tensor([-1.5, -1.0, -0.5, 200.0, -200.0], requires_grad=True)
    log_p = torch.tensor([-1.0, -2.0, -0.5, 0.0, 0.0])
    for kind in ("k1", "k2", "k3"):
        clamped = kl_estimate(log_p, log_q, kind, clamp=10.0)
        plain = kl_estimate(log_p.double(), log_q.double(), kind).clamp(-10, 10)
        torch.testing.assert_close(clamped.double(), plain)
        (grad,) = torch.autograd.grad(clamped.sum(), log_q)
        assert torch.isfinite(grad).all() and (grad[3:] == 0).all() and (grad[:2] != 0).all(), kind
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(log_p, log_q, "k4")
    with pytest.raises(ValueError, match="differ in shape"):
        kl_estimate(log_p, log_q[:2], "k3")


def test_bfloat16_logits_give_float32_statistics():
    p, q, targets, weights = (
        x.to(torch.bfloat16) if x.is_floating_point() else x for x in _case(torch.float32)
    )
    p, q = p.requires_grad_(), q.requires_grad_()
    outputs = log_probs_entropies_and_kl(p, q, targets, 0.6, chunk_size=7)
    assert all(o.dtype == torch.float32 for o in outputs)
    sum((w * o).sum() for w, o in zip(weights, outputs, strict=True)).backward()
    assert p.grad.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16
    ref = _reference(p.detach(), q.detach(), targets, weights, 0.6)  # float64 on the same bf16 values
    for a, b in zip(outputs, ref, strict=False):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    for a, b in zip((p.grad, q.grad), ref[5:], strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-2, atol=1e-3)  # bfloat16 gradients


def test_kl_is_inf_where_q_masks_mass_of_p_and_its_gradient_is_zero():
    p = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.0, 0.0, 0.0, -float("inf")], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    q.requires_grad_()
    kl = full_kl(p, q)
    assert kl[0] == float("inf") and torch.isfinite(kl[1])
    kl.clamp(max=10).sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    assert p.grad[0].abs().sum() == 0 and p.grad[1].abs().sum() > 0


def test_bad_input_is_refused():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 8\)"):
        log_probs_and_entropy(logits, torch.tensor([0, 1, 2, 8]))
    with pytest.raises(ValueError, match=r"logits holds NaN or \+inf .* at token\(s\) \[0\]"):
        log_probs_and_entropy(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"p_logits holds NaN or \+inf"):
        full_kl(torch.tensor([[0.0, float("inf")]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="differ in shape"):
        full_kl(logits, torch.randn(4, 9))
    with pytest.raises(ValueError, match="targets must be integer"):
        log_probs_and_entropy(logits, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be \[tokens, vocab/tp\]"):
        log_probs_and_entropy(torch.randn(2, 4, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        log_probs_and_entropy(logits, torch.zeros(4, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        full_kl(logits, logits, chunk_size=0)


def test_backward_skips_the_masked_logits_gradient_when_they_are_detached():
    """Detached masked logits (the reference default) get no gradient computed: the backward evaluates one
    exp per chunk instead of two, and the gradient of the original logits is unchanged."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountExp(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func is torch.ops.aten.exp.default
            return func(*args, **(kwargs or {}))

    p, q, targets, _ = _case(torch.float64)

    def backward(q_grad: bool):
        x, y = p.clone().requires_grad_(), q.clone().requires_grad_(q_grad)
        lp, h, lq, hq, _ = log_probs_entropies_and_kl(x, y, targets, chunk_size=T)
        loss = (lp + 0.3 * h + 0.2 * lq + 0.1 * hq).sum()
        with CountExp() as counter:
            loss.backward()
        return counter.calls, x.grad, y.grad

    calls_both, grad_both, grad_q = backward(True)
    calls_p, grad_p, no_grad = backward(False)
    assert (calls_both, calls_p) == (2, 1) and no_grad is None and grad_q is not None
    torch.testing.assert_close(grad_p, grad_both, rtol=0, atol=0)
