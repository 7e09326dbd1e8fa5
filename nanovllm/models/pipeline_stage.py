"""A pipeline stage's model: a family's own class reduced to a run of its layers.

The first stage also holds the token embedding, the last the final norm and the LM head. A stage's forward takes
the previous stage's ``StageTensors`` (the first embeds the tokens instead) and returns its own for the next stage,
or, on the last stage, the final hidden states. ``make_layer`` is wrapped: a layer another stage owns is built as
a parameterless ``MissingLayer``, so no rank allocates layers it does not run. Every model here is a ``Qwen3Model``
inside (``model.embed_tokens``, ``model.layers``, ``model.norm``), which is all a stage relies on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nanovllm.layers.linear import as_tensor


@dataclass
class StageTensors:
    """What one stage hands the next: the hidden states and the residual stream, ``[num_tokens, hidden]`` each."""

    hidden: torch.Tensor
    residual: torch.Tensor


def stage_layer_range(num_layers: int, num_stages: int, stage: int) -> tuple[int, int]:
    """Layers [start, end) of ``stage``; the first ``num_layers % num_stages`` stages take one extra layer (the last
    stage already runs the norm and the LM head)."""
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


class MissingLayer(nn.Module):
    """Stands in for a layer another stage owns: no parameters, never run."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("a layer owned by another pipeline stage was run")


def stage_model_class(base: type[nn.Module], start: int, end: int, first: bool, last: bool) -> type[nn.Module]:
    """``base`` (a model family's class) reduced to the layers [start, end) and the ends of the model it owns."""

    class PipelineStage(base):  # type: ignore[misc, valid-type]
        is_pipeline_stage = True  # the loader skips checkpoint tensors of layers other stages own

        def __init__(self, config: Any, fast_path: bool = False, quant_config: Any = None) -> None:
            super().__init__(config, fast_path, quant_config)
            inner = getattr(self, "model", None)
            if inner is None or not all(hasattr(inner, n) for n in ("embed_tokens", "layers", "norm")):
                raise ValueError(f"{base.__name__} does not have the embed_tokens / layers / norm layout that "
                                 "pipeline parallelism splits; use tensor_parallel_size instead")
            # (built in full by the family's __init__ and dropped here; the pool is sized after they are freed)
            tied = bool(getattr(self, "tie_word_embeddings", False))
            if not first and not (last and tied):  # a tied last stage keeps it: it is the LM head's weight
                inner.embed_tokens = None
            if not last:
                self.lm_head = None
                inner.norm = None
            self.stage_layers = list(inner.layers[start:end])
            self.stage_hidden_size = config.hidden_size

        def make_layer(self, config: Any, layer_index: int) -> nn.Module:
            if start <= layer_index < end:
                return super().make_layer(config, layer_index)
            return MissingLayer()

        def forward(  # type: ignore[override]
            self, input_ids: torch.Tensor, positions: torch.Tensor, stage_input: StageTensors | None = None
        ) -> torch.Tensor | StageTensors:
            inner = self.model
            if first:
                hidden, residual = inner.embed_tokens(input_ids), None
            elif stage_input is not None:
                hidden, residual = stage_input.hidden, stage_input.residual
            else:  # memory profiling or the decode-kernel warm-up: no previous stage ran
                dtype = next(self.parameters()).dtype
                hidden = torch.zeros(input_ids.shape[0], self.stage_hidden_size, dtype=dtype, device=input_ids.device)
                residual = hidden.clone()
            for layer in self.stage_layers:
                hidden, residual = layer(positions, hidden, residual)
            if last:
                hidden, _ = inner.norm(hidden, residual)
                return hidden
            return StageTensors(as_tensor(hidden), residual)  # the next stage's first norm takes a plain tensor

        def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
            return super().compute_logits(hidden) if last else None

    PipelineStage.__name__ = PipelineStage.__qualname__ = f"{base.__name__}[layers {start}:{end}]"
    return PipelineStage
