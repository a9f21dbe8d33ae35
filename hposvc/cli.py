"""The ``hposvc`` command line: a thin layer that parses, calls the API and formats.

Errors become messages in one place (:class:`_Group`): bad input exits 2, other failures
exit 1, SIGINT 130 and SIGTERM 143. Data goes to stdout (a table, or JSON with
``--json``); logs and progress go to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from typing import Any, Callable

import click

from hposvc.errors import HposvcError, InvalidInputError

# -- error handling and output ---------------------------------------------------------


class _Group(click.Group):
    """Turns hposvc errors into CLI messages and exit codes, once for every command."""

    def invoke(self, ctx: click.Context) -> Any:
        from hposvc.errors import Interrupted, StorageUnavailableError

        try:
            return super().invoke(ctx)
        except Interrupted as e:
            click.echo(f"Interrupted: {e}. Re-run the same command to resume.", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted (SIGINT). Re-run the same command to resume.", err=True)
            ctx.exit(130)
        except InvalidInputError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)
        except StorageUnavailableError as e:  # 75 (EX_TEMPFAIL): run it again when the storage is back
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except HposvcError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(1)


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def emit(data: Any, *, as_json: bool, columns: list[str] | None = None, title: str | None = None) -> None:
    """Write ``data`` (a DataFrame, list of dicts or dict) to stdout as a table or JSON."""
    pd = sys.modules.get("pandas")  # a DataFrame means pandas is imported; never import it here (half a second)
    if pd is not None and isinstance(data, pd.DataFrame):
        records = [{k: _clean(None if pd.isna(v) else v) if not isinstance(v, (list, dict)) else v for k, v in r.items()} for r in data.to_dict(orient="records")]
    else:
        records = data
    if as_json:
        click.echo(json.dumps(records, default=_json_default, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=max(120, Console().width))
    if isinstance(records, dict):
        table = Table(title=title, show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value")
        for k, v in records.items():
            table.add_row(str(k), _fmt(v))
        console.print(table)
        return
    cols = columns or (list(records[0]) if records else [])
    table = Table(title=title)
    for c in cols:
        table.add_column(c)
    for r in records:
        table.add_row(*(_fmt(r.get(c)) for c in cols))
    console.print(table)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return json.dumps(v, default=_json_default)
    return str(v)


# -- shared options --------------------------------------------------------------------


def storage_options(fn: Callable) -> Callable:
    @click.option("--storage", envvar="HPOSVC_STORAGE", help="Study database URL (default: SQLite in the data directory).")
    @click.option("--data-dir", envvar="HPOSVC_DATA_DIR", type=click.Path(file_okay=False), help="Data directory (default ./hposvc-data).")
    @functools.wraps(fn)
    def wrapper(*args: Any, storage: str | None, data_dir: str | None, **kwargs: Any) -> Any:
        from hposvc.storage import resolve_storage_url

        return fn(*args, storage=resolve_storage_url(storage, data_dir=data_dir), data_dir=data_dir, **kwargs)

    return wrapper


def tracking_option(fn: Callable) -> Callable:
    return click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: SQLite store in the data directory).")(fn)


def _load_spec(spec: str, **overrides: Any) -> Any:
    """Parse a spec (a file, or a built-in spec's name) and apply the [study] overrides
    that were given on the CLI; says on stderr which file a built-in name meant."""
    from hposvc.builtin import resolve_spec
    from hposvc.spec import load_spec

    path, note = resolve_spec(spec)
    if note:
        click.echo(note, err=True)
    return load_spec(path).with_overrides(**overrides)  # None values leave settings as they are


def _warm_start(flag: bool) -> Any:
    """``--warm-start``: the recommendation's configurations, computed when a fresh study
    is created (the core never imports the recommendation itself)."""
    if not flag:
        return None
    from hposvc.recommendation import warm_start_configs

    return warm_start_configs


def _population(value: str | None) -> int | str | None:
    """--population K | auto, checked here so a typo is exit 2 with the allowed values."""
    from hposvc.config import check_population

    return check_population(int(value) if value is not None and value.isdigit() else value, key="--population")


def spec_override_options(fn: Callable) -> Callable:
    fn = click.option("--name", help="Study name (overrides [study] name).")(fn)
    return click.option("--n-trials", type=click.IntRange(min=1), help="Finished trials the study should have (overrides the spec).")(fn)


def emit_run(result: Any, *, as_json: bool, title: str) -> None:
    """A StudyRun as a key/value table or JSON."""
    emit({k: getattr(result, k) for k in result.__dataclass_fields__}, as_json=as_json, title=title)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _setup_logging(verbose: bool) -> None:
    # MLflow configures its own loggers when it is imported (later, lazily): tell it first.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--version: hposvc and the libraries that decide what a study produces."""
    if not value or ctx.resilient_parsing:
        return
    from hposvc.records import versions

    for package, version in versions().items():
        click.echo(f"{package} {version}")
    ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log to stderr at INFO level.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version, help="Show the hposvc, torch, optuna, mlflow and Python versions and exit.")
