"""Supervised warm start: cross-entropy on the reference responses (``solution``) of the same shards.

A random or small policy earns no reward, so RL cannot start from it; this trains it to answer in the
reasoning + ``\\boxed{}`` format first. Same parallelism, checkpoints and metrics as ``train``; the end
of the run writes an HF directory (``sft.export_dir``) that an RL config names as ``model.hf_path``.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_papo.loop import StepOutcome, TrainingLoop
from megatron_papo.models import save_hf_directory
from megatron_papo.parallel.device import current_device
from megatron_papo.policy import Policy
from megatron_papo.training.passes import token_log_probs
from megatron_papo.training.sequences import (
    MicroBatch,
    StepSequences,
    build_sequences,
    micro_batch,
    micro_batches,
    padded_length,
)


class SFTTrainer(TrainingLoop):
    """``trainer.steps`` optimizer steps of ``trainer.update_batch_size`` prompts with their solutions."""

    def headline(self) -> str:
        steps, prompts = self.cfg.trainer.steps, self.cfg.trainer.update_batch_size
        return f"sft on the reference solutions, {steps} steps of {prompts} prompts"

    def rolls_out(self) -> bool:
        return self.cfg.eval.interval > 0  # evaluation only

    def build(self) -> None:
        cfg = self.cfg
        self.per_rank_prompts = self.per_rank(cfg.trainer.update_batch_size, 1, "update_batch_size")
        self.policy = Policy(cfg, cfg.trainer.steps, with_engine=self.rolls_out())

    def _batch(self) -> StepSequences:
        prompts = self.prompts.next_prompts(self.per_rank_prompts)
        eos = torch.tensor([self.policy.eos_token_id])
        responses = []
        for p in prompts:
            if not p.solution:
                raise ValueError(f"sft: sample {p.key} of {p.shard} has no 'solution' to train on")
            ids = self.prompts.tokenizer(p.solution, add_special_tokens=False, return_tensors="pt").input_ids[
                0
            ]
            responses.append(torch.cat([ids, eos]))
        inputs = [p.input_ids for p in prompts]
        return build_sequences(
            inputs,
            responses,
            [p.pixel_values for p in prompts],
            [None] * len(prompts),
            [p.image_grid_thw for p in prompts],
            torch.zeros(len(prompts)),
            pad_id=self.policy.pad_token_id,
            length=padded_length(inputs, responses),
            position_fn=self.policy.position_ids,
        )

    def train_step(self) -> StepOutcome:
        start = time.monotonic()
        seqs = self._batch()
        tokens = seqs.loss_mask.sum().reshape(1).to(current_device())
        dist.all_reduce(tokens, group=ps.get_data_parallel_group())
        trainer = self.cfg.trainer
        rows = micro_batches(
            seqs,
            torch.arange(len(seqs)),
            trainer.micro_batch_size,
            trainer.max_tokens_per_micro_batch,
            trainer.pack_sequences,
        )
        batches = [micro_batch(seqs, idx, packed=trainer.pack_sequences) for idx in rows]
        scale = len(batches) * self.dp_size / float(tokens)  # exact token mean over the global batch

        def loss_fn(batch: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
            lp, _ = token_log_probs(logits, batch.labels, 1.0, batch.packing)  # plain NLL
            nll = -(lp * batch.loss_mask).sum()
            return nll * scale, {"actor/loss": nll.detach() / batch.loss_mask.sum().clamp(min=1)}

        result = self.policy.train_step(batches, loss_fn)
        elapsed = time.monotonic() - start
        perf = {"perf/step_s": elapsed, "perf/tokens_per_s": float(tokens) / elapsed}
        return StepOutcome(result.metrics | perf, result.skipped)

    def finish(self) -> None:
        export_dir = os.path.join(self.out_dir, "hf")
        save_hf_directory(self.policy.module, self.cfg.model.hf_path, export_dir)
        self.log(f"SFT weights as an HF directory (an RL run's model.hf_path): {os.path.abspath(export_dir)}")
