"""A stand-in for ``megatron-papo train`` that checks the launch: run it where the trainer would run.

    srun -n 4 python tools/launch_check.py train --config examples/configs/tiny_cpu.yaml \
        parallel.tensor_model_parallel_size=2 parallel.pipeline_model_parallel_size=2

It takes the trainer's arguments, reads the ``parallel`` and ``trainer`` sections of the config, brings up
torch.distributed and megatron-core's parallel state from the launcher's variables (``srun`` or
``torchrun``) exactly as the trainer does, then checks that the job works as one:

- a gloo/NCCL all-reduce over the world, over each tensor-parallel and each pipeline group;
- one forward/backward of a tiny megatron-core ``GPTModel`` through ``get_forward_backward_func`` at the
  configured TP x PP (the same schedules the trainer uses).

Rank 0 writes ``launch_check.json`` (what every rank saw) and one ``metrics.jsonl`` step under
``trainer.output_dir``. Any failed check raises, so the job step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from megatron_papo.config import load_train_config
from megatron_papo.parallel import destroy_distributed, initialize_distributed
from megatron_papo.training.metrics import MetricsLogger

SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")
VOCAB, SEQ, MICRO_BATCH, MICRO_BATCHES = 64, 16, 2, 4


def _group_sum(value: float, group) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return float(t.item())


def _tiny_gpt_step(seed: int) -> float:
    """Mean loss of one forward/backward of a 4-layer GPTModel (random tokens); 0.0 off the last stage."""
    config = TransformerConfig(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    generator = torch.Generator().manual_seed(seed + ps.get_data_parallel_rank())
    tokens = torch.randint(0, VOCAB, (MICRO_BATCHES, MICRO_BATCH, SEQ + 1), generator=generator)
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).expand(MICRO_BATCH, 1, SEQ, SEQ)

    def loss_fn(labels: torch.Tensor, output: torch.Tensor):
        loss = output.float().mean()  # GPTModel returns per-token cross-entropy [b, s] given labels
        return loss, {"loss": loss.detach().clone()}  # the schedule scales ``loss`` in place

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch[:, :-1], positions, causal, labels=batch[:, 1:])
        return output, partial(loss_fn, batch)

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(tokens),
        model=[model],
        num_microbatches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    if any(p.grad is None or not torch.isfinite(p.grad).all() for p in model.parameters()):
        raise RuntimeError(f"rank {dist.get_rank()}: a parameter got no finite gradient")
    return sum(float(o["loss"]) for o in outputs) / len(outputs) if outputs else 0.0


def check(config: str | None, overrides: list[str]) -> None:
    cfg = load_train_config(config, overrides)
    torch.set_num_threads(1)
    launch = initialize_distributed(cfg.parallel, seed=cfg.trainer.seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    seen = {
        "rank": rank,
        "world_size": world,
        "local_rank": launch.local_rank,
        "master_addr": launch.master_addr,
        "master_port": launch.master_port,
        "launcher": launch.launcher,
        "host": socket.gethostname(),
        "env": {k: os.environ.get(k) for k in SLURM_KEYS},
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "world_sum": _group_sum(rank + 1, None),
        "tp_sum": _group_sum(rank + 1, ps.get_tensor_model_parallel_group()),
        "pp_sum": _group_sum(rank + 1, ps.get_pipeline_model_parallel_group()),
        "tp_ranks": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
        "pp_ranks": dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
    }
    expected = world * (world + 1) / 2
    if seen["world_sum"] != expected:
        raise RuntimeError(f"rank {rank}: world all-reduce gave {seen['world_sum']}, expected {expected}")
    for name in ("tp", "pp"):
        want = sum(r + 1 for r in seen[f"{name}_ranks"])
        if seen[f"{name}_sum"] != want:
            raise RuntimeError(f"rank {rank}: {name} all-reduce gave {seen[f'{name}_sum']}, expected {want}")
    seen["loss"] = _tiny_gpt_step(cfg.trainer.seed)
    everyone: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(everyone, seen)
    if rank == 0:
        out = cfg.trainer.output_dir
        os.makedirs(out, exist_ok=True)
        tmp = os.path.join(out, "launch_check.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(everyone, f, indent=1)
        os.replace(tmp, os.path.join(out, "launch_check.json"))
        last = max(s["pp_rank"] for s in everyone)
        losses = [s["loss"] for s in everyone if s["pp_rank"] == last]
        logger = MetricsLogger(out, total_steps=1, tensorboard=False)
        logger.log(1, {"launch/world_size": world, "actor/loss": sum(losses) / len(losses)})
        logger.close()
    destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    train = parser.add_subparsers(dest="command", required=True).add_parser("train", help="as the trainer's")
    train.add_argument("--config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args()
    check(args.config, args.overrides)


if __name__ == "__main__":
    main()