def main(verbose: bool) -> None:
    """hposvc: hyperparameter optimisation of neural-network training choices.

    \b
    Example:
      hposvc study run quickstart     (a spec that ships with hposvc; or a file: studies/quickstart.toml)
      hposvc best quickstart
    """
    _setup_logging(verbose)
    if "torch" not in sys.modules:
        # A fresh process (not one that has trained already, like a test runner calling
        # the CLI in-process): worker slots may be forked from it once it has imported torch.
        from hposvc import launcher

        launcher.FORK_SLOTS = True


# -- study -----------------------------------------------------------------------------


@main.group()
def study() -> None:
    """Validate, run and inspect studies."""


@study.command("validate")
@click.argument("spec", type=click.Path(dir_okay=False))
@json_option
def study_validate(spec: str, as_json: bool) -> None:
    """Check a study spec (a file, or a built-in spec's name) without running it (exit 2
    when it is invalid).

    Example: hposvc study validate studies/quickstart.toml
    """
    from hposvc.plugins import check_runnable

    parsed = _load_spec(spec)
    check_runnable(parsed)
    summary = {
        "name": parsed.name,
        "task": parsed.task,
        "metric": parsed.metric,
        "direction": parsed.direction,
        "n_trials": parsed.n_trials,
        "sampler": parsed.sampler,
        "pruner": parsed.pruner,
        "spec_hash": parsed.spec_hash,
        "valid": True,
    }
    emit(summary, as_json=as_json, title=f"{spec}: valid")


