"""deploy/k8s/ checked offline, without a cluster.

Each set-up folder (``managed``, ``try-postgres``) is loaded the way kustomize loads it
(resources, recursively; namespace set), every object is validated against Kubernetes' own
OpenAPI schemas with ``kubernetes-validate`` in strict mode (an unknown or misspelled field
fails), and the pieces are checked to fit: Service selectors and ports, Secret keys, the
hposvc CLI options in each container's arguments (parsed by the real CLI), one GPU per
worker and workers pointed at the proxy and MLflow Services. The checkers are shown to fail
on broken manifests too.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
SETUPS = ["managed", "try-postgres"]
# The oldest Kubernetes still common on managed clusters, and the newest schemas we have.
K8S_VERSIONS = ["1.29.0", "latest"]

def _kv():
    try:
        import kubernetes_validate
    except ImportError:  # a dev dependency: its absence is a broken install, not a skip
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[dev]'", pytrace=False)
    return kubernetes_validate


# --- loading, as kustomize does --------------------------------------------------------------


def load_kustomization(folder: Path, _seen: frozenset[Path] = frozenset()) -> list[tuple[Path, dict]]:
    """(file, object) for every object ``kubectl apply -k folder`` would apply."""
    kfile = folder / "kustomization.yaml"
    if not kfile.is_file():
        raise AssertionError(f"{folder} has no kustomization.yaml")
    if folder.resolve() in _seen:
        raise AssertionError(f"kustomization cycle through {folder}")
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - {"apiVersion", "kind", "namespace", "resources", "images", "patches", "labels", "commonLabels"}
    assert not unknown, f"{kfile}: fields this test does not model: {unknown}"
    assert (k.get("apiVersion"), k.get("kind")) == ("kustomize.config.k8s.io/v1beta1", "Kustomization"), kfile
    objects: list[tuple[Path, dict]] = []
    for entry in k.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            objects += load_kustomization(path, _seen | {folder.resolve()})
        elif path.is_file():
            objects += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        else:
            raise AssertionError(f"{kfile}: resource {entry!r} does not exist")
    if "namespace" in k:
        for _, obj in objects:
            if obj["kind"] != "Namespace":
                obj.setdefault("metadata", {})["namespace"] = k["namespace"]
    return objects


# --- schema validation -------------------------------------------------------------------------


def schema_errors(objects: list[tuple[Path, dict]], version: str) -> list[str]:
    """Every object that Kubernetes' schema for ``version`` rejects (strict: no unknown fields)."""
    kv = _kv()
    version = kv.utils.latest_version() if version == "latest" else version
    errors = []
    for path, obj in objects:
        where = f"{path.name}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"{where}: no schema for it in Kubernetes {version} ({e.message})")
    return errors


# --- do the pieces fit? ------------------------------------------------------------------------


