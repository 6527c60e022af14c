"""Vocab-parallel log-probs, entropies and KLs against float64 single-process math, at TP = 1, 2, 4."""

import pytest
import torch
from multiprocess import run_distributed

from megatron_papo.ops.vocab_parallel import full_kl, kl_estimate, log_probs_and_entropy

T, V = 45, 64
TEMPERATURES = (1.0, 0.6)


def _case(seed: int, dtype: torch.dtype):
    """Random logits with extremes: large magnitudes, -inf entries (a fully masked shard too), ties."""
    g = torch.Generator().manual_seed(seed)
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
    weights = torch.randn(3, T, generator=g, dtype=torch.float64)
    return p.to(dtype), q.to(dtype), targets, weights.to(dtype)


def _reference(p, q, targets, weights, temperature):
    """Straight from the formulas, float64, gradients by autograd (-inf as a finite value whose exp is 0)."""
    finite = lambda x: torch.where(torch.isinf(x), torch.full_like(x, -1e5), x)  # noqa: E731
    p = finite(p.double()).requires_grad_()
    q = finite(q.double()).requires_grad_()
    log_p = torch.log_softmax(p / temperature, -1)
    log_q = torch.log_softmax(q / temperature, -1)
    lp = log_p.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    w = weights.double()
    (w[0] * lp + w[1] * entropy + w[2] * kl).sum().backward()
    return [t.detach() for t in (lp, entropy, kl, p.grad, q.grad)]


def _ours(p, q, targets, weights, temperature, rank, world, chunk):
    shard = V // world
    cols = slice(rank * shard, (rank + 1) * shard)
    p_local = p[:, cols].clone().requires_grad_()
    q_local = q[:, cols].clone().requires_grad_()
    lp, entropy = log_probs_and_entropy(p_local, targets, temperature, chunk_size=chunk)
    kl = full_kl(p_local, q_local, temperature, chunk_size=chunk)
    (weights[0] * lp + weights[1] * entropy + weights[2] * kl).sum().backward()
    return [t.detach() for t in (lp, entropy, kl, p_local.grad, q_local.grad)]


def _compare_all(world: int):
    from megatron.core import parallel_state as ps

    rank = ps.get_tensor_model_parallel_rank()
    results = []
    for dtype in (torch.float64, torch.float32):
        for temperature in TEMPERATURES:
            for chunk in (7, 4096):
                case = _case(0, dtype)
                results.append((dtype, temperature, rank, _ours(*case, temperature, rank, world, chunk)))
    return results


def _check(world: int, per_rank):
    shard = V // world
    for rank_results in per_rank:
        for dtype, temperature, rank, ours in rank_results:
            ref = _reference(*_case(0, dtype), temperature)
            ref[3], ref[4] = (
                ref[3][:, rank * shard : (rank + 1) * shard],
                ref[4][:, rank * shard : (rank + 1) * shard],
            )
            tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
            for name, a, b in zip(("lp", "entropy", "kl", "grad_p", "grad_q"), ours, ref, strict=True):
                torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, n=name: f"{n} TP={world}: {m}")


def test_single_process_matches_reference():
    _check(
        1,
        [
            [
                (d, t, 0, _ours(*_case(0, d), t, 0, 1, c))
                for d in (torch.float64, torch.float32)
                for t in TEMPERATURES
                for c in (7, 4096)
            ]
        ],
    )


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_reference(world):
    _check(world, run_distributed(_compare_all, world, world, tp=world))


def test_sample_estimators():
    log_p = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    log_q = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    x = log_q - log_p
    torch.testing.assert_close(kl_estimate(log_p, log_q, "k1"), log_p - log_q)
    torch.testing.assert_close(kl_estimate(log_p, log_q, "k2"), 0.5 * (log_p - log_q) ** 2)
    torch.testing.assert_close(kl_estimate(log_p, log_q, "k3"), x.exp() - x - 1)
    assert kl_estimate(log_p, log_q, "k3")[2] == 0 and (kl_estimate(log_p, log_q, "k3") >= 0).all()
    # k3 is unbiased for KL(p || q) when tokens are drawn from p
    g = torch.Generator().manual_seed(0)
    p, q = (
        torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0),
        torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0),
    )
    draws = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = kl_estimate(p.log()[draws], q.log()[draws], "k3").mean()
    assert abs(float(estimate) - float((p * (p / q).log()).sum())) < 5e-3
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(log_p, log_q, "k4")


def test_bad_input_is_refused():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 8\)"):
        log_probs_and_entropy(logits, torch.tensor([0, 1, 2, 8]))
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        log_probs_and_entropy(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        full_kl(torch.tensor([[0.0, float("inf")]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="differ in shape"):
        full_kl(logits, torch.randn(4, 9))
    with pytest.raises(ValueError, match="targets must be integer"):
        log_probs_and_entropy(logits, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be \[tokens, vocab/tp\]"):
        log_probs_and_entropy(torch.randn(2, 4, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        log_probs_and_entropy(logits, torch.zeros(4, dtype=torch.long), temperature=0.0)