@study.command("run")
@click.argument("spec", type=click.Path(dir_okay=False))
@spec_override_options
@storage_options
@tracking_option
@click.option("--device", default="auto", show_default=True, help="Device for in-process trials: auto, cpu, cuda:N.")
@click.option("--workers", help="N worker processes ('auto': one per device slot; 1: this process). Default: the plan hposvc picks for this machine and spec (printed).")
@click.option("--devices", default="auto", show_default=True, help="With --workers: devices to use, e.g. cuda:0,cuda:2 or cpu.")
@click.option("--trials-per-device", default=1, show_default=True, type=click.IntRange(min=1), help="With --workers: concurrent trials per GPU.")
@click.option("--drain", is_flag=True, help="With worker processes: on SIGINT/SIGTERM let trials in flight finish.")
@click.option("--warm-start", is_flag=True, help="Queue the current recommended configurations as the first trials.")
@click.option("--population", callback=lambda ctx, param, v: _population(v), help="Train up to K trials at once as one vectorised population ('auto': from the device). Overrides the spec.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@json_option
def study_run(spec: str, n_trials: int | None, name: str | None, storage: str, data_dir: str | None, tracking_uri: str | None, device: str, workers: str | None, devices: str, trials_per_device: int, drain: bool, warm_start: bool, population: int | str | None, quiet: bool, as_json: bool) -> None:
    """Run a study, or resume it: only the missing trials are run. SPEC is a file or the
    name of a spec that ships with hposvc (`hposvc study list-builtin`); a file wins.

    \b
    Examples:
      hposvc study run studies/quickstart.toml --n-trials 20
      hposvc study run quickstart
      hposvc study run studies/survey/digits.toml --workers auto
    """
    from hposvc.launcher import run_planned

    parsed = _load_spec(spec, n_trials=n_trials, name=name, population=population)
    warm = _warm_start(warm_start)
    if workers is None and (trials_per_device != 1 or devices != "auto"):
        raise InvalidInputError("the '--devices' and '--trials-per-device' options need --workers N or --workers auto.")
    result = run_planned(
        parsed,
        workers=workers,
        device=device,
        devices=devices,
        trials_per_device=trials_per_device,
        storage=storage,
        tracking_uri=tracking_uri,
        data_dir=data_dir,
        warm_start=warm,
        drain=drain,
        progress=not quiet,
        on_plan=lambda plan: click.echo(plan.describe(), err=True),
    )
    emit_run(result, as_json=as_json, title=f"study {result.study_name}")
    click.echo(f"Inspect it in MLflow: {_where_to_look(result.study_name, data_dir=data_dir, tracking_uri=result.tracking_uri)}", err=True)


@study.command("create")
@click.argument("spec", type=click.Path(dir_okay=False))
@spec_override_options
@storage_options
@tracking_option
@click.option("--warm-start", is_flag=True, help="Queue the current recommended configurations as the first trials.")
@json_option
def study_create(spec: str, n_trials: int | None, name: str | None, storage: str, data_dir: str | None, tracking_uri: str | None, warm_start: bool, as_json: bool) -> None:
    """Create a study (or top up its trial queue) without running trials here.

    Workers on any host then join it with `hposvc worker NAME --storage URL --tracking-uri URI`.

    Example: hposvc study create studies/survey/digits.toml --storage postgresql+psycopg://db/hposvc
    """
    from hposvc.queue import counts
    from hposvc.storage import resolve_tracking_uri
    from hposvc.study import prepare_study
    from hposvc.tracking import open_tracker

    parsed = _load_spec(spec, n_trials=n_trials, name=name)
    study = prepare_study(parsed, storage=storage, warm_start=_warm_start(warm_start))
    # the MLflow experiment and parent run too, so workers starting together share them
    open_tracker(study, spec=parsed.to_dict(), tracking_uri=resolve_tracking_uri(tracking_uri, data_dir=data_dir), data_dir=data_dir, storage=storage)
    emit({"name": study.study_name, "storage": storage, "n_trials": parsed.n_trials, **{k.lower(): v for k, v in counts(study).by_state.items()}}, as_json=as_json, title="study created")


@study.command("list-builtin")
@json_option
def study_list_builtin(as_json: bool) -> None:
    """List the study specs that ship with hposvc; run one by its name from any folder.

    Example: hposvc study run guide/zero-init
    """
    from hposvc.builtin import builtin_specs
    from hposvc.spec import load_spec

    rows = []
    for builtin in builtin_specs():
        parsed = load_spec(builtin.path)
        rows.append({"name": builtin.name, "study": parsed.name, "task": parsed.task, "n_trials": parsed.n_trials, "path": str(builtin.path)})
    emit(rows, as_json=as_json, columns=["name", "study", "task", "n_trials"], title="built-in specs (hposvc study run NAME)")


@study.command("list")
@storage_options
@json_option
def study_list(storage: str, data_dir: str | None, as_json: bool) -> None:
    """List the studies in the storage."""
    from hposvc.results import studies

    emit(studies(storage=storage), as_json=as_json, title=f"studies in {storage}")


@study.command("show")
@click.argument("name")
@storage_options
@json_option
def study_show(name: str, storage: str, data_dir: str | None, as_json: bool) -> None:
    """Show a study's trials (number, state, value, optimizer, lr, init, norm, ...)."""
    from hposvc.results import trials

    df = trials(name, storage=storage)
    from hposvc.config import TrialConfig
    from hposvc.results import TRIAL_COLUMNS

    own = [c for c in df.columns if c not in TRIAL_COLUMNS and c not in TrialConfig.__dataclass_fields__]  # [space.params]
    cols = ["number", "state", "value", "optimizer", "lr", "init", "norm", "activation", "batch_size", *own, "duration_s", "reason"]
    emit(df if as_json else df[cols], as_json=as_json, columns=cols, title=f"study {name}")


@study.command("export")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet", "json"]), default="csv", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Output file (default: stdout for csv/json).")
@storage_options
def study_export(name: str, fmt: str, out: str | None, storage: str, data_dir: str | None) -> None:
    """Export a study's trials as CSV, Parquet or JSON."""
    from hposvc.results import trials

    df = trials(name, storage=storage)
    if fmt == "parquet":
        if not out:
            raise InvalidInputError("the '--out' option must be a file path for --format parquet. Got nothing instead.")
        _check_out(out)
        df.to_parquet(out, index=False)
    elif fmt == "csv":
        text = df.to_csv(index=False)
        _write(out, text)
    else:
        # json, not DataFrame.to_json: that rounds floats to 10 digits, and an export should
        # hold the very numbers the trials ran with
        records = df.astype(object).where(df.notna(), None).to_dict(orient="records")
        _write(out, json.dumps(records, indent=2, default=str) + "\n")
    if out:
        click.echo(f"wrote {len(df)} trials to {out}", err=True)


