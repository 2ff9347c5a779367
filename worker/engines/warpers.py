"""Faster stand-ins for transformers' per-request sampling warpers and its sampler, on a CPU.

Continuous batching with per-request sampling (:mod:`worker.engines.batching`) runs a top-k and
a top-p warper over the whole ``[batch, vocabulary]`` score matrix at every step, each with a
full sort; greedy requests are top-k 1 and pay for both. Profiled here (SmolLM2, 8 streams,
py-spy) the warpers took 17% of the generation thread. The stand-ins give the same scores:

* top-k takes ``torch.topk`` of the largest k in the batch (k = 1 when every request is greedy)
  instead of sorting the whole vocabulary;
* top-p returns the scores unchanged when every request keeps the whole nucleus
  (``top_p >= 1``, which greedy requests send), and otherwise sorts as before.

The sampler (:func:`sample_among_kept`) draws each row's token among the tokens the warpers kept
instead of over the whole vocabulary: ``torch.multinomial`` over ``[batch, vocabulary]`` costs
about 7 ms a step for 8 rows of SmolLM2's 49,152 tokens on this CPU, over a tenth of a batch
step, and every greedy request pays it too (the manager samples; greedy is top-k 1). Tokens
outside the kept ones have probability zero, so the distribution is the same.

All of them read a per-batch figure back to the host, a device sync: on a GPU (where the step
may be a captured CUDA graph) transformers' own warpers and sampler stay.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.continuous_batching.model_runner import ModelRunner

MAX_KEPT = 1024  # a row keeping more tokens than this is drawn over the whole vocabulary


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


def sample_among_kept(runner: ModelRunner, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
    """``ModelRunner._sample`` drawing each row among its kept (finite-score) tokens only."""
    rows = scores[0]  # [num_logits, vocabulary]
    kept = int(torch.isfinite(rows).sum(dim=-1).max()) if rows.numel() else 0
    if not runner.do_sample or runner.return_logprobs or not 0 < kept <= MAX_KEPT:
        ModelRunner._sample(runner, scores, output_ids)
        return
    probs = torch.softmax(rows, dim=-1)
    values, index = probs.topk(kept, dim=-1)  # every row's nonzero probabilities, and zeros
    next_tokens = index.gather(-1, torch.multinomial(values, 1)).squeeze(-1)
    output_ids[0, : next_tokens.size(0)].copy_(next_tokens)


def use_fast_sampler(manager: Any) -> None:
    """Every batch processor the manager creates (one per start of its thread) samples with
    :func:`sample_among_kept`."""
    create = manager._create_batch_processor

    def create_with_fast_sampler() -> Any:
        processor = create()
        runner = processor.model_runner
        runner._sample = types.MethodType(sample_among_kept, runner)
        return processor

    manager._create_batch_processor = create_with_fast_sampler
