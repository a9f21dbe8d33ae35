"""docker-compose.yml, Dockerfile and .dockerignore are checked in CI without a Docker engine.

Where `docker compose` works, ``docker compose config`` validates the file against Compose's
own schema as well. Everywhere, the file is parsed with PyYAML, its ${VAR} interpolation is
done the way Compose does it, and the essentials are checked: known keys, images/builds,
health checks, healthy dependencies, named volumes, the GPU reservation and that workers
run ``hposvc worker`` against PostgreSQL and the MLflow server. The checker is also shown
to reject broken variants of the file, so it can fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Compose specification keys (https://compose-spec.io); anything else is a typo.
TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets", "include", "models"}
SERVICE_KEYS = {
    "annotations", "attach", "build", "blkio_config", "cap_add", "cap_drop", "cgroup", "cgroup_parent",
    "command", "configs", "container_name", "cpu_count", "cpu_percent", "cpu_period", "cpu_quota",
    "cpu_rt_period", "cpu_rt_runtime", "cpu_shares", "cpus", "cpuset", "credential_spec", "depends_on",
    "deploy", "develop", "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search", "domainname",
    "entrypoint", "env_file", "environment", "expose", "extends", "external_links", "extra_hosts",
    "gpus", "group_add", "healthcheck", "hostname", "image", "init", "ipc", "isolation", "labels",
    "links", "logging", "mac_address", "mem_limit", "mem_reservation", "mem_swappiness", "memswap_limit",
    "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid", "pids_limit", "platform",
    "ports", "post_start", "pre_stop", "privileged", "profiles", "pull_policy", "read_only", "restart",
    "runtime", "scale", "secrets", "security_opt", "shm_size", "stdin_open", "stop_grace_period",
    "stop_signal", "storage_opt", "sysctls", "tmpfs", "tty", "ulimits", "user", "userns_mode", "uts",
    "volumes", "volumes_from", "working_dir",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART_POLICIES = {"no", "always", "on-failure", "unless-stopped"}
_DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


# --- Compose's ${VAR} interpolation -----------------------------------------------------------


def interpolate(value: Any, env: dict[str, str], problems: list[str], where: str = "") -> Any:
    """Substitute ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$ like Compose."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, problems, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, problems, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        present = env.get(name)
        if op in (":-", "-"):
            use_default = present is None or (op == ":-" and present == "")
            return arg if use_default else present
        if op in (":?", "?"):
            if present is None or (op == ":?" and present == ""):
                problems.append(f"{where}: ${{{name}}} is required ({arg or 'no default'})")
                return ""
            return present
        if op in (":+", "+"):
            return arg if present else ""
        if present is None:
            problems.append(f"{where}: ${{{name}}} has no default, so Compose needs it set")
            return ""
        return present

    return _VARIABLE.sub(substitute, value)


