"""The PAPO training loop: rollout -> rewards -> advantages -> log-probs -> updates -> weight sync.

One step, on every rank:

1. **Prompts**: each data-parallel (DP) rank reads its own prompts; the tensor/pipeline ranks of a DP rank
   read the same ones.
2. **Rollout**: the prompts of a DP rank are spread over its model-parallel ranks, each generates ``n``
   responses per prompt with the rollout engine, and the results are exchanged inside the group.
3. **Rewards and advantages**: DAPO keeps only groups whose accuracy is not all equal and samples more
   rounds until the DP group holds the whole rollout batch (``algorithm.max_tries`` rounds, else a clear
   error), pooling kept groups across DP ranks (``training.dynamic_sampling``). Kept prompts get one
   masked copy of their images when the objective uses them (seeded by step and prompt id). Scores get
   DAPO's soft overlong punishment (``algorithm.overlong_buffer``), then GRPO group normalisation.
4. **Log-probs without gradient**: the pre-update policy (old; skipped on-policy, one epoch of one
   mini-batch: the update's own forward gives them), the masked images (the reference default, unless
   ``algorithm.masked_grad``; in the same schedule call as the old ones) and the reference model (when its
   KL term is on), through megatron-core's forward-only schedule. With ``algorithm.ref_kl_in_reward``
   the reference KL is a penalty on the scores (fixed or adaptive coefficient) and the advantages are
   recomputed.
5. **Updates**: ``ppo_epochs`` passes over shuffled mini-batches, each through the forward-backward
   schedule with the PAPO loss on the last pipeline stage, then DDP gradient reduction, clipping and one
   optimizer step. With ``masked_grad`` a micro-batch carries the original and masked images together.
6. **Weight sync** of the new policy into the rollout engine, metrics, checkpoint.

With ``rollout.max_staleness`` s > 0, steps 1-3 of the next ``s`` steps run on a background thread
(``training.rollout_producer``) while this one does 4-6: step ``k`` grants the batches up to ``k + s``,
takes its own (generated while earlier steps updated, with weights at most ``s`` versions old) and, before
its weight sync, waits until the granted batches are generated. Each rollout carries the version of the
weights that sampled it; the step logs their staleness (``rollout/staleness``) and refuses any beyond
``s``. Checkpoints record the prompt position of the first untrained step (``data_position``): batches
generated ahead are dropped and, on resume, generated again from the same prompts. With s = 0 none of this
runs: the loop is the synchronous one.

With an engine that reports log-probs (vLLM servers; the embedded engine with ``rollout.tis_cap`` or
``max_staleness`` > 0) the gap between its log-probs and the trainer's pre-update ones is logged each step
(``rollout/logprob_mismatch``, ``rollout/is_weight_*``), and ``rollout.tis_cap`` turns on the truncated
importance-sampling correction of the policy-gradient term.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_papo.data.encode import EncodedPrompt
from megatron_papo.loop import StepOutcome, TrainingLoop
from megatron_papo.objectives.registry import build_objective
from megatron_papo.papo.advantages import (
    dynamic_sampling_keep,
    grpo_advantages,
    kl_penalized_scores,
    overlong_penalty,
)
from megatron_papo.papo.kl_controller import KLController
from megatron_papo.papo.loss import reference_kl
from megatron_papo.parallel.device import current_device
from megatron_papo.policy import Policy
from megatron_papo.rewards.registry import RewardOutput
from megatron_papo.rollout.correction import (
    importance_weight_stats,
    logprob_mismatch,
    truncated_importance_weights,
)
from megatron_papo.rollout.distributed import RolloutGroups, generate_in_model_parallel_group
from megatron_papo.rollout.engine import RolloutRequest
from megatron_papo.rollout.staleness import staleness_metrics
from megatron_papo.training.dp_balance import balance_groups
from megatron_papo.training.dynamic_sampling import fill_rollout_batch
from megatron_papo.training.hacking import HackingDetector
from megatron_papo.training.passes import token_data_pass, update_pass
from megatron_papo.training.records import write_dp_records
from megatron_papo.training.rollout_producer import RolloutProducer
from megatron_papo.training.sequences import (
    StepSequences,
    build_sequences,
    padded_length,
    response_token_values,
)


@dataclass
class Group:
    """One prompt, its ``n`` scored responses (with the engine's log-probs and weight versions) and, once
    the group is kept and the objective uses them, its masked images."""

    prompt: EncodedPrompt
    responses: list[torch.Tensor]
    finished: list[bool]
    rewards: list[RewardOutput]
    logprobs: list[torch.Tensor | None]
    versions: list[int | None]
    masked_pixel_values: torch.Tensor | None = None


SampledBatch = tuple[list[Group], dict[str, float]]  # a step's groups and their rollout metrics


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
        self.objective = build_objective(cfg.algorithm)
        self.policy = Policy(cfg, updates, with_ref=self.objective.ref_log_probs_needed, with_engine=True)
        self.detector = HackingDetector(cfg.logging.hacking_detector)
        self.kl_controller = (
            KLController.from_config(cfg.algorithm) if cfg.algorithm.ref_kl_in_reward else None
        )
        self.producer: RolloutProducer[SampledBatch] | None = None  # started by the first step
        self._producer_busy_s = 0.0  # the producer's busy seconds at the end of the last step

    def headline(self) -> str:
        cfg = self.cfg
        return (
            f"train {cfg.algorithm.name} (objective {cfg.algorithm.objective}), {cfg.trainer.steps} steps of "
            f"{cfg.trainer.rollout_batch_size} prompts x {cfg.rollout.n} responses"
        )

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
        state = {"detector": self.detector.state_dict()}
        if self.kl_controller is not None:
            state["kl_controller"] = self.kl_controller.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        if self.kl_controller is not None and "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])

    def data_position(self) -> dict:
        """The prompts of the next step, even when its batch was generated ahead (it is not saved)."""
        if self.producer is None:
            return super().data_position()
        return self.producer.position(self.step + 1)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
            self.producer = None

    # ---------------------------------------------------------------- rollout, rewards, advantages

    def _rollout(self, prompts: list[EncodedPrompt], step: int, group: dist.ProcessGroup) -> list[Group]:
        """``n`` scored responses per prompt of ``step``, generated by this DP rank's model-parallel ranks
        together (``group``)."""
        requests = [
            RolloutRequest(
                p.input_ids,
                p.pixel_values,
                p.image_grid_thw,
                seed=prompt_seed(self.cfg.trainer.seed, step, p.uid),
                prompt_text=p.prompt_text,
                images=p.images,
            )
            for p in prompts
        ]
        outputs = generate_in_model_parallel_group(self.policy.engine, requests, self.cfg.rollout.n, group)
        texts = [
            self.prompts.tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
            for rollouts in outputs
        ]
        items = [(t, p.answer, p.answer_type) for p, ts in zip(prompts, texts, strict=True) for t in ts]
        rewards = iter(self.prompts.rewards.grade(items))
        return [
            Group(
                prompt=prompt,
                responses=[r.response_ids for r in rollouts],
                finished=[r.finished for r in rollouts],
                rewards=[next(rewards) for _ in rollouts],
                logprobs=[r.logprobs for r in rollouts],
                versions=[r.weight_version for r in rollouts],
            )
            for prompt, rollouts in zip(prompts, outputs, strict=True)
        ]

    def _sample_groups(self, step: int, groups: RolloutGroups) -> SampledBatch:
        """This DP rank's ``prompts_per_rank`` groups for ``step`` (DAPO: informative groups only, sampled
        until the DP group holds the whole rollout batch, pooled across DP ranks), masked images built
        for them when the objective uses them; collectives on ``groups``."""
        algo = self.cfg.algorithm
        generated: list[Group] = []

        def sample_round() -> tuple[list[Group], int]:
            batch = self._rollout(
                self.prompts.next_prompts(self.prompts_per_rank), step, groups.model_parallel
            )
            generated.extend(batch)
            if not algo.dynamic_sampling:
                return batch, len(batch)
            acc = torch.tensor([[r.accuracy for r in g.rewards] for g in batch])
            keep = dynamic_sampling_keep(
                acc.flatten(), self.cfg.rollout.n, algo.dynamic_sampling_low, algo.dynamic_sampling_high
            )
            return [g for g, k in zip(batch, keep.tolist(), strict=True) if k], len(batch)

        filled = fill_rollout_batch(
            sample_round, self.prompts_per_rank, algo.max_tries, groups.data_parallel, groups.device
        )
        if self.objective.masked_images_needed:
            for g in filled.groups:
                g.masked_pixel_values = self.prompts.mask_images(g.prompt, step)
        stats = {
            "rollout/tries": float(filled.tries),
            "rollout/keep_rate": filled.keep_rate,
            "rollout/kept_groups": float(filled.kept),
            "rollout/used_groups": float(self.prompts_per_rank * self.dp_size),
            "rollout/surplus_groups": float(filled.surplus),
            "data/skipped_samples": float(self.prompts.loader.skipped),
        }
        stats |= self.prompts.rewards.take_stats()
        return filled.groups, self._reward_metrics(generated) | stats

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
            # groups whose scores differ, i.e. that carry an advantage (GRPO too: its keep_rate is 1)
            "rollout/informative_groups": _mean(
                [float(len({r.score for r in g.rewards}) > 1) for g in groups]
            ),
        }

    def _scores(self, groups: list[Group]) -> tuple[torch.Tensor, dict[str, float]]:
        """Each response's score [N] (group by group), with DAPO's soft overlong punishment when on."""
        algo = self.cfg.algorithm
        scores = torch.tensor([r.score for g in groups for r in g.rewards])
        if not algo.overlong_buffer:
            return scores, {}
        lengths = torch.tensor([len(r) for g in groups for r in g.responses])
        penalty = overlong_penalty(
            lengths, self.cfg.rollout.max_new_tokens, algo.overlong_buffer, algo.overlong_penalty
        )
        metrics = {
            "reward/overlong_penalized": float((penalty < 0).float().mean()),
            "reward/overlong_penalty": float(penalty.mean()),
        }
        return scores + penalty, metrics

    def _save_rollouts(self, groups: list[Group], scores: torch.Tensor) -> None:
        """``logging.save_rollouts``: the step's samples, one JSON line each (``scores`` [N]: as trained,
        shaping included), to ``rollouts/step<N>.jsonl`` under the output directory."""
        decode = self.prompts.tokenizer.batch_decode
        records = [
            {
                "step": self.step,
                "uid": g.prompt.uid,
                "prompt": g.prompt.prompt_text,
                "response": text,
                "score": score,
                "accuracy": reward.accuracy,
                "format": reward.format,
                "finished": finished,
                "response_tokens": len(ids),
                "weight_version": version,
            }
            for g, group_scores in zip(groups, scores.split(self.cfg.rollout.n), strict=True)
            for ids, text, reward, finished, version, score in zip(
                g.responses,
                decode(g.responses, skip_special_tokens=True),
                g.rewards,
                g.finished,
                g.versions,
                group_scores.tolist(),
                strict=True,
            )
        ]
        path = os.path.join(self.cfg.trainer.output_dir, "rollouts", f"step{self.step}.jsonl")
        write_dp_records(records, path)

    def _advantages(self, scores: torch.Tensor) -> torch.Tensor:
        algo = self.cfg.algorithm
        return grpo_advantages(scores, self.cfg.rollout.n, scale_by_std=algo.scale_advantages_by_std)

    def _sequences(self, groups: list[Group], scores: torch.Tensor) -> StepSequences:
        n, algo = self.cfg.rollout.n, self.cfg.algorithm
        advantages = self._advantages(scores)
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
        if algo.use_sft_loss:
            correct = [r.accuracy > algo.sft_min_accuracy for g in groups for r in g.rewards]
            seqs.sft_weights = torch.tensor(correct, dtype=torch.float32)
        logprobs = [lp for g in groups for lp in g.logprobs]
        if all(lp is not None for lp in logprobs):
            seqs.token_data.rollout_log_probs = response_token_values(prompts, logprobs, seqs.length)
        return seqs

    # ---------------------------------------------------------------- passes over the policy

    def _compute_token_data(self, seqs: StepSequences) -> float:
        """Fill old / masked / reference log-probs; returns the seconds spent."""
        start = time.monotonic()
        cfg = self.cfg
        token_data_pass(
            self.policy.model,
            self.policy.ref_model,
            self.objective,
            seqs,
            cfg.trainer.micro_batch_size,
            cfg.rollout.temperature,
            packed=cfg.trainer.pack_sequences,
            max_tokens=cfg.trainer.max_tokens_per_micro_batch,
            on_policy=self._on_policy(),
        )
        return time.monotonic() - start

    def _on_policy(self) -> bool:
        """One epoch of one mini-batch, and no reference KL in the reward (it reads the old log-probs
        before the update): the update's own log-probs are the old ones, no pass computes them."""
        trainer = self.cfg.trainer
        one_update = trainer.ppo_epochs == 1 and trainer.rollout_batch_size == trainer.update_batch_size
        return one_update and self.kl_controller is None

    def _reference_kl_reward(self, seqs: StepSequences, scores: torch.Tensor) -> dict[str, float]:
        """``ref_kl_in_reward``: scores minus the KL-controller coefficient times each response's summed KL
        of the pre-update policy to the reference, advantages recomputed (on the last pipeline stage, the
        only one that reads them); the controller then updates on every rank alike."""
        assert self.kl_controller is not None
        coef = self.kl_controller.coef
        totals = torch.zeros(2, dtype=torch.float64)  # sum of per-response mean KL, responses
        if ps.is_pipeline_last_stage():
            data = seqs.token_data
            kl = reference_kl(self.cfg.algorithm, data.old_log_probs, data.ref_log_probs)
            penalized, per_response = kl_penalized_scores(scores, kl, seqs.loss_mask, coef)
            seqs.advantages = self._advantages(penalized)
            totals += torch.tensor([float(per_response.double().sum()), float(len(per_response))])
        totals = totals.to(current_device())
        dist.all_reduce(totals)  # the loss stage's TP ranks count alike: the mean is unchanged
        current_kl = float(totals[0] / totals[1])
        self.kl_controller.update(current_kl, self.cfg.trainer.rollout_batch_size * self.cfg.rollout.n)
        return {"actor/reward_kl": current_kl, "actor/reward_kl_coef": coef}

    def _rollout_correction(self, seqs: StepSequences) -> dict[str, float]:
        """The engine vs trainer log-prob gap (and, with ``rollout.tis_cap``, the truncated importance
        weights in ``token_data``), on the last pipeline stage when the engine reports log-probs."""
        rollout_lp = seqs.token_data.rollout_log_probs
        if rollout_lp is None or not ps.is_pipeline_last_stage():
            return {}
        old, mask, cap = seqs.token_data.old_log_probs, seqs.loss_mask, self.cfg.rollout.tis_cap
        if cap is not None:
            seqs.token_data.rollout_is_weights = truncated_importance_weights(old, rollout_lp, mask, cap)
        mismatch = {"rollout/logprob_mismatch": logprob_mismatch(old, rollout_lp, mask)}
        return mismatch | importance_weight_stats(old, rollout_lp, mask, cap)

    def _update(self, seqs: StepSequences) -> StepOutcome:
        """``ppo_epochs`` passes of mini-batch optimizer steps over ``seqs``: metrics averaged over them,
        skipped when any of them was. Every mini-batch is whole: the rollout batch always is
        (``_sample_groups``) and divides into update batches (``TrainerConfig``). The annealing factor of
        the first step is ``gamma_start``."""
        cfg = self.cfg
        seed = prompt_seed(cfg.trainer.seed, self.step, f"dp{self.dp_rank}")
        results = update_pass(
            self.policy.train_step,
            self.objective,
            seqs,
            sequences_per_update=self.update_prompts_per_rank * cfg.rollout.n,
            micro_batch_size=cfg.trainer.micro_batch_size,
            ppo_epochs=cfg.trainer.ppo_epochs,
            temperature=cfg.rollout.temperature,
            progress=(self.step - 1) / cfg.trainer.steps,
            generator=torch.Generator().manual_seed(seed),
            packed=cfg.trainer.pack_sequences,
            max_tokens=cfg.trainer.max_tokens_per_micro_batch,
        )
        keys = {k for r in results for k in r.metrics}
        metrics = {k: _mean([r.metrics[k] for r in results if k in r.metrics]) for k in keys}
        return StepOutcome(metrics, skipped=any(r.skipped for r in results))

    # ---------------------------------------------------------------- rollouts ahead of the update

    def _take_ahead(self) -> SampledBatch:
        """The step's batch from the producer (started by the first step), once the steps up to
        ``rollout.max_staleness`` ahead are granted; with the staleness of its rollouts."""
        cfg = self.cfg
        if self.producer is None:
            self._start_producer()
        assert self.producer is not None
        ahead = min(self.step + cfg.rollout.max_staleness, cfg.trainer.steps)
        for step in range(self.producer.granted + 1, ahead + 1):
            self.producer.grant(step)
        groups, metrics = self.producer.take(self.step)
        versions = [v for g in groups for v in g.versions]
        return groups, metrics | staleness_metrics(versions, self.step, cfg.rollout.max_staleness)

    def _start_producer(self) -> None:
        """The producer thread, with collective groups of its own (made by every rank together) and the
        reward workers already forked (forking beside a running thread is unsafe)."""
        groups = RolloutGroups.private()
        self.prompts.rewards.start()
        self.producer = RolloutProducer(
            lambda step: self._produce(step, groups), self.prompts.state_dict, first_step=self.step
        )

    def _produce(self, step: int, groups: RolloutGroups) -> SampledBatch:
        """``step``'s batch on the producer thread, with the engine's figures of its generation."""
        batch, metrics = self._sample_groups(step, groups)
        return batch, metrics | self.policy.engine.last_stats

    def _overlap_metrics(self, waited_s: float, step_s: float) -> dict[str, float]:
        """How much the trainer waited for rollouts (``waited_s`` of the step's ``step_s``) and how much
        the producer generated during the step (called when it is idle)."""
        assert self.producer is not None
        busy = self.producer.busy_s - self._producer_busy_s
        self._producer_busy_s = self.producer.busy_s
        return {
            "perf/rollout_wait_s": waited_s,
            "perf/trainer_idle_frac": waited_s / step_s,
            "perf/generator_busy_s": busy,
            "perf/generator_idle_frac": max(0.0, 1.0 - busy / step_s),
        }

    # ---------------------------------------------------------------- one step

    def train_step(self) -> StepOutcome:
        start = time.monotonic()
        if self.cfg.rollout.max_staleness:
            groups, metrics = self._take_ahead()
        else:
            groups, metrics = self._sample_groups(self.step, RolloutGroups.trainers())
        rollout_time = time.monotonic() - start
        if self.cfg.trainer.max_tokens_per_micro_batch:  # token budgets: even the ranks' tokens too
            tokens = [sum(len(g.prompt.input_ids) + len(r) for r in g.responses) for g in groups]
            groups, balance = balance_groups(groups, tokens, ps.get_data_parallel_group())
            metrics |= balance
        scores, shaping = self._scores(groups)
        metrics |= shaping
        if self.cfg.logging.save_rollouts:
            self._save_rollouts(groups, scores)
        seqs = self._sequences(groups, scores)
        log_prob_time = self._compute_token_data(seqs)
        if self.kl_controller is not None:
            metrics |= self._reference_kl_reward(seqs, scores)
        metrics |= self._rollout_correction(seqs)
        update_start = time.monotonic()
        update = self._update(seqs)
        metrics |= update.metrics
        update_time = time.monotonic() - update_start
        sync_start = time.monotonic()
        if self.producer is not None:  # the batches granted ahead use the current weights
            self.producer.wait_idle()
            waited = rollout_time + time.monotonic() - sync_start
            sync_start = time.monotonic()
        self.policy.sync_rollout_weights(self.step)
        total = time.monotonic() - start
        tokens = torch.tensor([float(seqs.attention_mask.sum())], device=current_device())
        dist.all_reduce(tokens, group=ps.get_data_parallel_group())
        engine_stats = self.policy.engine.last_stats  # rollout tokens/s, sync time and size
        if self.producer is not None:  # each batch has its own rollout figures (``_produce``)
            engine_stats = {k: v for k, v in engine_stats.items() if not k.startswith("rollout/")}
            metrics |= self._overlap_metrics(waited, total)
        metrics |= engine_stats
        perf = {
            "perf/rollout_s": rollout_time,
            "perf/log_prob_s": log_prob_time,
            "perf/update_s": update_time,
            "perf/sync_s": time.monotonic() - sync_start,
            "perf/step_s": total,
            "perf/tokens_per_s": float(tokens) / total,
        }
        return StepOutcome(metrics | perf, update.skipped, [g.prompt for g in groups])