def _write(out: str | None, text: str) -> None:
    if out:
        _check_out(out)
        with open(out, "w") as f:
            f.write(text)
    else:
        click.echo(text, nl=False)


def _check_out(out: str) -> None:
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise InvalidInputError(f"the '--out' option must be a file in an existing folder. Got {out!r} instead ({folder} does not exist).")


@study.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@storage_options
def study_delete(name: str, yes: bool, storage: str, data_dir: str | None) -> None:
    """Delete a study and its trials from the storage (MLflow runs are kept)."""
    import optuna

    from hposvc.storage import load_study, open_storage

    load_study(name, storage=storage)  # clear error when it does not exist
    if not yes:
        click.confirm(f"Delete study {name!r} and all its trials from {storage}?", abort=True, err=True)
    optuna.delete_study(study_name=name, storage=open_storage(storage))
    click.echo(f"deleted study {name}", err=True)


# -- results ---------------------------------------------------------------------------


@main.command("best")
@click.argument("name")
@storage_options
@json_option
def best(name: str, storage: str, data_dir: str | None, as_json: bool) -> None:
    """The best configuration of a study, with its value."""
    from hposvc.results import best_config

    b = best_config(name, storage=storage)
    if as_json:
        emit(b.to_dict(), as_json=True)
        return
    row = {"study": b.study, b.metric: b.value, "trial": b.trial_number, **b.config.flat_params()}
    emit(row, as_json=False, title=f"best of {name}")


# -- worker, sync, ui ------------------------------------------------------------------


@main.command("worker")
@click.argument("name")
@storage_options
@tracking_option
@click.option("--device", default="auto", show_default=True, help="Device this worker trains on.")
@click.option("--max-trials", type=click.IntRange(min=1), help="Stop after this many trials.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Stop starting trials after this many seconds.")
@click.option("--worker-id", help="Name recorded on each trial (default host:pid).")
@click.option("--workers", help="Run N worker processes here ('auto': one per device slot), each pinned to its device.")
@click.option("--devices", default="auto", show_default=True, help="With --workers: devices to use, e.g. cuda:0,cuda:2 or cpu.")
@click.option("--trials-per-device", default=1, show_default=True, type=click.IntRange(min=1), help="With --workers: concurrent trials per GPU.")
@click.option("--population", callback=lambda ctx, param, v: _population(v), help="Train up to K trials at once as one vectorised population ('auto': from the device). Overrides the spec.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@json_option
def worker(name: str, storage: str, data_dir: str | None, tracking_uri: str | None, device: str, max_trials: int | None, timeout: float | None, worker_id: str | None, workers: str | None, devices: str, trials_per_device: int, population: int | str | None, quiet: bool, as_json: bool) -> None:
    """Join an existing study and run its trials until it is done.

    \b
    Examples:
      hposvc worker digits-quick --storage postgresql+psycopg://hposvc@db/hposvc
      hposvc worker digits-quick --storage URL --tracking-uri http://mlflow:5000 --workers auto
    """
    from hposvc.devices import apply_slot_threads
    from hposvc.storage import load_study
    from hposvc.worker import run_worker

    if workers is not None:
        if max_trials or timeout or worker_id:
            raise InvalidInputError("the '--max-trials', '--timeout' and '--worker-id' options apply to one worker; drop them with --workers.")
        from hposvc.devices import plan_slots
        from hposvc.storage import resolve_tracking_uri
        from hposvc.launcher import run_slots

        slots = plan_slots(devices, trials_per_device=trials_per_device, workers=workers)
        result = run_slots(load_study(name, storage=storage), slots, storage=storage, tracking_uri=resolve_tracking_uri(tracking_uri, data_dir=data_dir), data_dir=data_dir, population=population, progress=not quiet)
        emit_run(result, as_json=as_json, title=f"workers on {name}")
        return
    apply_slot_threads()
    result = run_worker(
        name,
        storage=storage,
        tracking_uri=tracking_uri,
        data_dir=data_dir,
        device=device,
        max_trials=max_trials,
        timeout=timeout,
        worker_id=worker_id,
        population=population,
        progress=not quiet,
    )
    emit_run(result, as_json=as_json, title=f"worker on {name}")


@main.command("sync")
@click.option("--data-dir", envvar="HPOSVC_DATA_DIR", type=click.Path(file_okay=False))
@tracking_option
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=0), help="Give up after this many seconds.")
@click.option("--serve", is_flag=True, help="Keep running as the tracking process of this data dir and URI (a sidecar; see HPOSVC_TRACKING_PROCESS=external).")
def sync(data_dir: str | None, tracking_uri: str | None, timeout: float, serve: bool) -> None:
    """Send the tracking records waiting in the outbox to MLflow now, and wait until they
    are there (what the tracking process does all along; run it after an MLflow outage).

    Exits 1 when records are left (MLflow still unreachable, or it refused some: see the
    outbox's failed/ folder).
    """
    from hposvc.drain import main as serve_folder, sync_folder
    from hposvc.storage import resolve_data_dir, resolve_tracking_uri
    from hposvc.outbox import folder_for

    folder = folder_for(resolve_data_dir(data_dir), resolve_tracking_uri(tracking_uri, data_dir=data_dir))
    if serve:
        folder.create()
        sys.exit(serve_folder([str(folder.path), "--idle", "inf"]))
    left, error = sync_folder(folder, timeout=timeout)
    refused = sum(1 for p in folder.failed.glob("*.jsonl") for _ in p.open()) if folder.failed.is_dir() else 0
    click.echo(f"{left} byte(s) of tracking records left in {folder.path}" + (f" ({error})" if error else "")
               + (f"; {refused} record(s) MLflow refused are in {folder.failed}" if refused else ""), err=True)
    if left:
        sys.exit(1)