def load_compose(text: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Parse a compose file (YAML anchors and << merges included) and interpolate it."""
    problems: list[str] = []
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        return {}, ["the file is not a YAML mapping"]
    return interpolate(raw, env or {}, problems), problems


# --- the checks ----------------------------------------------------------------------------------


def _command_list(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def _option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command and command.index(flag) + 1 < len(command) else None


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _named_volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """target → source of the named volumes a service mounts (short and long syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            if len(parts) >= 2 and not parts[0].startswith((".", "/", "~")):
                mounts[parts[1]] = parts[0]
        elif isinstance(volume, dict) and volume.get("type", "volume") == "volume" and volume.get("source"):
            mounts[volume["target"]] = volume["source"]
    return mounts


def _check_healthcheck(name: str, service: dict[str, Any], problems: list[str]) -> None:
    check = service.get("healthcheck")
    if not isinstance(check, dict):
        problems.append(f"services.{name}: no healthcheck")
        return
    for key in set(check) - HEALTHCHECK_KEYS:
        problems.append(f"services.{name}.healthcheck: unknown key {key!r}")
    test = check.get("test")
    if isinstance(test, list):
        if not test or test[0] not in ("CMD", "CMD-SHELL", "NONE") or len(test) < 2:
            problems.append(f"services.{name}.healthcheck.test must start with CMD or CMD-SHELL and a command")
    elif not isinstance(test, str) or not test.strip():
        problems.append(f"services.{name}.healthcheck.test is missing")
    for key in ("interval", "timeout", "start_period", "start_interval"):
        if key in check and not _DURATION.match(str(check[key])):
            problems.append(f"services.{name}.healthcheck.{key}: {check[key]!r} is not a duration like '5s'")
    if "retries" in check and (not isinstance(check["retries"], int) or check["retries"] < 1):
        problems.append(f"services.{name}.healthcheck.retries must be a positive integer")


def _check_worker(name: str, service: dict[str, Any], *, gpu: bool, problems: list[str]) -> None:
    where = f"services.{name}"
    build = service.get("build")
    context = build if isinstance(build, str) else (build or {}).get("context")
    if context not in (".", "./", str(ROOT)):
        problems.append(f"{where}: must be built from the project (build context '.'), got {context!r}")
    command = _command_list(service)
    # the image's ENTRYPOINT is hposvc, so the command starts at the subcommand
    if len(command) < 2 or command[0] != "worker" or command[1].startswith("-") or not command[1]:
        problems.append(f"{where}.command must run `hposvc worker STUDY ...`, got {command!r}")
    env = _environment(service)
    storage = _option(command, "--storage")
    if not (storage or "").startswith("postgresql+psycopg://") or "@postgres:5432/" not in (storage or ""):
        problems.append(f"{where}.command: --storage must be the postgres service's URL, got {storage!r}")
    if env.get("HPOSVC_STORAGE") != storage:
        problems.append(f"{where}.environment.HPOSVC_STORAGE must equal --storage ({storage!r})")
    if env.get("MLFLOW_TRACKING_URI") != "http://mlflow:5000":
        problems.append(f"{where}.environment.MLFLOW_TRACKING_URI must be http://mlflow:5000")
    deps = _depends_on(service)
    for needed in ("postgres", "mlflow"):
        if deps.get(needed) != "service_healthy":
            problems.append(f"{where}.depends_on.{needed} must have condition service_healthy")
    # `--scale worker=N` fails with a fixed container name or a fixed host port
    if "container_name" in service:
        problems.append(f"{where}: container_name prevents --scale")
    if any(":" in str(p) for p in service.get("ports", [])):
        problems.append(f"{where}: a fixed host port prevents --scale")

    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    if gpu:
        # Compose normalises count "all" to -1
        if not any(d.get("count") in ("all", -1) and "gpu" in d.get("capabilities", []) for d in nvidia):
            problems.append(f"{where}: needs deploy.resources.reservations.devices with driver nvidia, count all, capabilities [gpu]")
        if not service.get("profiles"):
            problems.append(f"{where}: a GPU reservation without a profile breaks `docker compose up` on hosts without GPUs")
    elif devices or service.get("gpus"):
        problems.append(f"{where}: the CPU worker must not reserve GPUs")


def compose_problems(doc: dict[str, Any]) -> list[str]:
    """Everything wrong with an (interpolated) hposvc compose file; empty when it is fine."""
    problems: list[str] = []
    for key in doc:
        if key not in TOP_LEVEL_KEYS and not str(key).startswith("x-"):
            problems.append(f"unknown top-level key {key!r}" + (" (obsolete in Compose v2)" if key == "version" else ""))
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        return [*problems, "no services"]
    declared_volumes = set(doc.get("volumes") or {})
    declared_configs = set(doc.get("configs") or {})

    for name, service in services.items():
        where = f"services.{name}"
        if not isinstance(service, dict):
            problems.append(f"{where} is not a mapping")
            continue
        for key in service:
            if key not in SERVICE_KEYS and not str(key).startswith("x-"):
                problems.append(f"{where}: unknown key {key!r}")
        if "image" not in service and "build" not in service:
            problems.append(f"{where}: needs an image or a build")
        for dep, condition in _depends_on(service).items():
            if dep not in services:
                problems.append(f"{where}.depends_on: no service {dep!r}")
            elif condition not in DEPENDS_CONDITIONS:
                problems.append(f"{where}.depends_on.{dep}: unknown condition {condition!r}")
            elif condition == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{where}.depends_on.{dep}: service_healthy, but {dep} has no healthcheck")
        for source in _named_volume_mounts(service).values():
            if source not in declared_volumes:
                problems.append(f"{where}.volumes: named volume {source!r} is not declared under volumes:")
        for config in service.get("configs", []):
            source = config if isinstance(config, str) else config.get("source")
            if source not in declared_configs:
                problems.append(f"{where}.configs: {source!r} is not declared under configs:")
        if "restart" in service and str(service["restart"]).split(":")[0] not in RESTART_POLICIES:
            problems.append(f"{where}.restart: unknown policy {service['restart']!r}")

    # 1) PostgreSQL: the study storage, persistent and health-checked
    postgres = services.get("postgres")
    if not isinstance(postgres, dict):
        problems.append("no postgres service")
    else:
        if not str(postgres.get("image", "")).startswith("postgres:15"):
            problems.append(f"services.postgres.image must be postgres:15, got {postgres.get('image')!r}")
        _check_healthcheck("postgres", postgres, problems)
        if "pg_isready" not in str(postgres.get("healthcheck", {}).get("test")):
            problems.append("services.postgres.healthcheck must use pg_isready")
        if "/var/lib/postgresql/data" not in _named_volume_mounts(postgres):
            problems.append("services.postgres needs a named volume at /var/lib/postgresql/data")

    # 2) MLflow: tracking server on PostgreSQL, serving artifacts from a volume
    mlflow = services.get("mlflow")
    if not isinstance(mlflow, dict):
        problems.append("no mlflow service")
    else:
        _check_healthcheck("mlflow", mlflow, problems)
        command = _command_list(mlflow)
        if not command or command[0] != "server":
            problems.append(f"services.mlflow.command must run `mlflow server`, got {command!r}")
        backend = _option(command, "--backend-store-uri") or ""
        if not backend.startswith("postgresql") or "@postgres:5432/" not in backend:
            problems.append(f"services.mlflow: --backend-store-uri must be the postgres service, got {backend!r}")
        if "--serve-artifacts" not in command:
            problems.append("services.mlflow: needs --serve-artifacts")
        destination = _option(command, "--artifacts-destination")
        if destination not in _named_volume_mounts(mlflow):
            problems.append(f"services.mlflow: --artifacts-destination {destination!r} must be a named volume")
        if _option(command, "--port") != "5000" or _option(command, "--host") != "0.0.0.0":
            problems.append("services.mlflow must listen on 0.0.0.0:5000 (workers use http://mlflow:5000)")
        if _depends_on(mlflow).get("postgres") != "service_healthy":
            problems.append("services.mlflow.depends_on.postgres must have condition service_healthy")
        database = backend.rsplit("/", 1)[-1]
        created = " ".join(str(c.get("content", "")) for c in (doc.get("configs") or {}).values())
        if isinstance(postgres, dict) and database != _environment(postgres).get("POSTGRES_DB") and (
            f"CREATE DATABASE {database}" not in created
        ):
            problems.append(f"services.mlflow uses database {database!r}, which nothing creates")

    # 3) workers: scalable, hposvc worker against both services; GPU and CPU variants
    if not isinstance(services.get("worker"), dict):
        problems.append("no worker service")
    else:
        _check_worker("worker", services["worker"], gpu=True, problems=problems)
    if isinstance(services.get("worker-cpu"), dict):
        _check_worker("worker-cpu", services["worker-cpu"], gpu=False, problems=problems)
    return problems


def dockerfile_problems(text: str) -> list[str]:
    """The Dockerfile essentials docker-compose.yml relies on."""
    problems = []
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    stages = {m.group(2): m.group(1) for line in lines if (m := re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I))}
    if "mlflow" not in stages or "hposvc" not in stages:
        problems.append(f"needs stages 'mlflow' and 'hposvc', has {sorted(stages)}")
    if not all(image.startswith("python:${PYTHON_VERSION}-slim") for image in stages.values()):
        problems.append("stages must build on python:<version>-slim")
    if not any(re.match(r"ARG\s+PYTHON_VERSION=3\.11$", line) for line in lines):
        problems.append("ARG PYTHON_VERSION must default to 3.11")
    if not any(line.startswith("ARG TORCH_VARIANT=") for line in lines):
        problems.append("needs ARG TORCH_VARIANT (cpu or cuda)")
    # the last stage is what a plain `docker build .` gives: it must be hposvc
    last_from = [line for line in lines if line.upper().startswith("FROM ")][-1:]
    if not last_from or not last_from[0].lower().endswith(" as hposvc"):
        problems.append("the last stage (the default target) must be hposvc")
    hposvc_part = "\n".join(lines[lines.index(last_from[0]) :]) if last_from else ""
    if 'ENTRYPOINT ["hposvc"]' not in hposvc_part:
        problems.append('the hposvc stage needs ENTRYPOINT ["hposvc"]')
    if not re.search(r'"\.\[[^"\]]*\bpostgres\b[^"\]]*\]"', hposvc_part):
        problems.append("the hposvc stage must install the project with the postgres extra")
    mlflow_part = "\n".join(lines[: lines.index(last_from[0])]) if last_from else ""
    if "psycopg" not in mlflow_part:
        problems.append("the mlflow stage needs psycopg for its PostgreSQL backend")
    return problems


# --- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_doc() -> dict[str, Any]:
    doc, problems = load_compose(COMPOSE_FILE.read_text(), env={})
    assert problems == [], problems
    return doc


def test_compose_file_has_every_essential(compose_doc):
    assert compose_problems(compose_doc) == []
    # what the README tells people to run
    assert compose_doc["services"]["worker"]["command"][:2] == ["worker", "quickstart"]
    assert compose_doc["services"]["worker"]["profiles"] == ["gpu"]
    assert compose_doc["services"]["worker-cpu"]["profiles"] == ["cpu"]
    assert "profiles" not in compose_doc["services"]["postgres"] and "profiles" not in compose_doc["services"]["mlflow"]


def test_interpolation_follows_the_environment():
    doc, problems = load_compose(COMPOSE_FILE.read_text(), env={"HPOSVC_STUDY": "survey", "POSTGRES_PASSWORD": "s3cret"})
    assert problems == []
    worker = doc["services"]["worker-cpu"]
    assert worker["command"][1] == "survey"
    assert worker["environment"]["HPOSVC_STORAGE"] == "postgresql+psycopg://hposvc:s3cret@postgres:5432/hposvc"
    assert doc["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"
    assert compose_problems(doc) == []
    _, problems = load_compose("services:\n  a:\n    image: ${NEEDED}\n    command: ${X:?give X}\n")
    assert problems == [
        "services.a.image: ${NEEDED} has no default, so Compose needs it set",
        "services.a.command: ${X} is required (give X)",
    ]


def _broken(doc: dict[str, Any], edit) -> list[str]:
    copy_ = copy.deepcopy(doc)
    edit(copy_)
    return compose_problems(copy_)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["services"]["postgres"].pop("healthcheck"), "services.postgres: no healthcheck"),
        (lambda d: d["services"]["mlflow"]["healthcheck"].update(interval="often"), "is not a duration"),
        (lambda d: d["services"]["worker"].pop("deploy"), "driver nvidia, count all"),
        (lambda d: d["services"]["worker"].pop("profiles"), "breaks `docker compose up` on hosts without GPUs"),
        (lambda d: d["services"]["worker"].update(command=["study", "run"]), "must run `hposvc worker STUDY"),
        (lambda d: d["services"]["worker"]["depends_on"].pop("mlflow"), "depends_on.mlflow must have condition service_healthy"),
        (lambda d: d["services"]["worker"].update(depends_on=["postgres", "mlflow"]), "depends_on.postgres must have condition"),
        (lambda d: d["services"]["worker"]["environment"].update(MLFLOW_TRACKING_URI="http://localhost:5000"), "MLFLOW_TRACKING_URI"),
        (lambda d: d["services"]["worker"].update(container_name="w"), "container_name prevents --scale"),
        (lambda d: d["services"]["worker-cpu"].update(deploy=d["services"]["worker"]["deploy"]), "must not reserve GPUs"),
        (lambda d: d["services"]["worker"].update(healthckeck={}), "unknown key 'healthckeck'"),
        (lambda d: d["services"]["mlflow"].pop("image") and d["services"]["mlflow"].pop("build"), "needs an image or a build"),
        (lambda d: d["services"]["mlflow"]["command"].remove("--serve-artifacts"), "needs --serve-artifacts"),
        (lambda d: d.pop("volumes"), "is not declared under volumes:"),
        (lambda d: d.pop("configs"), "nothing creates"),
        (lambda d: d["services"]["postgres"].update(image="postgres:16"), "must be postgres:15"),
        (lambda d: d["services"].pop("worker"), "no worker service"),
        (lambda d: d.update(version="3.9"), "obsolete"),
        (lambda d: d["services"]["worker"]["depends_on"].update(redis={"condition": "service_healthy"}), "no service 'redis'"),
    ],
)
def test_the_check_rejects_broken_files(compose_doc, edit, expected):
    problems = _broken(compose_doc, edit)
    assert any(expected in p for p in problems), problems


