"""``medgemma setup token|download|check``: get a worker machine ready, one step at a time.

* :mod:`~worker.setup.cli` — the command line (the ``medgemma`` console script);
* :mod:`~worker.setup.report` — the ``OK|WARN|FAIL`` lines every step reports;
* :mod:`~worker.setup.credentials` — the Hugging Face token and where it came from;
* :mod:`~worker.setup.token` — ``setup token``: does the hub accept the token for the model?
* :mod:`~worker.setup.download` — ``setup download``: fetch the weights, or copy a folder;
* :mod:`~worker.setup.check` — ``setup check``: versions, device, weights, then a smoke test;
* :mod:`~worker.setup.machine` — what the model needs (parameters, memory, disk) and what this
  machine has;
* :mod:`~worker.setup.smoke` — load the model as a worker does and generate one short answer.

Weights are fetched and loaded by :mod:`worker.weights`, exactly as a worker does, and hub
errors are explained from its one table (:mod:`worker.weights.hub_errors`). Nothing here ends
in a traceback for a problem a person can fix.
"""