@main.group("storage")
def storage_group() -> None:
    """The study storage: serve it to many workers through Optuna's gRPC proxy."""


@storage_group.command("serve")
@storage_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; a non-loopback one needs --allow-remote.")
@click.option("--port", default=13000, show_default=True, type=int, help="Port to listen on.")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --host; it then needs a token (--token-file). Private networks only.")
@click.option("--token-file", envvar="HPOSVC_STORAGE_TOKEN_FILE", type=click.Path(dir_okay=False), help="File with the shared token clients must send (one per line, re-read when it changes). Else $HPOSVC_STORAGE_TOKEN.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Serve TLS with this certificate (PEM); clients set HPOSVC_STORAGE_TLS_CA.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="The key of --tls-cert (PEM).")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False), help="Require client certificates signed by this CA (PEM); clients set HPOSVC_STORAGE_TLS_CERT and _KEY.")
def storage_serve(storage: str, data_dir: str | None, host: str, port: int, allow_remote: bool, token_file: str | None, tls_cert: str | None, tls_key: str | None, tls_client_ca: str | None) -> None:
    """Serve the study database to workers as grpc://HOST:PORT until stopped.

    \b
    Examples:
      hposvc storage serve --storage postgresql+psycopg://hposvc@db/hposvc --port 13000
      hposvc worker NAME --storage grpc://127.0.0.1:13000
      hposvc storage serve --storage URL --host 0.0.0.0 --allow-remote --token-file token
      HPOSVC_STORAGE_TOKEN_FILE=token hposvc worker NAME --storage grpc://PROXY-HOST:13000
    """
    from hposvc.proxy import serve

    serve(storage, host=host, port=port, allow_remote=allow_remote, token_file=token_file, tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca)


@main.command("ui")
@click.argument("study_name", metavar="[STUDY]", required=False)
@click.option("--data-dir", envvar="HPOSVC_DATA_DIR", type=click.Path(file_okay=False))
@tracking_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
def ui(study_name: str | None, data_dir: str | None, tracking_uri: str | None, host: str, port: int) -> None:
    """Open the MLflow UI on the configured tracking store; prints the page to open (with
    STUDY: that study's training runs, best first).

    \b
    Example:
      hposvc ui quickstart
    """
    from hposvc.storage import artifact_location, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, data_dir=data_dir)
    server = uri.startswith(("http://", "https://"))
    base = uri if server else f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    url = _ui_url(uri, base, study_name)
    click.echo(url)
    if server:
        click.echo(f"The tracking store is a server: open {url} in a browser.", err=True)
        return
    args = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        args += ["--default-artifact-root", artifact_location(data_dir)]
    click.echo(f"MLflow UI on {base} (store {uri}); open {url}", err=True)
    sys.stdout.flush()
    os.execv(sys.executable, args)