def test_yaml_syntax_errors_fail():
    broken = COMPOSE_FILE.read_text().replace("  postgres:\n    image: postgres:15", "  postgres:\n   image: postgres:15", 1)
    assert broken != COMPOSE_FILE.read_text()
    with pytest.raises(yaml.YAMLError):
        load_compose(broken)


def test_dockerfile_and_dockerignore():
    assert dockerfile_problems((ROOT / "Dockerfile").read_text()) == []
    assert dockerfile_problems("FROM python:3.12\nCMD hposvc\n")  # and it can fail
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "hposvc-data"} <= ignored
    # what the image copies must not be ignored
    assert not {"hposvc", "studies", "pyproject.toml", "README.md"} & ignored


def compose_command() -> list[str] | None:
    """A real Docker Compose v2: the docker CLI's plugin, else a standalone binary on PATH.

    ``bash .ci/run`` puts the standalone binary in .venv/bin where it can. A Python wrapper
    named docker-compose is not used: it may not pass on the exit code.
    """
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    standalone = shutil.which("docker-compose")
    if standalone and Path(standalone).read_bytes()[:4] == b"\x7fELF":
        candidates.append([standalone])
    for command in candidates:
        try:
            probe = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=60)
        except OSError:
            continue
        if probe.returncode == 0 and re.search(r"version v?2\.", probe.stdout):
            return command
    return None


def _run_compose(command: list[str], compose_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # An empty hposvc environment: the file must work with its defaults alone.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPOSVC_", "POSTGRES_", "MLFLOW_", "COMPOSE_"))}
    return subprocess.run(
        [*command, "-f", str(compose_file), "--profile", "gpu", "--profile", "cpu", "config", *args],
        capture_output=True, text=True, timeout=120, env=env, cwd=compose_file.parent,
    )  # fmt: skip


def test_docker_compose_config_accepts_the_file_where_compose_exists(tmp_path):
    """Compose's own schema check and normalised output, where Compose exists.

    Without Compose the YAML checks above are the check; the output says which ran.
    """
    command = compose_command()
    if command is None:
        print("docker compose is not available: docker-compose.yml was validated with PyYAML only")
        return
    result = _run_compose(command, COMPOSE_FILE, "--format", "json")
    assert result.returncode == 0, result.stderr
    # Compose's normalised model passes the same essentials (build contexts become absolute).
    assert compose_problems(json.loads(result.stdout)) == []

    # and Compose itself refuses a broken file
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    healthcheck:", "    healthckeck:", 1))
    result = _run_compose(command, broken, "--quiet")
    assert result.returncode != 0
    assert "healthckeck" in result.stderr
