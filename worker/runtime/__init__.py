"""The serving runtime: a worker process's Celery consumer and everything around one job.

* :mod:`~worker.runtime.celery_app` — the Celery app: one thin task, background intake;
* :mod:`~worker.runtime.runner` — one job: claim, run the engine, publish, store the turn;
* :mod:`~worker.runtime.lease` — job claims, renewed every second in one pipeline;
* :mod:`~worker.runtime.cancel` — the cancel listener;
* :mod:`~worker.runtime.events` — fenced writes of a job's events;
* :mod:`~worker.runtime.token_writer` — one thread writes every job's tokens;
* :mod:`~worker.runtime.heartbeat` — the worker's heartbeat (withdrawn when a thread died);
* :mod:`~worker.runtime.conversation` — stored conversation turns.

It reaches the model only through :class:`worker.engines.base.GenerationEngine`; the process is
assembled by ``worker/__main__.py``.
"""
