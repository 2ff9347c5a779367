"""The CPU stand-ins for transformers' per-request top-k / top-p warpers give the same scores,
and its sampler the same distribution."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.continuous_batching.model_runner import ModelRunner

from worker.engines.warpers import (
    TopKByTopk,
    TopPSkippedWhenWhole,
    sample_among_kept,
    use_fast_sampler,
    use_fast_warpers,
)


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


def _runner(do_sample: bool = True) -> Any:
    return SimpleNamespace(do_sample=do_sample, return_logprobs=False)


def test_sampler_draws_kept_tokens_with_their_probabilities() -> None:
    torch.manual_seed(2)
    vocab = 5000
    scores = torch.full((1, 3, vocab), float("-inf"))
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    tokens = torch.tensor([4321, 7, 2500, 999])
    scores[0, 0, tokens] = probs.log()  # a sampled request: four tokens kept
    scores[0, 1, 42] = 3.0  # a greedy request: top-k 1 keeps one
    scores[0, 2, tokens[:2]] = torch.tensor([0.1, 0.2])
    out = torch.zeros((2, 8), dtype=torch.int64)
    counts = torch.zeros(vocab)
    for _ in range(4000):
        sample_among_kept(_runner(), scores, out)
        counts[out[0, 0]] += 1
        assert out[0, 1] == 42
        assert out[0, 2] in tokens[:2]
    assert counts.sum() == counts[tokens].sum()  # never a token the warpers dropped
    assert torch.allclose(counts[tokens] / 4000, probs, atol=0.03)


def test_sampler_falls_back_to_transformers_when_most_tokens_are_kept() -> None:
    scores = torch.randn(1, 2, 3000)
    ours, theirs = torch.zeros((2, 4), dtype=torch.int64), torch.zeros((2, 4), dtype=torch.int64)
    torch.manual_seed(3)
    sample_among_kept(_runner(), scores, ours)
    torch.manual_seed(3)
    ModelRunner._sample(_runner(), scores, theirs)
    assert torch.equal(ours, theirs)
    sample_among_kept(_runner(do_sample=False), scores, ours)  # argmax, as transformers
    assert torch.equal(ours[0, :2], scores[0].argmax(-1))


def test_use_fast_sampler_covers_every_processor_the_manager_creates() -> None:
    class _Manager:
        def _create_batch_processor(self) -> Any:
            return SimpleNamespace(model_runner=SimpleNamespace(do_sample=True))

    manager = _Manager()
    use_fast_sampler(manager)
    for _ in range(2):  # a restart builds a new processor
        runner = manager._create_batch_processor().model_runner
        assert runner._sample.__func__ is sample_among_kept
