"""Start and stop ``transformers serve`` (Hugging Face's OpenAI-compatible server) for benchmarks.

The stack is benchmarked side by side with the server that ships with transformers, on the same
local model folder and the same workload. This module only runs that server as a subprocess
(through :mod:`devstack.processes`, like the stack's own processes); the load generator talks to
it over HTTP. What we found with transformers 5.24 on CPU (see also ``transformers serve --help``):

* **Command.** ``transformers serve <abs folder> --device cpu --dtype float32 --host 127.0.0.1
  --port N [--continuous-batching --cb-num-blocks B --cb-max-batch-tokens T]``. The positional
  FORCE_MODEL preloads the folder before uvicorn binds the port and pins the server to it (no
  load on demand, no idle unload). The child gets ``HF_HUB_OFFLINE=1`` (nothing is fetched),
  ``TOKENIZERS_PARALLELISM=false`` and ``HF_HUB_DISABLE_UPDATE_CHECK=1`` (otherwise the CLI asks
  PyPI for a newer transformers once a day).
* **Readiness.** ``GET /health`` answers 200 only once the model is loaded (a few seconds for
  SmolLM2-135M); it answers 503 if the continuous-batching worker thread has died.
  ``GET /v1/models`` lists the pinned model alone, with ``status.value == "loaded"``.
* **Model name.** A pinned server accepts ``model`` equal to the FORCE_MODEL string exactly
  (here the resolved folder path, see :func:`served_model_name`) or no ``model`` at all; anything
  else is a 400 ("Server is pinned to ...").
* **Continuous batching on CPU.** Without ``--cb-num-blocks`` the paged KV cache is sized to
  ``max_memory_percent`` (0.8-0.9) of *total* RAM minus the process RSS, and the default
  ``max_batch_tokens`` is 8192 (with an 8192 x (8192 + cache tokens) float attention mask): always
  give both, as :data:`CB_NUM_BLOCKS` and :data:`CB_MAX_BATCH_TOKENS` do. A block holds 256 tokens
  of every layer (``--cb-block-size`` only sets the deprecated ``block_size`` alias of
  ``page_size``). Flags in ``extra_args`` come last, so they override these (click keeps the last
  value). The cache is allocated on the first request, which is therefore slower: warm up first.
  Continuous batching only applies to text-only models (modality LLM): a
  ``Gemma3ForConditionalGeneration`` folder with a processor (MedGemma 4B, the multimodal tiny
  Gemma) is served one request at a time even with ``--continuous-batching`` (the log says "does
  not support continuous batching. Falling back to sequential generation."); without it, too,
  concurrent requests are served one after another.
* **Sampling.** ``temperature: 0`` sets ``do_sample=False``; a temperature > 0 samples only if the
  model's generation config (or the request's ``generation_config``) has ``do_sample: true``
  (SmolLM2's has not: it stays greedy, with a "generation flags are not valid" warning). Under
  continuous batching the sampling set-up (``do_sample``, temperature, top-p, logits processors)
  comes from the *first* request the server receives (``init_cb``); later requests only bring
  their ``max_tokens`` and EOS id.
* **Streaming.** SSE chunks are ``chat.completion.chunk`` objects: a first one with
  ``delta.role`` only, one ``delta.content`` per decoded piece (pieces that end inside a UTF-8
  character are merged, so count tokens from ``usage``, not from chunks), then a last one with an
  empty delta, ``finish_reason`` ("length" or "stop") and ``usage`` -- always, whether or not
  ``stream_options`` is sent (accepted but ignored, with a warning). There is no
  ``data: [DONE]`` line: the stream just ends (the openai SDK copes).
* **Length.** ``max_tokens`` (or ``max_completion_tokens``) sets ``max_new_tokens`` (default: at
  least 1024). There is no ``ignore_eos`` or ``min_tokens`` (unknown fields are a 422). Exactly N
  tokens, with and without continuous batching: ``max_tokens: N`` plus
  ``"generation_config": "{\\"eos_token_id\\": -1}"`` (a JSON *string*; it replaces the model's
  generation config, then ``max_tokens``/``temperature`` apply on top; the sequential path logs
  "eos_token_id should consist of positive integers" once and works). ``min_new_tokens`` there
  works only without continuous batching.
* **Stopping.** SIGTERM shuts uvicorn down in under a second; the exit code is then -15 (uvicorn
  re-raises the signal), not 0.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from devstack.processes import Proc, spawn, wait_for

# Paged KV cache for --continuous-batching on CPU: 32 blocks of 256 tokens = 8192 tokens in all
# (about 380 MB for SmolLM2-135M in float32), and at most 128 tokens per forward pass (longer
# prompts are prefilled in chunks). On 2 CPU cores SmolLM2 decoded one stream at ~16 tok/s with
# 32/128 and with 4/512, but at ~7 tok/s with 32/512: keep max_batch_tokens small on CPU.
CB_NUM_BLOCKS = 32
CB_MAX_BATCH_TOKENS = 128

HOST = "127.0.0.1"

CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
}

# The `transformers` console script, run with this interpreter (no PATH lookup).
_CLI = "from transformers.cli.transformers import main; main()"


def served_model_name(model_dir: Path) -> str:
    """The ``model`` to send: the FORCE_MODEL string the server was started with."""
    return str(Path(model_dir).resolve())


def transformers_serve_argv(
    model_dir: Path,
    port: int,
    *,
    continuous_batching: bool,
    device: str = "cpu",
    dtype: str = "float32",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of :func:`start_transformers_serve`."""
    argv = [
        sys.executable,
        "-c",
        _CLI,
        "serve",
        served_model_name(model_dir),
        "--device",
        device,
        "--dtype",
        dtype,
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    if continuous_batching:
        argv += [
            "--continuous-batching",
            "--cb-num-blocks",
            str(CB_NUM_BLOCKS),
            "--cb-max-batch-tokens",
            str(CB_MAX_BATCH_TOKENS),
        ]
    else:
        argv.append("--no-continuous-batching")
    return argv + list(extra_args)


def start_transformers_serve(
    model_dir: Path,
    port: int,
    log_path: Path,
    *,
    continuous_batching: bool,
    device: str = "cpu",
    dtype: str = "float32",
    extra_args: Sequence[str] = (),
) -> Proc:
    """Start ``transformers serve`` pinned to ``model_dir`` on ``127.0.0.1:port``; do not wait.

    stdout and stderr go to ``log_path``. Follow with :func:`wait_transformers_serve`; stop with
    ``Proc.stop()`` (SIGTERM, then SIGKILL).
    """
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a model folder")
    argv = transformers_serve_argv(
        model_dir,
        port,
        continuous_batching=continuous_batching,
        device=device,
        dtype=dtype,
        extra_args=extra_args,
    )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return spawn("transformers-serve", argv, CHILD_ENV, log_path)


def wait_transformers_serve(port: int, timeout_s: float, proc: Proc | None = None) -> None:
    """Wait until ``GET /health`` answers 200, i.e. the pinned model is loaded.

    With ``proc``, fail at once if the server exits (the reason is in its log).
    """

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=1) as r:
                return bool(r.status == 200 and json.load(r).get("status") == "ok")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    wait_for(up, timeout_s, f"waiting for transformers serve on port {port}", proc)
