"""Training checkpoints: exact resume, resume at another TP/DP layout, atomicity and keep-last-K."""

import os

import torch
from multiprocess import run_distributed
from tiny_gpt import tiny_gpt

from megatron_papo.training.checkpointing import CheckpointConfig, latest_step

SEQ, VOCAB = 16, 64


def _build(seed: int):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_papo.training.optimizer import (
        OptimizerConfig,
        build_optimizer,
        distributed_optimizer_enabled,
    )

    torch.manual_seed(seed)
    model = tiny_gpt(VOCAB, SEQ, tied=True)
    cfg = model.config
    opt_cfg = OptimizerConfig(lr=1e-2, lr_schedule="cosine", warmup_steps=1)
    ddp = DistributedDataParallel(
        cfg,
        DistributedDataParallelConfig(
            use_distributed_optimizer=distributed_optimizer_enabled(opt_cfg), grad_reduce_in_fp32=True
        ),
        model,
    )
    cfg.finalize_model_grads_func = finalize_model_grads
    optimizer, scheduler = build_optimizer(opt_cfg, [ddp], total_steps=10)
    return ddp, optimizer, scheduler


def _train_step(ddp, optimizer, scheduler, step: int) -> float:
    """One update on a batch that depends on the step and the DP rank; returns the global mean loss."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (4, SEQ), generator=g)[dp_rank * 4 // dp : (dp_rank + 1) * 4 // dp]
    position_ids = torch.arange(SEQ).expand_as(tokens)

    def forward_step(_, model):
        out = model(tokens, position_ids, None, labels=tokens.roll(-1, dims=1))  # per-token CE [b, s]

        def loss_fn(o):
            loss = o.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_fn

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([0]),
        model=[ddp],
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=tokens.shape[0],
        forward_only=False,
    )
    optimizer.step()
    scheduler.step(1)
    loss = torch.tensor([float(losses[0]["loss"])])
    torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
    return float(loss) / dp


def _save_run(ckpt_dir: str):
    """Train 3 steps saving after 1 and 3 (keep_last=1), then record steps 4-5."""
    from megatron_papo.training.checkpointing import save_checkpoint

    cfg = CheckpointConfig(dir=ckpt_dir, keep_last=1)
    ddp, optimizer, scheduler = _build(0)
    _train_step(ddp, optimizer, scheduler, 1)
    save_checkpoint(cfg, 1, [ddp], optimizer, scheduler, {"position": 10})
    for step in (2, 3):
        _train_step(ddp, optimizer, scheduler, step)
    save_checkpoint(cfg, 3, [ddp], optimizer, scheduler, {"position": 30}, common={"note": "x"})
    listing = sorted(os.listdir(ckpt_dir))
    return listing, [_train_step(ddp, optimizer, scheduler, s) for s in (4, 5)]


def _resume_run(ckpt_dir: str):
    from megatron_papo.training.checkpointing import load_checkpoint

    ddp, optimizer, scheduler = _build(99)  # different init: everything must come from the checkpoint
    common, data_state = load_checkpoint(CheckpointConfig(dir=ckpt_dir), [ddp], optimizer, scheduler)
    return common, data_state, [_train_step(ddp, optimizer, scheduler, s) for s in (4, 5)]


def test_resume_exact_and_at_another_layout(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    saved = run_distributed(_save_run, 2, ckpt, tp=2)
    listing, expected = saved[0]
    assert listing == ["iter_0000003", "latest"]  # keep_last=1 removed iter_1
    assert latest_step(ckpt) == 3

    same = run_distributed(_resume_run, 2, ckpt, tp=2)
    common, data_state, losses = same[0]
    assert common["step"] == 3 and common["note"] == "x"
    assert data_state == {"position": 30}
    assert losses == expected  # bitwise: same layout, same math

    other = run_distributed(_resume_run, 2, ckpt, tp=1)  # TP=1 x DP=2: weights and Adam state resharded
    for r in other:
        assert r[0]["step"] == 3
        torch.testing.assert_close(torch.tensor(r[2]), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000002").mkdir(parents=True)
    (ckpt / "iter_0000004.tmp").mkdir()  # a save that crashed before its rename
    (ckpt / "latest").write_text("2")
    assert latest_step(str(ckpt)) == 2
    (ckpt / "latest").write_text("4")  # names the incomplete save: the complete one is used (test_run_dir.py)
    assert latest_step(str(ckpt)) == 2
    assert latest_step(str(tmp_path / "empty")) is None
