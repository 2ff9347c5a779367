"""The worker's process-wide torch settings on a CPU (worker/torch_env.py)."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

from worker.torch_env import GQA_VAR, prepare_cpu_torch


def _unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GQA_VAR, "")  # recorded, so what the test sets is undone after it
    monkeypatch.delenv(GQA_VAR)


def _masked_gqa_call() -> bool:
    """Whether transformers lets SDPA share key/value heads in a masked call (as in a batch)."""
    key = torch.zeros(1, 3, 16, 64)
    return use_gqa_in_sdpa(torch.ones(1, 1, 4, 16, dtype=torch.bool), key, key)


def test_cpu_worker_shares_key_value_heads_in_masked_attention(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _unset(monkeypatch)
    assert not _masked_gqa_call()  # transformers' default: copy keys and values per query head
    prepare_cpu_torch("cpu", compile_on=False)
    assert _masked_gqa_call()


def test_gpu_worker_and_operator_choice_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    _unset(monkeypatch)
    prepare_cpu_torch("cuda", compile_on=True)
    assert not _masked_gqa_call()
    monkeypatch.setenv(GQA_VAR, "0")
    prepare_cpu_torch("cpu", compile_on=True)
    assert not _masked_gqa_call()
