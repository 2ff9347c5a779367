"""Engines: what turns a job's messages into streamed text.

* :mod:`~worker.engines.base` — :class:`~worker.engines.base.Engine`, the generation sequence
  written once (the job runner calls it), results, prompt errors;
* :mod:`~worker.engines.prompt` — chat template, context trimming, continuation;
* :mod:`~worker.engines.detokenize` — token ids to text deltas, stop strings;
* :mod:`~worker.engines.single` — one request at a time, compiled, on the inference thread;
* :mod:`~worker.engines.batching` — continuous batching;
* :mod:`~worker.engines.model` — the model's decoding loop: the choice between the two;
* :mod:`~worker.engines.loadtest` — fixed-rate tokens and no model, to measure the rest.

An engine implements only its decoding loop (:meth:`~worker.engines.base.Engine.decode`) and
brings its prompt side (:class:`~worker.engines.base.Prompting`).

:func:`worker.engines.factory.build_engine` assembles the model engine from a loaded model and
the worker's options. This package's ``__init__`` imports nothing, so that importing the
protocol (``base``) or the load-test engine does not load transformers.
"""
