"""The GPU worker: loads a registry model and runs generation jobs from its Celery queue.

Its products, one package each:

* :mod:`worker.runtime` — serving: the Celery consumer, job runner, leases, events, heartbeat;
* :mod:`worker.engines` — generation: chat → prompt → decoding → text deltas → result;
* :mod:`worker.weights` — weights: sources, the hub, quantization, loading;
* :mod:`worker.setup` — the ``medgemma setup token|download|check`` command.

At the top: ``__main__.py`` (``python -m worker``: loads the model, builds the engine, starts
the runtime), ``healthcheck.py`` (``python -m worker.healthcheck``, the container's check),
``settings.py`` (the ``WORKER_*`` settings) and ``torch_env.py`` (process-wide torch settings,
set before torch is imported).
"""