def _pod_templates(objects: list[dict]) -> list[tuple[dict, dict]]:
    return [(o, o["spec"]["template"]) for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args, for variables with a literal value."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1)) or f"VALUE-OF-{m.group(1)}", arg)


def _cli_problem(args: list[str]) -> str | None:
    """Parse ``hposvc ARGS`` with the real CLI, without running it; the error, or None."""
    from hposvc.cli import main

    ctx = click.Context(main)
    cmd: click.Command = main
    rest = list(args)
    while isinstance(cmd, click.Group) and rest:
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            return f"no command {rest[0]!r} in `hposvc {' '.join(args)}`"
        cmd, rest = sub, rest[1:]
    try:
        cmd.make_context(cmd.name, rest, parent=ctx)
    except click.UsageError as e:
        return f"`hposvc {' '.join(args)}`: {e.format_message()}"
    return None


def _url_service(url: str, scheme: str) -> tuple[str, int] | None:
    m = re.fullmatch(rf"{scheme}://([a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(\d+)", url)
    return (m.group(1), int(m.group(2))) if m else None


def _secret_file(pod: dict, container: dict, path: str) -> tuple[str, str] | None:
    """(Secret, key) that ``path`` is in ``container``, mounted from a secret volume; else None."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        folder = m["mountPath"].rstrip("/") + "/"
        secret = volumes.get(m["name"], {}).get("secret")
        if secret and path.startswith(folder) and "/" not in path[len(folder):]:
            return secret["secretName"], path[len(folder):]
    return None


def fit_problems(objects: list[dict]) -> list[str]:
    """What a schema cannot see: references between objects, and hposvc's own contract."""
    problems: list[str] = []
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objects:
        name = o["metadata"]["name"]
        if name in by_kind.setdefault(o["kind"], {}):
            problems.append(f"{o['kind']}/{name} is defined twice")
        by_kind[o["kind"]][name] = o
    secrets = {n: {**s.get("data", {}), **s.get("stringData", {})} for n, s in by_kind.get("Secret", {}).items()}
    config_maps = set(by_kind.get("ConfigMap", {}))
    claims = set(by_kind.get("PersistentVolumeClaim", {}))

    # 1) Workloads: selectors match their pods; every Secret key, ConfigMap and claim exists;
    #    every hposvc command line parses.
    for owner, tpl in _pod_templates(objects):
        where = f"{owner['kind']}/{owner['metadata']['name']}"
        labels = tpl["metadata"].get("labels", {})
        selector = owner["spec"].get("selector", {}).get("matchLabels", {})
        if owner["kind"] != "Job" and (not selector or any(labels.get(k) != v for k, v in selector.items())):
            problems.append(f"{where}: selector {selector} does not match its pod labels {labels}")
        pod = tpl["spec"]
        templates = {t["metadata"]["name"] for t in owner["spec"].get("volumeClaimTemplates", [])}
        for vol in pod.get("volumes", []):
            if "configMap" in vol and vol["configMap"]["name"] not in config_maps:
                problems.append(f"{where}: volume {vol['name']} needs ConfigMap {vol['configMap']['name']}")
            if "persistentVolumeClaim" in vol and vol["persistentVolumeClaim"]["claimName"] not in claims:
                problems.append(f"{where}: volume {vol['name']} needs PVC {vol['persistentVolumeClaim']['claimName']}")
        volumes = {v["name"] for v in pod.get("volumes", [])} | templates
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{where}: container {c['name']} mounts unknown volume {m['name']}")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in secrets.get(ref["name"], {}):
                    problems.append(f"{where}: env {e['name']} needs key {ref['key']!r} of Secret {ref['name']}")
            if c["image"].split(":")[0] == "hposvc":
                args = [_expand(a, _env(c)) for a in c.get("args", [])]
                if (problem := _cli_problem(args)) is not None:
                    problems.append(f"{where}: {problem}")

    # 2) Services: each selects some pod and targets a port that pod declares.
    for name, svc in by_kind.get("Service", {}).items():
        sel = svc["spec"].get("selector", {})
        pods = [tpl for _, tpl in _pod_templates(objects) if sel and all(tpl["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
        if not pods:
            problems.append(f"Service/{name}: selector {sel} matches no pod")
            continue
        declared = {(p.get("name"), p["containerPort"]) for tpl in pods for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(target in pair for pair in declared):
                problems.append(f"Service/{name}: targetPort {target!r} is not a port of its pods {sorted(declared, key=str)}")
        if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"Service/{name}: type {svc['spec']['type']}: hposvc's services stay inside the cluster")

    def service_port(url: str, scheme: str, what: str) -> None:
        target = _url_service(url, scheme)
        svc = by_kind.get("Service", {}).get(target[0]) if target else None
        if svc is None or target[1] not in {p["port"] for p in svc["spec"]["ports"]}:
            problems.append(f"{what}: {url!r} is not {scheme}://SERVICE:PORT of a Service defined here")

    # 3) The storage proxy serves PostgreSQL from the Secret, beyond loopback on purpose.
    proxies = [d for d in by_kind.get("Deployment", {}).values() if d["spec"]["template"]["spec"]["containers"][0].get("args", [])[:2] == ["storage", "serve"]]
    proxy_token: tuple[str, str] | None = None
    if len(proxies) != 1:
        problems.append(f"expected one storage proxy Deployment (`hposvc storage serve`), found {len(proxies)}")
    for d in proxies:
        c = d["spec"]["template"]["spec"]["containers"][0]
        if "--allow-remote" not in c["args"]:
            problems.append("the storage proxy listens on the pod address but lacks --allow-remote (it would refuse to start)")
        if not any(e["name"] == "HPOSVC_STORAGE" and "secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", [])):
            problems.append("the storage proxy takes its database URL (HPOSVC_STORAGE) from a Secret")
        args = c["args"]
        token = args[args.index("--token-file") + 1] if "--token-file" in args[:-1] else None
        where_token = token and _secret_file(d["spec"]["template"]["spec"], c, token)
        if not where_token:
            problems.append("the storage proxy listens beyond loopback without --token-file FILE from a mounted Secret (it would refuse to start)")
        elif where_token[1] not in secrets.get(where_token[0], {}):
            problems.append(f"the storage proxy's token file needs key {where_token[1]!r} of Secret {where_token[0]}")
        proxy_token = where_token
        proxy_labels = d["spec"]["template"]["metadata"]["labels"]
        guarded = [p for p in by_kind.get("NetworkPolicy", {}).values() if all(proxy_labels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items())]
        if not guarded:
            problems.append("no NetworkPolicy guards the storage proxy (it has no authentication)")

    # 4) Workers: `hposvc worker`, one GPU each, through the proxy and the MLflow Service,
    #    admitted by the proxy's NetworkPolicy.
    jobs = list(by_kind.get("Job", {}).values())
    if len(jobs) != 1:
        problems.append(f"expected one worker Job, found {len(jobs)}")
    for job in jobs:
        where = f"Job/{job['metadata']['name']}"
        if job["spec"].get("parallelism", 1) < 1:
            problems.append(f"{where}: parallelism must be >= 1")
        c = job["spec"]["template"]["spec"]["containers"][0]
        env = _env(c)
        if c.get("args", [None])[0] != "worker":
            problems.append(f"{where}: runs {c.get('args')}, not `hposvc worker NAME`")
        if str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) != "1":
            problems.append(f"{where}: each worker needs exactly one GPU (limits nvidia.com/gpu: 1)")
        service_port(env.get("HPOSVC_STORAGE", ""), "grpc", f"{where} HPOSVC_STORAGE")
        service_port(env.get("MLFLOW_TRACKING_URI", ""), "http", f"{where} MLFLOW_TRACKING_URI")
        if any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", [])):
            problems.append(f"{where}: workers should not read the database Secret; they go through the proxy")
        sent = _secret_file(job["spec"]["template"]["spec"], c, env.get("HPOSVC_STORAGE_TOKEN_FILE", ""))
        if sent is None or sent != proxy_token:
            problems.append(f"{where}: workers must send the proxy's token (HPOSVC_STORAGE_TOKEN_FILE in the proxy's Secret {proxy_token}); they send {sent}")
        labels = job["spec"]["template"]["metadata"].get("labels", {})
        for policy in by_kind.get("NetworkPolicy", {}).values():
            peers = [p["podSelector"].get("matchLabels", {}) for rule in policy["spec"].get("ingress", []) for p in rule.get("from", []) if "podSelector" in p]
            if not any(all(labels.get(k) == v for k, v in peer.items()) for peer in peers):
                problems.append(f"{where}: NetworkPolicy/{policy['metadata']['name']} does not admit the workers {labels}")
    return problems


# --- the manifests -----------------------------------------------------------------------------


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_passes_the_kubernetes_schema(setup: str, version: str) -> None:
    objects = load_kustomization(K8S / setup)
    kinds = sorted({o["kind"] for _, o in objects})
    assert {"Deployment", "Service", "Job", "Secret", "Namespace", "NetworkPolicy"} <= set(kinds), kinds
    assert schema_errors(objects, version) == []


@pytest.mark.parametrize("setup", SETUPS)
def test_the_pieces_fit(setup: str) -> None:
    objects = [o for _, o in load_kustomization(K8S / setup)]
    assert fit_problems(objects) == []
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"hposvc"}


def test_try_postgres_has_a_statefulset_and_managed_does_not() -> None:
    def kinds(setup: str) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for _, o in load_kustomization(K8S / setup):
            out.setdefault(o["kind"], set()).add(o["metadata"]["name"])
        return out

    assert kinds("try-postgres")["StatefulSet"] == {"hposvc-postgres"}
    assert "StatefulSet" not in kinds("managed")
    # both set-ups provide the one Secret the base expects, with the same keys
    secret = lambda s: next(o for _, o in load_kustomization(K8S / s) if o["kind"] == "Secret" and o["metadata"]["name"] == "hposvc-database")  # noqa: E731
    assert set(secret("managed")["stringData"]) == set(secret("try-postgres")["stringData"]) == {"storage-url", "mlflow-backend-store-uri"}
    token = lambda s: next(o for _, o in load_kustomization(K8S / s) if o["kind"] == "Secret" and o["metadata"]["name"] == "hposvc-storage-token")  # noqa: E731
    assert set(token("managed")["stringData"]) == set(token("try-postgres")["stringData"]) == {"token"}
    # the managed placeholder is too short for the proxy to start with: it must be replaced
    from hposvc.proxy import MIN_TOKEN_LENGTH

    assert len(token("managed")["stringData"]["token"]) < MIN_TOKEN_LENGTH <= len(token("try-postgres")["stringData"]["token"])


def test_every_manifest_file_is_used() -> None:
    used = {p for s in SETUPS for p, _ in load_kustomization(K8S / s)}
    files = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files - used == set(), "manifest files no kustomization applies"


# --- the checkers fail on broken manifests -----------------------------------------------------


def _worker_job() -> dict:
    return copy.deepcopy(next(o for o in yaml.safe_load_all((K8S / "base" / "worker-job.yaml").read_text()) if o))


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda j: j["spec"].__setitem__("parallelism", "eight"), "spec.parallelism: 'eight' is not of type 'integer'"),
        (lambda j: j["spec"]["template"]["spec"].__setitem__("restartPolicyy", "Never"), "restartPolicyy"),
        (lambda j: j["spec"]["template"]["spec"]["containers"][0].pop("name"), "'name' is a required property"),
        (lambda j: j.__setitem__("apiVersion", "batch/v9"), "no schema"),
    ],
    ids=["wrong-type", "misspelled-field", "container-without-name", "unknown-api-version"],
)
def test_an_invalid_manifest_fails_validation(tmp_path: Path, breakage: Any, expected: str) -> None:
    job = _worker_job()
    assert schema_errors([(tmp_path / "job.yaml", job)], "latest") == []
    breakage(job)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "kustomization.yaml").write_text("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [job.yaml]\n")
    errors = schema_errors(load_kustomization(tmp_path), "latest")
    assert len(errors) == 1 and expected in errors[0], errors


