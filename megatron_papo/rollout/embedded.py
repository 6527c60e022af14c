"""The default rollout engine: a transformers Qwen2.5-VL in this process, fed the policy's weights.

Why transformers rather than megatron-core's inference engine: the weights already travel in the HF layout
(the same export feeds the conversion tool and vLLM weight sync), transformers' Qwen2.5-VL generation is the
reference implementation of M-RoPE decoding with a KV cache, and at the sizes the embedded engine is for
(tiny to ~1B, CPU or one GPU) it is fast enough. Large models use vLLM servers.

Each prompt's ``n`` samples are drawn as one batch under a generator seeded by the request's seed, so the
responses do not depend on how prompts are spread over ranks or batched: a run is reproducible across TP/PP
layouts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from megatron_papo.models.weights import module_name
from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.rollout.engine import Rollout, RolloutRequest, rollout_stats, vision_token_ids


class EmbeddedEngine:
    """Generates with ``Qwen2_5_VLForConditionalGeneration`` built from the HF config at ``hf_path``."""

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
        self.model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).to(device).eval()
        self.cfg = cfg
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.device = torch.device(device)
        self.last_stats: dict[str, float] = {}
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
        tied = {"lm_head.weight"} if self.model.config.get_text_config().tie_word_embeddings else set()
        missing = set(params) - seen - tied
        if missing:
            raise KeyError(f"weight sync left {len(missing)} parameters unset, e.g. {sorted(missing)[:3]}")

    @torch.no_grad()
    def generate(self, requests: list[RolloutRequest], n: int) -> list[list[Rollout]]:
        start = time.monotonic()
        out = [self._sample(r, n) for r in requests]
        self.last_stats = rollout_stats(out, time.monotonic() - start)
        return out

    def _sample(self, req: RolloutRequest, n: int) -> list[Rollout]:
        input_ids = req.input_ids.to(self.device).unsqueeze(0).expand(n, -1)
        kwargs = {}
        if req.pixel_values is not None:
            kwargs = dict(
                pixel_values=req.pixel_values.to(self.device, self.model.dtype).repeat(n, 1),
                image_grid_thw=req.image_grid_thw.to(self.device).repeat(n, 1),
                # without token types transformers falls back to 1-D positions: the trainer uses M-RoPE
                mm_token_type_ids=(input_ids == self.model.config.image_token_id).int(),
            )
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(req.seed)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
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
            )
        rollouts = []
        for row in out[:, input_ids.shape[1] :].cpu():
            eos = (row == self.eos_token_id).nonzero()
            end = int(eos[0]) + 1 if len(eos) else len(row)
            rollouts.append(Rollout(response_ids=row[:end].clone(), finished=bool(len(eos))))
        return rollouts
