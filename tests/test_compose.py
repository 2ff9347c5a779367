"""Structure checks for the container deployment (no Docker engine needed).

Parses docker-compose.yml, docker-compose.cpu.yml, the Dockerfiles, .dockerignore, .env.example and
pyproject.toml, and asserts the rules the deployment depends on: Redis private and persistent, the
gateway free of ML packages, workers scalable, on a GPU, sharing one model cache and given time to
finish a generation on shutdown.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
HF_CACHE_MOUNT = "/cache/huggingface"
ML_PACKAGES = {"torch", "transformers", "bitsandbytes", "accelerate", "tokenizers", "safetensors"}
MIN_WORKER_GRACE_S = 120.0


# --------------------------------------------------------------------------- loading helpers


class Reset:
    """Compose's `!reset` tag: the attribute goes back to its default (is removed)."""

    def __repr__(self) -> str:
        return "!reset"


class Override:
    """Compose's `!override` tag: the value replaces the base value instead of merging."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """A safe loader that understands Compose's merge tags."""


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _construct_reset)
ComposeLoader.add_constructor("!override", _construct_override)


def load_compose(path: Path) -> dict[str, Any]:
    assert path.is_file(), f"{path.name} is missing"
    data = yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - safe loader subclass
    assert isinstance(data, dict), f"{path.name} is not a YAML mapping"
    return data


def merge_compose(base: Any, override: Any) -> Any:
    """Merge an override file into a base file the way Compose does (enough for these checks)."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge_compose(merged[key], value)
            else:
                merged[key] = value.value if isinstance(value, Override) else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return override


def env_dict(service: dict[str, Any]) -> dict[str, Any]:
    """A service's `environment`, in mapping or list form, as a dict."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {key: value for key, value in pairs}
    return dict(env)


def interpolation_default(value: Any) -> str | None:
    """'${VAR:-120}' -> '120'; a plain value is returned as text."""
    if value is None:
        return None
    text = str(value)
    match = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", text)
    return match.group(1) if match else text


_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(value: Any) -> float:
    """Compose durations: 150s, 2m30s, 1h, 500ms, 1.5s (a bare number is seconds)."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    if not parts or "".join(num + unit for num, unit in parts) != text:
        raise ValueError(f"not a compose duration: {value!r}")
    return sum(float(num) * _DURATION_UNITS[unit] for num, unit in parts)


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) for each volume, short or long syntax."""
    mounts = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            mounts.append((str(item.get("source", "")), str(item.get("target", ""))))
        else:
            source, _, rest = str(item).partition(":")
            mounts.append((source, rest.split(":")[0]))
    return mounts


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    reservations = (deploy.get("resources") or {}).get("reservations") or {}
    devices = reservations.get("devices") or []
    return [
        d
        for d in devices
        if isinstance(d, dict)
        and (d.get("driver") == "nvidia" or "gpu" in (d.get("capabilities") or []))
    ]


def healthcheck_text(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    if isinstance(test, list):
        return " ".join(str(part) for part in test)
    return str(test or "")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    assert path.is_file(), f"{path.name} is missing"
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    result = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def env_example_vars() -> dict[str, str]:
    assert ENV_EXAMPLE.is_file(), ".env.example is missing"
    found: dict[str, str] = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), start=1):
        match = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
        if not match:
            continue
        name, value = match.groups()
        assert name not in found, f".env.example defines {name} twice (line {number})"
        found[name] = value
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose.get("services")
    assert isinstance(svcs, dict), "docker-compose.yml has no `services` mapping"
    return svcs


# --------------------------------------------------------------------------- helpers' own checks


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("150s", 150.0), ("2m30s", 150.0), ("1h", 3600.0), ("500ms", 0.5), ("1m", 60.0), (90, 90.0)],
)
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "150", "2 m", "abc", "10x"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration_s(text)


# --------------------------------------------------------------------------- docker-compose.yml


def test_compose_has_core_services_and_no_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "drop the obsolete top-level `version:` key (compose spec)"
    missing = {"redis", "gateway", "worker"} - set(compose.get("services") or {})
    assert not missing, f"docker-compose.yml lacks services: {sorted(missing)}"


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        image = svc.get("image")
        if image is None:
            assert "build" in svc, f"service {name} has neither image nor build"
            continue
        repo, _, tag = str(image).rpartition(":")
        assert repo and "/" not in tag, f"service {name}: image {image!r} has no tag; pin it"
        assert tag != "latest", f"service {name}: image {image!r} uses :latest; pin a version"
    assert services["redis"].get("image", "").startswith("redis:7.4"), (
        "redis must use the official redis:7.4(-alpine) image"
    )