def _ui_url(uri: str, base: str, study_name: str | None) -> str:
    """The MLflow UI page for ``study_name`` (its training runs), or the experiments list."""
    from hposvc.dashboard import WORKFLOW_TYPE, study_runs_url
    from hposvc.tracking import experiment_name, mlflow_client

    if study_name is None:
        return f"{base.rstrip('/')}/#/experiments?workflowType={WORKFLOW_TYPE}"
    url = study_runs_url(mlflow_client(uri), base, experiment_name(study_name))
    if url is None:
        raise InvalidInputError(
            f"the 'STUDY' argument of hposvc ui names a study with no MLflow experiment in {uri}: got {study_name!r}. "
            "Run it first (`hposvc study run SPEC`), or check --data-dir / --tracking-uri (`hposvc study list` names the studies)."
        )
    return url


def _where_to_look(study_name: str, *, data_dir: str | None, tracking_uri: str) -> str:
    """Where ``hposvc study run`` tells the user to look: the study's runs page on a
    tracking server, else the ``hposvc ui`` command that serves it."""
    import shlex

    if tracking_uri.startswith(("http://", "https://")):
        from hposvc.dashboard import runs_url
        from hposvc.outbox import folder_for
        from hposvc.storage import resolve_data_dir
        from hposvc.tracking import experiment_name

        # The tracking process noted the experiment: no MLflow import in this process.
        known = folder_for(resolve_data_dir(data_dir), tracking_uri).state().experiments.get(experiment_name(study_name))
        if known:
            return runs_url(tracking_uri, known[0], maximize=None if not known[1] else known[1] == "maximize")
        try:
            return _ui_url(tracking_uri, tracking_uri, study_name)
        except Exception:  # noqa: BLE001 (the server went away: the hint is not worth failing for)
            return tracking_uri
    where = f" --data-dir {shlex.quote(data_dir)}" if data_dir else ""
    from hposvc.storage import resolve_tracking_uri

    if tracking_uri != resolve_tracking_uri(None, data_dir=data_dir):  # a store of its own: name it
        where += f" --tracking-uri {shlex.quote(tracking_uri)}"
    return f"hposvc ui {shlex.quote(study_name)}{where}"


# -- report --


@main.command("report")
@click.argument("studies", nargs=-1)
@click.option("--guide", is_flag=True, help="Report every study of the optimisation guide (studies/guide/).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for index.html, report.json and the PNG figures.")
@click.option("--run", "run_first", is_flag=True, help="With --guide: run (or resume) the guide studies first.")
@click.option("--scale", type=click.Choice(["ci", "full"]), help="With --run: the small CI budget (default) or the full one (studies/guide/full/).")
@click.option("--no-mlflow", is_flag=True, help="Do not log the report to the studies' MLflow parent runs.")
@storage_options
@tracking_option
@json_option
def report(studies: tuple[str, ...], guide: bool, out_dir: str, run_first: bool, scale: str | None, no_mlflow: bool, storage: str, data_dir: str | None, tracking_uri: str | None, as_json: bool) -> None:
    """Write an HTML report of studies: each guide claim, its figures and its verdict,
    computed from the stored trials; also logged to each study's MLflow parent run.

    \b
    Examples:
      hposvc report --guide --out report/
      hposvc report --guide --run --scale full --data-dir guide-full --out report-full/
      hposvc report quickstart --out quickstart-report/
    """
    from hposvc.report import GUIDE_STUDIES, build_report, run_guide

    if guide == bool(studies):
        raise InvalidInputError("the 'STUDIES' argument and the '--guide' option conflict: give study names, or --guide for every guide study, not both and not neither.")
    if (run_first or scale) and not guide:
        raise InvalidInputError("the '--run' and '--scale' options need --guide (they run the guide's studies).")
    if scale and not run_first:
        raise InvalidInputError("the '--scale' option needs --run (it picks which guide specs to run).")
    if run_first:
        run_guide(scale=scale or "ci", storage=storage, tracking_uri=tracking_uri, data_dir=data_dir, progress=not as_json)
    result = build_report(list(studies) or list(GUIDE_STUDIES), storage=storage, out_dir=out_dir, tracking_uri=tracking_uri, data_dir=data_dir, log_to_mlflow=not no_mlflow)
    if as_json:
        emit(result.to_dict(), as_json=True)
        return
    rows = [
        {"claim": s.claim.number if s.claim else "-", "title": s.claim.title if s.claim else "", "studies": ", ".join(s.studies), "verdict": s.verdict or "(no claim)"}
        for s in result.sections
    ]
    emit(rows, as_json=False, columns=["claim", "title", "studies", "verdict"], title=f"report: {result.index}")
    click.echo(f"wrote {result.index}", err=True)


