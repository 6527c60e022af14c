"""PAPO + VPPO: VPPO's shaped, filtered policy gradient with PAPO's perception KL and double entropy.

    loss = agg(keep_t * pg_t(alpha_i A_i)) + eta1 H[pi] - gamma KL_prc + eta2 H[pi_mask] [+ ref-KL, SFT]

keep and alpha as ``vppo`` (its ``prepare``), the PAPO terms as ``papo`` (``papo.loss.papo_terms``, with
every PAPO option: estimators, top-p, annealing, ``masked_grad``); ``vppo_entropy_coef`` is not used (eta1
is the same term). Both use the step's masked images: VPPO's dependency the no-grad masked pass, KL_prc
that pass or, with ``masked_grad``, the masked logits of the update.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from megatron_papo.objectives.registry import LossContext, LossInputs, Prepared, register_objective
from megatron_papo.objectives.vppo import Vppo, shaped_policy_gradient
from megatron_papo.papo.loss import papo_terms


@register_objective("papo_vppo")
class PapoVppo(Vppo):
    papo_terms: ClassVar[bool] = True

    def loss(
        self, inputs: LossInputs, ctx: LossContext, prepared: Prepared | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, agg, loss, metrics = shaped_policy_gradient(self.cfg, inputs, ctx, prepared)
        return papo_terms(
            self.cfg, x, agg, loss, metrics, inputs.ref_log_probs, inputs.sft_weights, ctx.progress
        )
