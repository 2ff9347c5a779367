"""The CPU stand-ins for transformers' per-request top-k / top-p warpers give the same scores."""

from __future__ import annotations

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)

from worker.engines.warpers import TopKByTopk, TopPSkippedWhenWhole, use_fast_warpers


def _as_int32(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(torch.int32)


@pytest.mark.parametrize("top_ks", [[1, 1, 1, 1], [1, 64, 1, 5], [1000, 1, 3, 2], [1, 1, 999, 1]])
def test_top_k_matches_transformers(top_ks: list[int]) -> None:
    torch.manual_seed(0)
    scores = torch.randn(len(top_ks), 1000)
    original = ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(top_k=64))
    fast = TopKByTopk(TopKLogitsWarper(top_k=64))
    arg = torch.tensor(top_ks, dtype=torch.int32)
    assert torch.equal(fast(scores.clone(), arg), original(scores.clone(), arg))


@pytest.mark.parametrize("top_ps", [[1.0, 1.0, 1.0], [1.0, 0.9, 1.0], [0.5, 0.95, 0.1]])
def test_top_p_matches_transformers(top_ps: list[float]) -> None:
    torch.manual_seed(1)
    scores = torch.randn(len(top_ps), 500) * 3
    original = ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(top_p=0.95))
    fast = TopPSkippedWhenWhole(TopPLogitsWarper(top_p=0.95))
    arg = _as_int32(top_ps)
    assert torch.equal(fast(scores.clone(), arg), original(scores.clone(), arg))


def test_use_fast_warpers_swaps_both_in_place() -> None:
    class _Manager:
        class logit_processor:  # noqa: N801 - the attribute names transformers uses
            logits_processor = [
                ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(top_k=64)),
                ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(top_p=0.95)),
            ]

    assert use_fast_warpers(_Manager) == 2
    kinds = [type(p) for p in _Manager.logit_processor.logits_processor]
    assert kinds == [TopKByTopk, TopPSkippedWhenWhole]
    assert _Manager.logit_processor.logits_processor[0].top_k == 64
