"""Weights: from a models.json entry to a model in memory.

* :mod:`~worker.weights.loader` — :func:`~worker.weights.loader.load_model`: device, dtype,
  quantization, the model, its tokenizer and processor;
* :mod:`~worker.weights.sources` — where the weights come from, as a local folder (hub snapshot,
  local folder, a package's file; ``.gguf`` files converted once);
* :mod:`~worker.weights.hub` — the Hugging Face hub: token, offline mode, downloads;
* :mod:`~worker.weights.hub_errors` — the one table of hub errors and what to do about each
  (the loader's and ``medgemma setup``'s);
* :mod:`~worker.weights.quantization` — 8-bit (torchao or bitsandbytes) and 4-bit NF4;
* :mod:`~worker.weights.errors` — :class:`~worker.weights.errors.ModelLoadError` and its codes.

This package's ``__init__`` imports nothing, so that the hub modules load without torch.
"""
