"""The PAPO training loop: rollout -> rewards -> advantages -> log-probs -> updates -> weight sync.

One step, on every rank:

1. **Prompts**: each data-parallel (DP) rank reads its own prompts; the tensor/pipeline ranks of a DP rank
   read the same ones. Each prompt gets one masked copy of its images (seeded by step and prompt id).
2. **Rollout**: the prompts of a DP rank are spread over its model-parallel ranks, each generates ``n``
   responses per prompt with the rollout engine, and the results are exchanged inside the group.
3. **Rewards and advantages**: GRPO group normalisation; DAPO drops groups whose accuracy is all equal
   and samples more prompts until the batch is full (``algorithm.max_tries`` rounds).
4. **Log-probs without gradient**: the pre-update policy (old), the masked images (the reference
   default, unless ``algorithm.masked_grad``) and the reference model (when its KL term is on), through
   megatron-core's forward-only schedule.
5. **Updates**: ``ppo_epochs`` passes over shuffled mini-batches, each through the forward-backward
   schedule with the PAPO loss on the last pipeline stage, then DDP gradient reduction, clipping and one
   optimizer step. With ``masked_grad`` a micro-batch carries the original and masked images together.
6. **Weight sync** of the new policy into the rollout engine, metrics, checkpoint.

With an engine that reports log-probs (vLLM servers) the gap between its log-probs and the trainer's
pre-update ones is logged each step (``rollout/logprob_mismatch``), and ``rollout.tis_cap`` turns on the
truncated importance-sampling correction of the policy-gradient term.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_papo.data.encode import EncodedPrompt
from megatron_papo.papo.advantages import dynamic_sampling_keep, grpo_advantages
from megatron_papo.papo.loss import papo_loss
from megatron_papo.parallel.device import current_device
from megatron_papo.policy import Policy
from megatron_papo.rewards.registry import RewardOutput
from megatron_papo.rollout.correction import logprob_mismatch, truncated_importance_weights
from megatron_papo.rollout.distributed import generate_in_model_parallel_group
from megatron_papo.rollout.engine import RolloutRequest
from megatron_papo.training.hacking import HackingDetector
from megatron_papo.training.loop import TrainingLoop
from megatron_papo.training.schedule import tolerate_non_finite
from megatron_papo.training.sequences import (
    StepSequences,
    build_sequences,
    micro_batch,
    micro_batch_indices,
    padded_length,
    response_token_values,
)


@dataclass
class Group:
    """One prompt, its masked images and its ``n`` scored responses (with the engine's log-probs)."""

    prompt: EncodedPrompt
    masked_pixel_values: torch.Tensor | None
    responses: list[torch.Tensor]
    finished: list[bool]
    rewards: list[RewardOutput]
    logprobs: list[torch.Tensor | None]


def prompt_seed(seed: int, step: int, uid: str) -> int:
    """A sampling seed that depends on the run, the step and the prompt, not on the parallel layout."""
    digest = hashlib.sha256(f"{seed}/{step}/{uid}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


class Trainer(TrainingLoop):
    """PAPO / GRPO / DAPO: ``trainer.steps`` steps of rollout and policy updates."""

    def build(self) -> None:
        cfg = self.cfg
        self.prompts_per_rank = self.per_rank(
            cfg.trainer.rollout_batch_size, cfg.rollout.n, "rollout_batch_size"
        )
        self.update_prompts_per_rank = self.per_rank(
            cfg.trainer.update_batch_size, cfg.rollout.n, "update_batch_size"
        )
        updates = (
            cfg.trainer.steps
            * cfg.trainer.ppo_epochs
            * (cfg.trainer.rollout_batch_size // cfg.trainer.update_batch_size)
        )
        self.policy = Policy(cfg, updates, with_ref=cfg.algorithm.uses_ref_kl, with_engine=True)
        self.detector = HackingDetector(cfg.logging.hacking_detector)

    def after_step(self, metrics: dict[str, float]) -> bool:
        if not self.detector.update(metrics):
            return False
        metrics["papo/hacking_flag"] = 1.0
        action = self.cfg.logging.hacking_detector.action
        self.log(
            f"step {self.step}: KL_prc hacking suspected (KL_prc {metrics['papo/kl_prc']:.4g}, both "
            f"entropies and high-side clipping up); action: {action}"
        )
        return action == "stop"

    def extra_state(self) -> dict:
        return {"detector": self.detector.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])

    # ---------------------------------------------------------------- rollout, rewards, advantages

    def _rollout(self, prompts: list[EncodedPrompt]) -> list[Group]:
        """``n`` scored responses per prompt, generated by this DP rank's model-parallel ranks together."""
        requests = [
            RolloutRequest(
                p.input_ids,
                p.pixel_values,
                p.image_grid_thw,
                seed=prompt_seed(self.cfg.trainer.seed, self.step, p.uid),
                prompt_text=p.prompt_text,
                images=p.images,
            )
            for p in prompts
        ]
        outputs = generate_in_model_parallel_group(self.policy.engine, requests, self.cfg.rollout.n)
        groups = []
        for prompt, rollouts in zip(prompts, outputs, strict=True):
            responses = [r.response_ids for r in rollouts]
            texts = self.prompts.tokenizer.batch_decode(responses, skip_special_tokens=True)
            groups.append(
                Group(
                    prompt=prompt,
                    masked_pixel_values=self.prompts.mask_images(prompt, self.step),
                    responses=responses,
                    finished=[r.finished for r in rollouts],
                    rewards=[self.prompts.reward_fn(t, prompt.answer, prompt.answer_type) for t in texts],
                    logprobs=[r.logprobs for r in rollouts],
                )
            )
        return groups

    def _sample_groups(self) -> tuple[list[Group], dict[str, float]]:
        """This DP rank's groups for the step (DAPO: only informative groups, refilled)."""
        algo = self.cfg.algorithm
        kept: list[Group] = []
        generated: list[Group] = []
        tries = 0
        while True:
            tries += 1
            batch = self._rollout(self.prompts.next_prompts(self.prompts_per_rank))
            generated += batch
            if not algo.dynamic_sampling:
                kept = batch
                break
            acc = torch.tensor([[r.accuracy for r in g.rewards] for g in batch])
            keep = dynamic_sampling_keep(
                acc.flatten(), self.cfg.rollout.n, algo.dynamic_sampling_low, algo.dynamic_sampling_high
            )
            kept += [g for g, k in zip(batch, keep.tolist(), strict=True) if k]
            if len(kept) >= self.prompts_per_rank or tries >= algo.max_tries:
                break
        # every DP rank must run the same number of micro-batches: agree on the smallest full count
        count = torch.tensor([min(len(kept), self.prompts_per_rank)], device=current_device())
        dist.all_reduce(count, op=dist.ReduceOp.MIN, group=ps.get_data_parallel_group())
        n, mbs = self.cfg.rollout.n, self.cfg.trainer.micro_batch_size
        usable = int(count)
        while usable and (usable * n) % mbs:
            usable -= 1
        stats = {"rollout/tries": float(tries), "rollout/kept_groups": float(usable)}
        return kept[:usable], self._reward_metrics(generated) | stats

    def _reward_metrics(self, groups: list[Group]) -> dict[str, float]:
        rewards = [r for g in groups for r in g.rewards]
        lengths = [float(len(x)) for g in groups for x in g.responses]
        scores = torch.tensor([r.score for r in rewards])
        return {
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
            "reward/accuracy": _mean([r.accuracy for r in rewards]),
            "reward/format": _mean([r.format for r in rewards]),
            "response/length": _mean(lengths),
            "response/finished": _mean([float(f) for g in groups for f in g.finished]),
        }

    def _sequences(self, groups: list[Group]) -> StepSequences:
        n = self.cfg.rollout.n
        scores = torch.tensor([r.score for g in groups for r in g.rewards])
        advantages = grpo_advantages(scores, n, scale_by_std=self.cfg.algorithm.scale_advantages_by_std)
        prompts = [g.prompt.input_ids for g in groups for _ in range(n)]
        responses = [r for g in groups for r in g.responses]
        seqs = build_sequences(
            prompts,
            responses,
            pixel_values=[g.prompt.pixel_values for g in groups for _ in range(n)],
            masked_pixel_values=[g.masked_pixel_values for g in groups for _ in range(n)],
            image_grid_thw=[g.prompt.image_grid_thw for g in groups for _ in range(n)],
            advantages=advantages,
            pad_id=self.policy.pad_token_id,
            length=padded_length(prompts, responses),
            position_fn=self.policy.position_ids,
        )
        logprobs = [lp for g in groups for lp in g.logprobs]
        if all(lp is not None for lp in logprobs):
            seqs.token_data["rollout_log_probs"] = response_token_values(prompts, logprobs, seqs.length)
        return seqs

    # ---------------------------------------------------------------- passes over the policy

    def _token_log_probs(self, seqs: StepSequences, masked: bool, ref: bool = False) -> torch.Tensor:
        """Per-token log-probs [N, L] of ``seqs`` under the policy or the reference model (last pipeline
        stage; empty elsewhere); ``masked``: with the masked images."""
        mbs = self.cfg.trainer.micro_batch_size
        batches = [
            micro_batch(seqs, idx, masked=masked) for idx in micro_batch_indices(torch.arange(len(seqs)), mbs)
        ]

        def loss_fn(batch, logits):
            lp, _ = self.policy.log_probs(logits, batch["labels"])
            return torch.zeros(()), {"log_probs": lp.detach()}

        def diverged(batch):  # NaN log-probs make the update's loss NaN: the step is skipped
            return {"log_probs": torch.full(batch["labels"].shape, math.nan)}

        outputs = self.policy.forward_only(batches, tolerate_non_finite(loss_fn, diverged), ref=ref)
        if not outputs:
            return torch.empty(0)
        return torch.cat([o["log_probs"] for o in outputs]).cpu()  # step data stays on the host

    def _compute_token_data(self, seqs: StepSequences) -> float:
        """Fill old / masked / reference log-probs; returns the seconds spent."""
        start = time.monotonic()
        algo = self.cfg.algorithm
        data = {"old_log_probs": self._token_log_probs(seqs, masked=False)}
        if algo.uses_masked_images and not algo.masked_grad:
            data["masked_log_probs"] = self._token_log_probs(seqs, masked=True)
        if algo.uses_ref_kl:
            data["ref_log_probs"] = self._token_log_probs(seqs, masked=False, ref=True)
        if ps.is_pipeline_last_stage():  # only the loss stage holds (and needs) per-token data
            seqs.token_data.update(data)
        return time.monotonic() - start

    def _rollout_correction(self, seqs: StepSequences) -> dict[str, float]:
        """The engine vs trainer log-prob gap (and, with ``rollout.tis_cap``, the truncated importance
        weights in ``token_data``), on the last pipeline stage when the engine reports log-probs."""
        rollout_lp = seqs.token_data.get("rollout_log_probs")
        if rollout_lp is None or not ps.is_pipeline_last_stage():
            return {}
        old, mask, cap = seqs.token_data["old_log_probs"], seqs.loss_mask, self.cfg.rollout.tis_cap
        if cap is not None:
            seqs.token_data["rollout_is_weights"] = truncated_importance_weights(old, rollout_lp, mask, cap)
        return {"rollout/logprob_mismatch": logprob_mismatch(old, rollout_lp, mask)}

    def _update(self, seqs: StepSequences) -> dict[str, float]:
        """``ppo_epochs`` passes of mini-batch optimizer steps over ``seqs``; returns averaged metrics."""
        cfg, algo = self.cfg, self.cfg.algorithm
        mbs = cfg.trainer.micro_batch_size
        per_update = self.update_prompts_per_rank * cfg.rollout.n
        progress = self.step / cfg.trainer.steps
        collected: list[dict[str, float]] = []
        generator = torch.Generator().manual_seed(
            prompt_seed(cfg.trainer.seed, self.step, f"dp{self.dp_rank}")
        )
        for _ in range(cfg.trainer.ppo_epochs):
            order = torch.randperm(len(seqs), generator=generator)
            for start in range(0, len(order) - per_update + 1, per_update):
                chunk = order[start : start + per_update]
                tokens = seqs.loss_mask[chunk].sum().reshape(1).to(current_device())
                dist.all_reduce(tokens, group=ps.get_data_parallel_group())
                batches = [self._update_batch(seqs, idx) for idx in micro_batch_indices(chunk, mbs)]
                scale = len(batches) * self.dp_size  # undo the schedule's and DDP's averaging

                def loss_fn(batch, logits, _tokens=float(tokens), _scale=scale):
                    masked_logits = None
                    if algo.masked_grad:
                        logits, masked_logits = logits.chunk(2, dim=0)
                    loss, metrics = papo_loss(
                        algo,
                        logits,
                        batch["labels"],
                        batch["loss_mask"],
                        batch["advantages"],
                        batch["old_log_probs"],
                        masked_logits=masked_logits,
                        masked_log_probs=batch.get("masked_log_probs"),
                        ref_log_probs=batch.get("ref_log_probs"),
                        temperature=cfg.rollout.temperature,
                        progress=progress,
                        global_token_count=_tokens if algo.global_token_mean else None,
                        rollout_is_weights=batch.get("rollout_is_weights"),
                    )
                    if algo.global_token_mean:
                        loss = loss * _scale
                    return loss, {k: v.detach() for k, v in metrics.items()}

                metrics = self.policy.train_step(batches, loss_fn)
                collected.append(metrics)
        keys = {k for m in collected for k in m}
        return {k: _mean([m[k] for m in collected if k in m]) for k in keys}

    def _update_batch(self, seqs: StepSequences, idx: torch.Tensor) -> dict[str, Any]:
        batch = micro_batch(seqs, idx)
        if not self.cfg.algorithm.masked_grad:
            return batch
        masked = micro_batch(seqs, idx, masked=True)  # same tokens, masked images: one doubled forward
        for key in ("input_ids", "attention_mask"):
            batch[key] = torch.cat([batch[key], masked[key]])
        batch["position_ids"] = torch.cat([batch["position_ids"], masked["position_ids"]], dim=1)
        if batch["pixel_values"] is not None:
            batch["pixel_values"] = torch.cat([batch["pixel_values"], masked["pixel_values"]])
            batch["image_grid_thw"] = torch.cat([batch["image_grid_thw"], masked["image_grid_thw"]])
        return batch

    # ---------------------------------------------------------------- one step

    def train_step(self) -> dict[str, float]:
        start = time.monotonic()
        groups, metrics = self._sample_groups()
        rollout_time = time.monotonic() - start
        if not groups:
            self.log(
                f"step {self.step}: no informative groups after {metrics['rollout/tries']:.0f} tries; "
                "skipping the update"
            )
            return metrics | {"perf/rollout_s": rollout_time}
        seqs = self._sequences(groups)
        log_prob_time = self._compute_token_data(seqs)
        metrics |= self._rollout_correction(seqs)
        update_start = time.monotonic()
        metrics |= self._update(seqs)
        update_time = time.monotonic() - update_start
        sync_start = time.monotonic()
        self.policy.sync_rollout_weights()
        total = time.monotonic() - start
        tokens = torch.tensor([float(seqs.attention_mask.sum())], device=current_device())
        dist.all_reduce(tokens, group=ps.get_data_parallel_group())
        metrics |= self.policy.engine.last_stats  # rollout tokens/s, sync time and size
        return metrics | {
            "perf/rollout_s": rollout_time,
            "perf/log_prob_s": log_prob_time,
            "perf/update_s": update_time,
            "perf/sync_s": time.monotonic() - sync_start,
            "perf/step_s": total,
            "perf/tokens_per_s": float(tokens) / total,
        }