def test_redis_is_private_persistent_and_healthchecked(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    redis = services["redis"]
    assert "ports" not in redis, (
        "redis must not publish ports to the host: it has no password and holds conversations"
    )
    command = redis.get("command")
    command_text = " ".join(command) if isinstance(command, list) else str(command or "")
    assert re.search(r"--appendonly\s+yes", command_text), (
        "redis must run with `--appendonly yes` so conversations and queued jobs survive a restart"
    )
    mounts = volume_mounts(redis)
    data = [source for source, target in mounts if target == "/data"]
    assert data, "redis needs a volume mounted at /data"
    assert data[0] in (compose.get("volumes") or {}), (
        f"redis's /data volume {data[0]!r} must be a named volume declared in top-level `volumes`"
    )
    check = healthcheck_text(redis)
    assert "redis-cli" in check and "ping" in check, "redis healthcheck must run `redis-cli ping`"


def test_gateway(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    build = gateway.get("build") or {}
    assert isinstance(build, dict) and build.get("dockerfile") == "Dockerfile.gateway", (
        "gateway must build from Dockerfile.gateway"
    )
    check = healthcheck_text(gateway)
    assert "/readyz" in check, "gateway healthcheck must hit /readyz"
    assert "curl" not in check and "wget" not in check, (
        "python:3.11-slim has neither curl nor wget; use python's urllib in the healthcheck"
    )
    depends = gateway.get("depends_on") or {}
    assert isinstance(depends, dict) and (depends.get("redis") or {}).get("condition") == (
        "service_healthy"
    ), "gateway must depend on redis with condition service_healthy"
    ports = [str(p) for p in gateway.get("ports") or []]
    assert ports == ["${GATEWAY_BIND:-127.0.0.1}:${GATEWAY_PUBLISH_PORT:-8000}:8000"], (
        f"gateway must publish exactly one port, on loopback by default; got {ports}"
    )
    assert gateway.get("restart") == "unless-stopped", "gateway: restart must be unless-stopped"


def test_gateway_does_not_receive_the_hf_token(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    env = env_dict(gateway)
    uses_env_file = bool(gateway.get("env_file"))
    for name in ("HF_TOKEN", "HUGGINGFACE_TOKEN"):
        value = env.get(name)
        if uses_env_file:
            # env_file passes all of .env (token included); environment must blank it out.
            assert value == "", f'gateway gets .env via env_file, so it must set {name}: ""'
        else:
            assert not value, f"gateway must not receive {name}; only the worker needs it"


def test_worker_gpu_reservation(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    build = worker.get("build") or {}
    assert isinstance(build, dict) and build.get("dockerfile") == "Dockerfile.worker", (
        "worker must build from Dockerfile.worker"
    )
    devices = gpu_devices(worker)
    assert len(devices) == 1, (
        "worker needs one deploy.resources.reservations.devices entry with driver nvidia"
    )
    device = devices[0]
    assert device.get("driver") == "nvidia", "worker GPU reservation: driver must be nvidia"
    assert device.get("count") == 1, (
        f"worker GPU reservation: count must be 1 (one GPU per worker), got {device.get('count')!r}"
    )
    assert "gpu" in (device.get("capabilities") or []), (
        "worker GPU reservation: capabilities must include gpu"
    )


def test_worker_is_scalable(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker, (
        "worker must not set container_name: `docker compose up --scale worker=N` needs "
        "generated names"
    )
    assert "ports" not in worker, (
        "worker must not publish ports: replicas would collide and workers only talk to Redis"
    )


def test_worker_shares_one_hf_cache(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    worker = services["worker"]
    mounts = volume_mounts(worker)
    assert ("hf-cache", HF_CACHE_MOUNT) in mounts, (
        f"worker must mount the named volume hf-cache at {HF_CACHE_MOUNT}; got {mounts}"
    )
    assert "hf-cache" in (compose.get("volumes") or {}), (
        "hf-cache must be declared under top-level `volumes` (a named volume shared by all workers)"
    )
    assert env_dict(worker).get("HF_HOME") == HF_CACHE_MOUNT, (
        f"worker must set HF_HOME={HF_CACHE_MOUNT}, where the hf-cache volume is mounted"
    )
    assert "HF_TOKEN" in env_dict(worker) or worker.get("env_file"), (
        "worker must receive HF_TOKEN (from .env)"
    )


def test_worker_shutdown_grace(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "stop_grace_period" in worker, (
        "worker needs stop_grace_period: Docker's default 10 s kills a generation mid-answer"
    )
    grace = parse_duration_s(worker["stop_grace_period"])
    assert grace >= MIN_WORKER_GRACE_S, (
        f"worker stop_grace_period is {grace:g}s; it must be at least {MIN_WORKER_GRACE_S:g}s"
    )
    settings = [interpolation_default(env_dict(worker).get("WORKER_SHUTDOWN_GRACE_S"))]
    settings.append(env_example_vars().get("WORKER_SHUTDOWN_GRACE_S"))
    for value in settings:
        if value:
            assert grace > float(value), (
                f"worker stop_grace_period ({grace:g}s) must exceed WORKER_SHUTDOWN_GRACE_S "
                f"({value}s) so Celery's own shutdown finishes before Docker's SIGKILL"
            )
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM", "worker stop_signal must be SIGTERM"


def test_worker_health_restart_and_dependencies(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "worker.healthcheck" in healthcheck_text(worker), (
        "worker healthcheck must run `python -m worker.healthcheck`"
    )
    depends = worker.get("depends_on") or {}
    assert isinstance(depends, dict) and (depends.get("redis") or {}).get("condition") == (
        "service_healthy"
    ), "worker must depend on redis with condition service_healthy"
    assert worker.get("restart") == "unless-stopped", "worker: restart must be unless-stopped"


def test_monitoring_profile(services: dict[str, dict[str, Any]]) -> None:
    for name in ("prometheus", "flower"):
        assert name in services, f"monitoring service {name} is missing"
        assert services[name].get("profiles") == ["monitoring"], (
            f"{name} must be only in the `monitoring` profile"
        )
    for name in ("redis", "gateway", "worker"):
        assert not services[name].get("profiles"), f"core service {name} must not have a profile"
    prom_mounts = volume_mounts(services["prometheus"])
    assert any(src.endswith("deploy/prometheus.yml") for src, _ in prom_mounts), (
        "prometheus must mount deploy/prometheus.yml"
    )
    for name in ("prometheus", "flower"):
        for port in services[name].get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), (
                f"{name} publishes {port!r}; bind it to 127.0.0.1 (no authentication)"
            )


def test_prometheus_scrapes_gateway_metrics() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = config.get("scrape_configs") or []
    gateway_jobs = [
        job
        for job in jobs
        for static in job.get("static_configs") or []
        if "gateway:8000" in (static.get("targets") or [])
    ]
    assert gateway_jobs, "deploy/prometheus.yml must scrape gateway:8000"
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in gateway_jobs), (
        "the gateway scrape job must read /metrics"
    )


# --------------------------------------------------------------------------- docker-compose.cpu.yml


def test_cpu_override_removes_gpu_reservation(compose: dict[str, Any]) -> None:
    override = load_compose(COMPOSE_CPU)
    assert "version" not in override, "drop the obsolete `version:` key from docker-compose.cpu.yml"
    merged = merge_compose(compose, override)
    worker = merged["services"]["worker"]
    assert not gpu_devices(worker), (
        "docker-compose.cpu.yml must remove the worker's GPU reservation "
        "(`devices: !reset []` or `deploy: !reset {}`)"
    )
    assert str(env_dict(worker).get("WORKER_DEVICE")) == "cpu", (
        "docker-compose.cpu.yml must set WORKER_DEVICE=cpu for the worker"
    )
    # The rest of the worker must survive the merge.
    assert ("hf-cache", HF_CACHE_MOUNT) in volume_mounts(worker)


# --------------------------------------------------------------------------- .env.example


def _strings(node: Any) -> list[str]:
    """Every string (keys included) in a loaded YAML document."""
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in _strings(key) + _strings(value)]
    if isinstance(node, list):
        return [text for item in node for text in _strings(item)]
    if isinstance(node, Override):
        return _strings(node.value)
    return [node] if isinstance(node, str) else []


def test_compose_variables_are_documented() -> None:
    documented = set(env_example_vars())
    referenced: dict[str, set[str]] = {}
    for path in (COMPOSE, COMPOSE_CPU):
        # Compose interpolates values and keys, not comments. `$$` is its escape for a literal `$`.
        text = "\n".join(_strings(load_compose(path))).replace("$$", "")
        for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text):
            referenced.setdefault(name, set()).add(path.name)
        bare = re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text)
        assert not bare, f"{path.name}: use ${{VAR}} rather than bare $VAR: {sorted(set(bare))}"
    missing = {name: sorted(files) for name, files in referenced.items() if name not in documented}
    assert not missing, f"variables used in compose files but not in .env.example: {missing}"


def test_env_example_documents_every_setting() -> None:
    expected = {
        "REDIS_URL",
        "MODELS_FILE",
        "KEY_PREFIX",
        "JOB_TTL_S",
        "GATEWAY_HOST",
        "GATEWAY_PORT",
        "GATEWAY_API_KEYS",
        "GATEWAY_DEFAULT_MODEL",
        "GATEWAY_LOG_LEVEL",
        "WORKER_MODEL",
        "WORKER_DEVICE",
        "WORKER_CONCURRENCY",
        "WORKER_CPU_QUANTIZATION",
        "HF_TOKEN",
        "HUGGINGFACE_TOKEN",
        "HF_HOME",
        "WORKER_SHUTDOWN_GRACE_S",
        "GATEWAY_PUBLISH_PORT",
        "GATEWAY_BIND",
    }
    found = env_example_vars()
    missing = expected - set(found)
    assert not missing, f".env.example lacks: {sorted(missing)}"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^([A-Z][A-Z0-9_]*)=", line)
        if match:
            previous = lines[index - 1].strip() if index else ""
            assert previous.startswith("#"), (
                f".env.example: {match.group(1)} needs a comment on the line above it"
            )


def test_env_example_has_no_secrets() -> None:
    found = env_example_vars()
    for name in ("GATEWAY_API_KEYS", "HF_TOKEN", "HUGGINGFACE_TOKEN"):
        assert found.get(name) == "", f".env.example must leave {name} empty (a secret)"


# --------------------------------------------------------------------------- Dockerfiles


def _last(instructions: list[tuple[str, str]], keyword: str) -> str | None:
    values = [args for kw, args in instructions if kw == keyword]
    return values[-1] if values else None


def _assert_non_root(name: str, instructions: list[tuple[str, str]]) -> None:
    user = _last(instructions, "USER")
    assert user, f"{name} must switch to a non-root USER"
    assert user.split(":")[0] not in {"root", "0"}, f"{name} runs as {user!r}; use a non-root user"


def _assert_exec_form(name: str, instructions: list[tuple[str, str]], module: str) -> None:
    cmd = _last(instructions, "CMD") or ""
    entrypoint = _last(instructions, "ENTRYPOINT") or ""
    start = cmd if "python" in cmd else entrypoint
    assert start.startswith("["), f"{name}: start `python -m {module}` in exec form (JSON array)"
    assert [part.strip().strip('"') for part in start.strip("[]").split(",")][-3:] == [
        "python",
        "-m",
        module,
    ], f"{name} must start `python -m {module}`; got {start!r}"


def test_dockerfile_gateway() -> None:
    instructions = dockerfile_instructions(ROOT / "Dockerfile.gateway")
    base = _last(instructions, "FROM") or ""
    assert re.match(r"python:3\.11[\w.-]*slim", base), (
        f"gateway base must be python:3.11 slim: {base!r}"
    )
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert re.search(r"pip install[^&;]*--no-cache-dir[^&;]*[\"']?\.\[gateway\][\"']?", runs), (
        "Dockerfile.gateway must `pip install --no-cache-dir .[gateway]`"
    )
    assert ".[worker]" not in runs, "Dockerfile.gateway must not install the worker extra"
    text = " ".join(args for _, args in instructions).lower()
    for package in sorted(ML_PACKAGES):
        assert not re.search(rf"\b{package}\b", text), (
            f"Dockerfile.gateway mentions {package}; the gateway image must have no ML packages"
        )
    assert re.search(r"pip install[^&;]*-c constraints\.txt[^&;]*\.\[gateway\]", runs), (
        "Dockerfile.gateway must install with the tested versions: `-c constraints.txt`"
    )
    allowed = {"pyproject.toml", "README.md", "constraints.txt", "models.json", "gateway", "shared"}
    for kw, args in instructions:
        if kw == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            extra = [s for s in sources if s.removeprefix("./").rstrip("/") not in allowed]
            assert not extra, f"Dockerfile.gateway copies {extra}; copy only {sorted(allowed)}"
    assert _last(instructions, "EXPOSE") == "8000", "Dockerfile.gateway must EXPOSE 8000"
    _assert_non_root("Dockerfile.gateway", instructions)
    _assert_exec_form("Dockerfile.gateway", instructions, "gateway")


def test_dockerfile_worker() -> None:
    instructions = dockerfile_instructions(ROOT / "Dockerfile.worker")
    base = _last(instructions, "FROM") or ""
    assert re.match(r"nvidia/cuda:\d+\.\d+\.\d+-[\w.-]*runtime", base), (
        f"worker base must be a pinned nvidia/cuda runtime image: {base!r}"
    )
    runs = [args for kw, args in instructions if kw == "RUN"]
    # Each shell command of every RUN, in build order.
    commands = [c.strip() for run in runs for c in re.split(r"&&|\|\||;", run)]
    pip = [c for c in commands if re.search(r"\bpip3? install\b", c)]
    torch_at = next((i for i, c in enumerate(pip) if "torch==2.13.0" in c), None)
    extra_at = next((i for i, c in enumerate(pip) if re.search(r"\.\[worker\]", c)), None)
    assert torch_at is not None, "Dockerfile.worker must `pip install torch==2.13.0` (pinned)"
    assert "download.pytorch.org/whl/cu" in pip[torch_at], (
        "Dockerfile.worker must install torch from a CUDA index, download.pytorch.org/whl/cu*"
    )
    assert extra_at is not None, "Dockerfile.worker must `pip install .[worker]`"
    assert "-c constraints.txt" in pip[extra_at], (
        "Dockerfile.worker must install .[worker] with the tested versions: `-c constraints.txt`"
    )
    assert torch_at < extra_at, (
        "Dockerfile.worker must install torch==2.13.0 in its own pip command BEFORE .[worker], "
        "so that pip never picks another torch build"
    )
    all_runs = " ".join(runs)
    for downloader in (
        "snapshot_download",
        "hf_hub_download",
        "huggingface-cli download",
        "hf download",
    ):
        assert downloader not in all_runs, (
            f"Dockerfile.worker runs {downloader!r}: weights must not be baked into the image"
        )
    envs = " ".join(args for kw, args in instructions if kw == "ENV")
    assert f"HF_HOME={HF_CACHE_MOUNT}" in envs, (
        f"Dockerfile.worker must set HF_HOME={HF_CACHE_MOUNT}"
    )
    _assert_non_root("Dockerfile.worker", instructions)
    _assert_exec_form("Dockerfile.worker", instructions, "worker")


def test_dockerignore() -> None:
    path = ROOT / ".dockerignore"
    assert path.is_file(), ".dockerignore is missing"
    entries = {
        line.strip().strip("/")
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    required = {".venv", ".git", "tests", ".env", "artifacts", "docs", "bench"}
    missing = required - entries
    assert not missing, f".dockerignore must exclude {sorted(missing)}"
    caches = {".pytest_cache", ".mypy_cache", ".ruff_cache"}
    assert caches <= entries, f".dockerignore must exclude {sorted(caches - entries)}"
    needed = {"README.md", "pyproject.toml", "models.json", "gateway", "worker", "shared"}
    for bad in ("*", "*.md", "*.json", "*.toml", *needed):
        assert bad not in entries, f".dockerignore excludes {bad!r}, which the images need"


# --------------------------------------------------------------------------- pyproject.toml


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot parse requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _extras_of(requirement: str) -> list[str]:
    match = re.match(r"\s*[A-Za-z0-9][A-Za-z0-9._-]*\s*\[([^\]]*)\]", requirement)
    return [e.strip() for e in match.group(1).split(",")] if match else []


def test_gateway_extra_has_no_ml_packages() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    own_name = _requirement_name(project["name"])
    extras: dict[str, list[str]] = project.get("optional-dependencies", {})
    assert "gateway" in extras, "pyproject.toml has no `gateway` extra"

    # The gateway installs [project].dependencies plus the gateway extra, following any
    # self-reference such as "medgemma-serve[other]".
    names: dict[str, str] = {}
    pending = [("[project].dependencies", req) for req in project.get("dependencies", [])]
    pending += [("gateway extra", req) for req in extras["gateway"]]
    seen_extras = {"gateway"}
    while pending:
        origin, requirement = pending.pop()
        name = _requirement_name(requirement)
        if name == own_name:
            for extra in _extras_of(requirement):
                if extra not in seen_extras:
                    seen_extras.add(extra)
                    pending += [(f"{extra} extra (via gateway)", r) for r in extras.get(extra, [])]
            continue
        names[name] = origin
    banned = {name: origin for name, origin in names.items() if name in ML_PACKAGES}
    assert not banned, f"the gateway install pulls ML packages: {banned}"