# -- recommend -------------------------------------------------------------------------


@main.command("recommend")
@click.option("--study", "study_names", multiple=True, help="Use this study (repeatable).")
@click.option("--task", "tasks", multiple=True, help="Use every study of this task key (repeatable).")
@click.option("--all", "use_all", is_flag=True, help="Use every study in the storage.")
@click.option("--budget", type=click.IntRange(min=1), help="Tuning budget n (trials per optimizer) to recommend at.")
@click.option("--by", type=click.Choice(["norm", "activation"]), help="Also rank within each norm type / activation family.")
@click.option("--kind", help="Decide on this kind of model's tasks only (mlp, linear, cnn, resnet, transformer); with --shipped, the shipped survey's decision for it.")
@click.option("--reference", help="Normalise scores relative to this optimizer instead of the worst one.")
@click.option("--bootstrap", "n_bootstrap", default=1000, show_default=True, type=click.IntRange(min=10), help="Bootstrap resamples for the intervals.")
@click.option("--history", is_flag=True, help="List the stored recommendations instead of computing one.")
@click.option("--shipped", is_flag=True, help="Print the survey result that ships with hposvc (studies/survey/RESULTS.md); needs no studies.")
@click.option("--no-store", is_flag=True, help="Do not store the result in SQL or MLflow.")
@storage_options
@tracking_option
@json_option
def recommend(study_names: tuple[str, ...], tasks: tuple[str, ...], use_all: bool, budget: int | None, by: str | None, kind: str | None, reference: str | None, n_bootstrap: int, history: bool, shipped: bool, no_store: bool, storage: str, data_dir: str | None, tracking_uri: str | None, as_json: bool) -> None:
    """Which optimizer to use by default, with which numbers, and how sure that is.

    \b
    Examples:
      hposvc recommend --all --budget 10
      hposvc recommend --study survey-digits --study survey-moons --by norm --json
      hposvc recommend --history
      hposvc recommend --all --kind transformer
      hposvc recommend --shipped      # the survey result that ships with hposvc
      hposvc recommend --shipped --kind transformer --json
    """
    from hposvc.recommendation import load_shipped_survey, recommend as compute, recommendation_history
    from hposvc.storage import resolve_tracking_uri

    if shipped:
        if study_names or tasks or use_all or history:
            raise InvalidInputError("the '--shipped' option conflicts with '--study', '--task', '--all' and '--history': it prints the shipped survey result.")
        shipped_result = load_shipped_survey()
        if kind is None:
            _emit_survey(shipped_result, as_json=as_json)
            return
        of_kind = shipped_result.for_kind(kind)
        if as_json:
            emit(of_kind, as_json=True)
            return
        emit(of_kind["optimizers"], as_json=False, title=f"optimizers on {kind} tasks ({', '.join(of_kind['tasks'])}; shipped)")
        click.echo(of_kind["summary"])
        return
    if history:
        emit(recommendation_history(storage), as_json=as_json, title="stored recommendations")
        return
    if sum(map(bool, (study_names, tasks, use_all))) != 1:
        raise InvalidInputError("give exactly one of --study NAME (repeatable), --task KEY (repeatable) or --all.")
    rec = compute(
        storage=storage,
        studies=list(study_names) or None,
        tasks=list(tasks) or None,
        budget=budget,
        by=by,
        kind=kind,
        reference=reference,
        n_bootstrap=n_bootstrap,
        store=not no_store,
        tracking_uri=resolve_tracking_uri(tracking_uri, data_dir=data_dir),
        data_dir=data_dir,
    )
    if as_json:
        emit(rec.to_dict(), as_json=True)
        return
    emit(rec.table, as_json=False, title="optimizers")
    click.echo(rec.summary)


# -- survey ----------------------------------------------------------------------------


