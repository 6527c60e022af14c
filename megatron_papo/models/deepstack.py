"""DeepStack (Qwen3-VL): features of chosen vision blocks added to the hidden states of the first LM layers
at the image tokens.

The features travel with the hidden states: the first stage's decoder input is
``[embeddings | deepstack_0 | ... | deepstack_{k-1}]`` along the hidden dimension ([s, b, h * (1 + k)]), each
``deepstack_i`` [s, b, h] holding block ``i``'s merged features at the image tokens and zeros elsewhere.
``DeepStackLayer`` ``i`` (the first ``k`` layers of the model) runs on the hidden states and adds the
first pending map to its output, passing the rest on. So the maps cross pipeline stages inside the
activations the schedule already sends (their gradients flow back the same way), and recomputation and
in-flight micro-batches need nothing more; the pipeline exchanges tensor shapes (``language_config``
sets ``variable_seq_lengths`` whenever PP > 1). A batch without images carries no maps.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


def pack(embeddings: torch.Tensor, feature_maps: list[torch.Tensor]) -> torch.Tensor:
    """embeddings [s, b, h], k maps [s, b, h] -> the decoder input [s, b, h * (1 + k)]."""
    return torch.cat([embeddings, *feature_maps], dim=-1)


class DeepStackLayer(TransformerLayer):
    """A decoder layer that adds the next DeepStack map to its output.

    hidden_states [s, b, h * (1 + r)] (the hidden states, then the r maps not yet added) ->
    [s, b, h * r]: the layer's output plus the first map, then the other r - 1 maps. With r = 0 it is the
    plain layer. Returns ``(output, context)`` as ``TransformerLayer`` does.
    """

    def forward(
        self, hidden_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.config.hidden_size
        hidden, pending = hidden_states[..., :h].contiguous(), hidden_states[..., h:]
        output, context = super().forward(hidden, *args, **kwargs)
        if pending.shape[-1]:
            output = torch.cat([output + pending[..., :h], pending[..., h:]], dim=-1)
        return output, context
