"""A finite loss with a NaN gradient: ``Policy.train_step`` skips the step on every rank.

megatron-core 0.16 steps on NaN gradients in bf16 without a loss scale (clipping with a NaN norm does
nothing), so NaN weights could be saved and pushed to rollout servers. A NaN is injected through a
tensor hook on one parameter of one tensor-parallel rank only (TP=2): both ranks must skip, the weights
stay as they were, and the next clean step updates them.
"""

from __future__ import annotations

import math
import os

import torch
from multiprocess import run_distributed

from megatron_papo.models.tiny import make_tiny_qwen25vl

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples/configs/tiny_cpu.yaml"
)


def _steps(model: str, run_dir: str) -> list[dict]:
    import torch.distributed as dist

    from megatron_papo.config import load_train_config
    from megatron_papo.policy import Policy
    from megatron_papo.training.passes import token_log_probs
    from megatron_papo.training.sequences import build_sequences, micro_batch

    cfg = load_train_config(CONFIG, [f"model.hf_path={model}", f"trainer.output_dir={run_dir}"])
    policy = Policy(cfg, total_optimizer_steps=2, with_ref=False, with_engine=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 400, (6,), generator=g) for _ in range(2)]
    responses = [torch.randint(10, 400, (5,), generator=g) for _ in range(2)]
    seqs = build_sequences(
        prompts,
        responses,
        [None, None],
        [None, None],
        [None, None],
        torch.zeros(2),
        pad_id=policy.pad_token_id,
        length=16,
        position_fn=policy.position_ids,
    )
    batch = micro_batch(seqs, torch.arange(2))

    def loss_fn(batch, logits):  # a finite NLL: only the injected gradient is NaN
        lp, _ = token_log_probs(logits, batch.labels, 1.0)
        loss = -(lp * batch.loss_mask).sum() / batch.loss_mask.sum()
        return loss, {"actor/loss": loss.detach()}

    named = [(n, p) for n, p in policy.model[0].named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    weights = lambda: torch.cat([p.detach().flatten().float() for p in params])  # noqa: E731
    before = weights()
    hook = None
    if dist.get_rank() == 0:  # a language-model weight: text-only prompts give the vision tower none
        target = next(p for n, p in named if "final_layernorm" in n)
        hook = target.register_hook(lambda grad: grad * math.nan)
    poisoned = policy.train_step([batch], loss_fn)
    after_poisoned = weights()
    if hook is not None:
        hook.remove()
    clean = policy.train_step([batch], loss_fn)
    return [
        dict(
            poisoned=poisoned.metrics,
            poisoned_skipped=poisoned.skipped,
            unchanged=torch.equal(before, after_poisoned),
            clean=clean.metrics,
            clean_skipped=clean.skipped,
            moved=not torch.equal(after_poisoned, weights()),
            finite=bool(torch.isfinite(weights()).all()),
        )
    ]


def test_nan_gradient_on_one_rank_skips_the_step_everywhere(tmp_path):
    model = make_tiny_qwen25vl(str(tmp_path / "tiny"))
    for (rank_result,) in run_distributed(_steps, 2, model, str(tmp_path / "run"), tp=2):
        poisoned, clean = rank_result["poisoned"], rank_result["clean"]
        assert math.isfinite(poisoned["actor/loss"])  # the loss alone would not have caught it
        assert rank_result["poisoned_skipped"] and poisoned["actor/nonfinite_grad"] == 1
        assert rank_result["unchanged"], "a skipped step must leave the weights as they were"
        assert not rank_result["clean_skipped"] and clean["actor/nonfinite_grad"] == 0
        assert rank_result["moved"] and rank_result["finite"]
