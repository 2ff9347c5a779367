"""``python -m gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from gateway.app import create_app
from gateway.auth import KeyConfigError
from gateway.settings import GatewaySettings
from shared.logs import configure_logging
from shared.redis_url import credentials_refused
from shared.registry import RegistryError

logger = logging.getLogger("gateway")


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
