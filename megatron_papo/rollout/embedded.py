"""The default rollout engine: a transformers Qwen2.5-VL or Qwen3-VL in this process, fed the policy weights.

Why transformers rather than megatron-core's inference engine: the weights already travel in the HF layout
(the same export feeds the conversion tool and vLLM weight sync), transformers' Qwen2.5-VL generation is the
reference implementation of M-RoPE decoding with a KV cache, and at the sizes the embedded engine is for
(tiny to ~1B, CPU or one GPU) it is fast enough. Large models use vLLM servers.

By default (``rollout.embedded_batch_prompts=1``) each prompt's ``n`` samples are drawn as one batch under
a generator seeded by the request's seed, so the responses do not depend on how prompts are spread over
ranks: a run is reproducible across TP/PP/DP layouts. With ``embedded_batch_prompts=k`` the requests go in
batches of ``k`` prompts (``k * n`` rows, prompts left-padded), seeded by each batch's first request: many
times faster on small models, reproducible for a given layout but no longer across DP sizes.

When the step needs them (``RolloutConfig.engine_logprobs``: ``rollout.tis_cap`` or ``max_staleness`` > 0)
each rollout carries the log-probs of its tokens under the distribution sampled from: ``log_softmax`` of
transformers' processed scores (after temperature, top-p and the suppressed vision tokens), which keeps
``[rows, vocab]`` per generated token until the batch ends (fine at the embedded engine's sizes). Sampling
does not change: the same seed gives the same tokens with or without them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from megatron_papo.models.weights import module_name
from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.rollout.engine import Rollout, RolloutRequest, rollout_stats, vision_token_ids


class EmbeddedEngine:
    """Generates with the transformers model of the HF config at ``hf_path`` (by its ``model_type``:
    ``Qwen2_5_VLForConditionalGeneration`` or ``Qwen3VLForConditionalGeneration``)."""

    weights_to = "all"  # every rank generates with its own copy

    def __init__(
        self,
        hf_path: str,
        cfg: RolloutConfig,
        eos_token_id: int,
        pad_token_id: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        config = AutoConfig.from_pretrained(hf_path)
        self.model = AutoModelForImageTextToText.from_config(config, dtype=dtype).to(device).eval()
        self.cfg = cfg
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.device = torch.device(device)
        self.last_stats: dict[str, float] = {}
        self.weight_version = 0
        self.vision_token_ids = vision_token_ids(config)

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (name, tensor) pairs named as in HF checkpoint files (either convention) or state_dict()."""
        params = self.model.state_dict()
        seen = set()
        for file_name, tensor in named_tensors:
            name = module_name(file_name)
            if name not in params:
                raise KeyError(f"weight sync: {name!r} is not a parameter of the rollout model")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"weight sync: {name!r} has shape {tuple(tensor.shape)}, "
                    f"the rollout model expects {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
            seen.add(name)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        missing = set(params) - seen - tied
        if missing:
            raise KeyError(f"weight sync left {len(missing)} parameters unset, e.g. {sorted(missing)[:3]}")

    @torch.no_grad()
    def generate(self, requests: list[RolloutRequest], n: int) -> list[list[Rollout]]:
        start = time.monotonic()
        size = self.cfg.embedded_batch_prompts
        out = []
        for i in range(0, len(requests), size):
            out.extend(self._sample(requests[i : i + size], n))
        self.last_stats = rollout_stats(out, time.monotonic() - start)
        return out

    def _sample(self, requests: list[RolloutRequest], n: int) -> list[list[Rollout]]:
        """``n`` responses to each of ``requests``, generated as one batch [len(requests) * n, P]: the
        prompts left-padded to the longest P (a single prompt is not padded), request ``i``'s rows at
        ``i * n : (i + 1) * n``, its images repeated ``n`` times in the same order."""
        longest = max(len(r.input_ids) for r in requests)
        input_ids = torch.full((len(requests) * n, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, req in enumerate(requests):
            input_ids[i * n : (i + 1) * n, longest - len(req.input_ids) :] = req.input_ids
            attention_mask[i * n : (i + 1) * n, longest - len(req.input_ids) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        kwargs = {}
        with_images = [r for r in requests if r.pixel_values is not None]
        if with_images:
            pixels = torch.cat([r.pixel_values.repeat(n, 1) for r in with_images])
            grids = torch.cat([r.image_grid_thw.repeat(n, 1) for r in with_images])
            kwargs = dict(
                pixel_values=pixels.to(self.device, self.model.dtype),
                image_grid_thw=grids.to(self.device),
                # without token types transformers falls back to 1-D positions: the trainer uses M-RoPE
                mm_token_type_ids=(input_ids == self.model.config.image_token_id).int(),
            )
        scored = self.cfg.engine_logprobs
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(requests[0].seed)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **kwargs,
                do_sample=True,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                top_k=0,
                suppress_tokens=self.vision_token_ids,
                # diverged weights (NaN / inf logits) still sample; the trainer then skips the update
                remove_invalid_values=True,
                max_new_tokens=self.cfg.max_new_tokens,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                output_scores=scored,
                return_dict_in_generate=scored,
            )
        tokens = (out.sequences if scored else out)[:, longest:]
        logprobs = sampled_logprobs(out.scores, tokens).cpu() if scored else None
        rollouts = []
        for i, row in enumerate(tokens.cpu()):
            eos = (row == self.eos_token_id).nonzero()
            end = int(eos[0]) + 1 if len(eos) else len(row)
            rollouts.append(
                Rollout(
                    response_ids=row[:end].clone(),
                    finished=bool(len(eos)),
                    logprobs=None if logprobs is None else logprobs[i, :end].clone(),
                    weight_version=self.weight_version,
                )
            )
        return [rollouts[i * n : (i + 1) * n] for i in range(len(requests))]


def sampled_logprobs(scores: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """The log-prob of each generated token under the distribution it was sampled from: ``scores`` one
    [rows, vocab] per generation step (transformers' processed scores), ``tokens`` [rows, steps]; returns
    [rows, steps] float32 (rows that ended early get the values of their padding, cut by the caller)."""
    return torch.stack(
        [
            step.float().log_softmax(-1).gather(1, tokens[:, i : i + 1]).squeeze(1)
            for i, step in enumerate(scores)
        ],
        dim=1,
    )
