"""Faster stand-ins for two of transformers' per-request sampling warpers, on a CPU.

Continuous batching with per-request sampling (:mod:`worker.engines.batching`) runs a top-k and
a top-p warper over the whole ``[batch, vocabulary]`` score matrix at every step, each with a
full sort; greedy requests are top-k 1 and pay for both. Profiled here (SmolLM2, 8 streams,
py-spy) the warpers took 17% of the generation thread. The stand-ins give the same scores:

* top-k takes ``torch.topk`` of the largest k in the batch (k = 1 when every request is greedy)
  instead of sorting the whole vocabulary;
* top-p returns the scores unchanged when every request keeps the whole nucleus
  (``top_p >= 1``, which greedy requests send), and otherwise sorts as before.

Both read a per-batch maximum back to the host, a device sync: on a GPU (where the step may be
a captured CUDA graph) transformers' own warpers stay.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)


class TopKByTopk(ContinuousBatchingTopKLogitsWarper):
    """Top-k per request through ``torch.topk`` of the batch's largest k."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        vocab = scores.size(-1)
        top_k = tensor_arg[: scores.size(0)].clamp(min=1, max=vocab)  # shape [B]
        largest = int(top_k.max())
        if largest >= vocab:  # some request keeps everything: no k to take, sort as before
            return super().__call__(scores, tensor_arg)
        values = torch.topk(scores, largest, dim=-1).values  # [B, largest], descending
        thresholds = values.gather(-1, (top_k - 1).unsqueeze(-1).to(torch.int64))  # [B, 1]
        return scores.masked_fill(scores < thresholds, self.filter_value)


class TopPSkippedWhenWhole(ContinuousBatchingTopPLogitsWarper):
    """Top-p per request, skipped when no request in the batch trims the nucleus."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        if bool((top_p >= 1.0).all()):
            return scores
        return super().__call__(scores, tensor_arg)


_REPLACEMENTS: dict[type, Any] = {
    ContinuousBatchingTopKLogitsWarper: TopKByTopk,
    ContinuousBatchingTopPLogitsWarper: TopPSkippedWhenWhole,
}


def use_fast_warpers(manager: Any) -> int:
    """Swap the manager's top-k / top-p warpers for the stand-ins; returns how many."""
    processors = manager.logit_processor.logits_processor
    swapped = 0
    for i, processor in enumerate(processors):
        faster = _REPLACEMENTS.get(type(processor))
        if faster is not None:
            stand_in = faster.__new__(faster)
            stand_in.__dict__.update(processor.__dict__)
            processors[i] = stand_in
            swapped += 1
    return swapped
