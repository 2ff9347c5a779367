"""Every setting of every process is documented once in .env.example (issue: ops)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.core.settings import GatewaySettings
from gateway.services.apikeys import KeyConfigError, KeyStore
from worker.settings import WorkerSettings

ENV_EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"


def test_every_setting_is_documented_once() -> None:
    text = ENV_EXAMPLE.read_text()
    names = {n.upper() for cls in (GatewaySettings, WorkerSettings) for n in cls.model_fields}
    for name in sorted(names):
        count = len(re.findall(rf"^#?\s*{name}=", text, re.M))
        assert count == 1, f"{name} appears {count} times in .env.example"


def test_production_refuses_to_start_without_keys_or_with_the_demo_key() -> None:
    with pytest.raises(KeyConfigError, match="no API keys"):
        KeyStore.from_config(None, None, development=False)
    with pytest.raises(KeyConfigError, match="demo key"):
        KeyStore.from_config("demo-key:demo:user", None, development=False)
    dev = KeyStore.from_config(None, None, development=True)
    assert dev.uses_demo_key and dev.authenticate("demo-key") is not None
    keys = KeyStore.from_config(
        "longkey-123:dr-a:user,otherkey-456:ops:admin", None, development=False
    )
    who = keys.authenticate("otherkey-456")
    assert who is not None and who.user_id == "ops" and who.is_admin
    assert keys.authenticate("longkey-12") is None
