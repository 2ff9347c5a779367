"""Logging set-up for every process: one line per record, no patient text.

Log calls in this project pass identifiers, counts and exception *types* only — never a
prompt, an answer, image bytes, a token or an API key. Libraries that could echo request data
at INFO are held at WARNING.
"""

from __future__ import annotations

import logging

_QUIET = ("httpx", "httpcore", "urllib3", "transformers", "accelerate", "bitsandbytes", "PIL")


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
        force=True,
    )
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