def test_a_missing_resource_file_fails_loading(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [nope.yaml]\n")
    with pytest.raises(AssertionError, match="resource 'nope.yaml' does not exist"):
        load_kustomization(tmp_path)


def _break(objects: list[dict], kind: str, name: str, fn: Any) -> list[dict]:
    objects = copy.deepcopy(objects)
    fn(next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name))
    return objects


@pytest.mark.parametrize(
    "kind, name, breakage, expected",
    [
        ("Service", "hposvc-mlflow", lambda s: s["spec"]["selector"].__setitem__("app.kubernetes.io/name", "mlfow"), "Service/hposvc-mlflow: selector"),
        ("Service", "hposvc-storage-proxy", lambda s: s["spec"].__setitem__("type", "LoadBalancer"), "type LoadBalancer"),
        ("Secret", "hposvc-database", lambda s: s["stringData"].pop("storage-url"), "needs key 'storage-url' of Secret hposvc-database"),
        ("Job", "hposvc-workers", lambda j: j["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"), "exactly one GPU"),
        ("Job", "hposvc-workers", lambda j: j["spec"]["template"]["spec"]["containers"][0]["env"][1].__setitem__("value", "grpc://hposvc-proxy:13000"), "HPOSVC_STORAGE"),
        ("Job", "hposvc-workers", lambda j: j["spec"]["template"]["spec"]["containers"][0]["args"].append("--max-trails"), "No such option '--max-trails'"),
        ("Job", "hposvc-workers", lambda j: j["spec"]["template"]["metadata"]["labels"].pop("app.kubernetes.io/part-of"), "does not admit the workers"),
        ("Deployment", "hposvc-storage-proxy", lambda d: d["spec"]["template"]["spec"]["containers"][0]["args"].remove("--allow-remote"), "lacks --allow-remote"),
        ("Deployment", "hposvc-storage-proxy", lambda d: d["spec"]["template"]["spec"]["containers"][0]["args"].__setitem__(1, "serv"), "no command 'serv'"),
        ("NetworkPolicy", "hposvc-storage-proxy", lambda p: p["spec"]["podSelector"]["matchLabels"].__setitem__("app.kubernetes.io/name", "x"), "no NetworkPolicy guards"),
        ("Deployment", "hposvc-storage-proxy", lambda d: d["spec"]["template"]["spec"]["containers"][0]["args"].remove("--token-file"), "without --token-file"),
        ("Deployment", "hposvc-storage-proxy", lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("volumeMounts"), "without --token-file"),
        ("Secret", "hposvc-storage-token", lambda s: s["stringData"].__setitem__("tokens", s["stringData"].pop("token")), "needs key 'token' of Secret hposvc-storage-token"),
        ("Job", "hposvc-workers", lambda j: j["spec"]["template"]["spec"]["containers"][0]["env"].pop(2), "workers must send the proxy's token"),
    ],
)
def test_the_fit_checker_finds_broken_references(kind: str, name: str, breakage: Any, expected: str) -> None:
    objects = [o for _, o in load_kustomization(K8S / "try-postgres")]
    problems = fit_problems(_break(objects, kind, name, breakage))
    assert any(expected in p for p in problems), problems