@main.group()
def survey() -> None:
    """Run the optimizer survey protocol (studies/survey/) and report what it shows."""


@survey.command("run")
@click.option("--scale", type=click.Choice(["ci", "full"]), default="full", show_default=True, help="ci: 4 small tasks, 4 optimizers, 4 lr points (minutes); full: every task and optimizer, 8 lr points.")
@click.option("--population", default="auto", show_default=True, callback=lambda ctx, param, v: _population(v), help="Trials trained together as one vectorised population ('auto': a whole study at once).")
@click.option("--workers", help="Worker processes: N, or 'auto' for one per device slot (default: this process).")
@click.option("--device", default="auto", show_default=True, help="Device for in-process trials: auto, cpu, cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@storage_options
@tracking_option
@json_option
def survey_run(scale: str, population: int | str | None, workers: str | None, device: str, quiet: bool, storage: str, data_dir: str | None, tracking_uri: str | None, as_json: bool) -> None:
    """Run (or resume) the survey: every optimizer on every task of the protocol with the
    same trials, an lr sweep plus its one-shot defaults over seeds.

    \b
    Examples:
      hposvc survey run --scale ci --data-dir survey-ci
      nice -n 10 hposvc survey run --scale full --workers auto --data-dir survey-data
    """
    from hposvc.recommendation import run_survey

    result = run_survey(scale=scale, population=population, workers=workers, storage=storage, tracking_uri=tracking_uri, data_dir=data_dir, device=device, progress=not quiet)
    row = {k: getattr(result, k) for k in result.__dataclass_fields__ if k != "studies"}
    emit({**row, "studies": len(result.studies)}, as_json=as_json, title=f"survey {result.scale}")


@survey.command("report")
@click.option("--scale", type=click.Choice(["ci", "full"]), default="full", show_default=True, help="Which survey run to report on.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder for RESULTS.md and results.json (default: <data dir>/survey-<scale>).")
@click.option("--bootstrap", "n_bootstrap", default=1000, show_default=True, type=click.IntRange(min=10), help="Bootstrap resamples for the intervals.")
@click.option("--shipped", is_flag=True, help="Print the survey result that ships with hposvc instead (no storage needed).")
@click.option("--no-store", is_flag=True, help="Do not store the recommendation in SQL or MLflow.")
@storage_options
@tracking_option
@json_option
def survey_report(scale: str, out_dir: str | None, n_bootstrap: int, shipped: bool, no_store: bool, storage: str, data_dir: str | None, tracking_uri: str | None, as_json: bool) -> None:
    """Recommend from a survey run: store it (SQL + MLflow), write RESULTS.md and
    results.json, and print the table and the summary line.

    \b
    Examples:
      hposvc survey report --scale full --data-dir survey-data --out studies/survey
      hposvc survey report --shipped
    """
    from hposvc.recommendation import load_shipped_survey, survey_report as compute
    from hposvc.storage import resolve_tracking_uri

    if shipped:
        if no_store or out_dir:
            raise InvalidInputError("the '--shipped' option conflicts with '--out' and '--no-store': it only prints the shipped result.")
        result = load_shipped_survey()
    else:
        result = compute(scale=scale, storage=storage, data_dir=data_dir, tracking_uri=resolve_tracking_uri(tracking_uri, data_dir=data_dir), out_dir=out_dir, n_bootstrap=n_bootstrap, store=not no_store)
    _emit_survey(result, as_json=as_json)


def _emit_survey(result: Any, *, as_json: bool) -> None:
    """A survey result as a table and its summary line, or as JSON."""
    if as_json:
        emit(result.to_dict(), as_json=True)
        return
    emit(result.optimizer_rows(), as_json=False, title=f"optimizers ({result.source})")
    click.echo(result.summary)
    if result.files:
        click.echo("wrote " + ", ".join(result.files), err=True)


def entry(argv: list[str] | None = None) -> None:
    """The ``hposvc`` command: :func:`main`, then a quick exit.

    Tearing the interpreter down once torch is loaded takes about a second (finalising
    its modules and objects), and nothing of hposvc's happens in it: the exit handlers
    (journals closed and synced, logs flushed) run here, then the process ends.
    """
    import atexit

    try:
        main.main(args=argv, prog_name="hposvc")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    atexit._run_exitfuncs()  # noqa: SLF001 (what the interpreter would run at exit)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
