"""Logging set-up for every process: one line per record, no patient text.

Log calls in this project pass identifiers, counts and exception *types* only — never a
prompt, an answer, image bytes, a token or an API key. Libraries that could echo request data
at INFO are held at WARNING.

transformers' continuous batching logs through its own logger, outside the ``transformers``
tree and with its own handler: several INFO lines at every start and stop of the batch (many a
second in a busy CPU worker), and two warnings that print token ids, which are a prompt's or an
answer's text, encoded ("Request with ids [...] will be dropped" when the manager is stopping,
"generated a useless token: N"). It is held at WARNING, and every record of it that carries a
token id is dropped.
"""

from __future__ import annotations

import logging
import re

_QUIET = ("httpx", "httpcore", "urllib3", "transformers", "accelerate", "bitsandbytes", "PIL")
CB_LOGGER = "ContinuousBatchingLogger"  # transformers.generation.continuous_batching.utils
# A list of ids ("[2, 105, 2364") or one id after a word about tokens or ids ("token: 108").
_TOKEN_IDS = re.compile(r"\[\s*\d+\s*,\s*\d+|\b(?:tokens?|ids?)\b\W{0,3}\d", re.IGNORECASE)


class NoTokenIds(logging.Filter):
    """Drops a record whose message carries token ids (encoded patient text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _TOKEN_IDS.search(record.getMessage()) is None


_NO_TOKEN_IDS = NoTokenIds()  # one instance: adding it again is a no-op


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
        force=True,
    )
    for name in (*_QUIET, CB_LOGGER):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(CB_LOGGER).addFilter(_NO_TOKEN_IDS)
