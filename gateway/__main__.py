"""``python -m gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import gc
import logging
import sys

import uvicorn

from gateway.app import create_app
from gateway.core.settings import GatewaySettings
from gateway.services.apikeys import KeyConfigError
from shared.logs import configure_logging
from shared.redis_url import credentials_refused
from shared.registry import RegistryError

logger = logging.getLogger("gateway")


def _tune_gc() -> None:
    """Shorter, rarer garbage-collector pauses while serving.

    With a thousand open streams, CPython's default thresholds ran a full collection every few
    seconds, each stopping the event loop for 50-250 ms (every stream stalls meanwhile; gc
    callbacks measured 2.6 s of pauses in a 40 s load test). Objects that live as long as
    the process (modules, routes, pydantic schemas) are frozen out of the scans, and young
    collections run after 20,000 allocations instead of 700: 0.6 s of pauses in the same test.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


def main() -> int:
    settings = GatewaySettings()
    configure_logging(settings.gateway_log_level)
    refused = credentials_refused(settings.redis_url)
    if refused:
        logger.error("cannot start: %s", refused)
        return 2
    try:
        app = create_app(settings)
    except (RegistryError, KeyConfigError) as exc:
        logger.error("cannot start: %s", exc)
        return 2
    _tune_gc()
    uvicorn.run(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,  # keep our logging set-up
        access_log=False,  # access lines carry no patient text, but the audit log is the record
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
