"""End to end through the real CLI (issue 7): survey studies → recommend → SQL row and
MLflow run → warm start of a study on another task.

The three shipped survey specs run once per module, at small budgets, in a tmp data dir
(real training, real SQLite, real MLflow SQLite store); each test then works on its own
copy of that data dir, so one test's writes (a stored recommendation, a warm-started
study that later warm starts would learn from) never change what another one sees.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner, Result

from hposvc.cli import main
from hposvc.config import TrialConfig
from hposvc.space import config_in_space
from hposvc.spec import load_spec

pytestmark = pytest.mark.slow  # the module's fixture runs the three survey studies

ROOT = Path(__file__).resolve().parents[1]
SURVEY = ROOT / "studies" / "survey"
# Small budgets that still give some optimizers ≥ 3 trials (min_trials) on a task: the
# random sampler (seed 0) draws adam, nesterov and rmsprop 3–4 times in 16 trials. mnist1d
# (a CNN) is the slow one and gets fewer; its optimizers are "insufficient data", which
# the recommendation must say rather than hide.
BUDGETS = {"digits": 16, "moons": 16, "mnist1d": 8}
# Settings from a developer's shell must not redirect the CLI away from the tmp data dir.
CLEAN_ENV = {"HPOSVC_STORAGE": None, "HPOSVC_DATA_DIR": None, "MLFLOW_TRACKING_URI": None}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _cli(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args), env=CLEAN_ENV, catch_exceptions=False)
    assert result.exit_code == 0, f"hposvc {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    return result


def _json(*args: str) -> object:
    return json.loads(_cli(*args, "--json").stdout)


def _clone(src: Path, dst: Path) -> Path:
    """Copy a data dir; both SQLite databases through SQLite's backup API (this process
    still holds connections to the study database, and a tracking process may still have
    the MLflow store open, so a file copy could be torn or meet a vanishing journal)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("hposvc.db*", "mlflow.db*"))
    for name in ("hposvc.db", "mlflow.db"):
        with sqlite3.connect(src / name) as a, sqlite3.connect(dst / name) as b:
            a.backup(b)
        a.close()
        b.close()
    return dst


@pytest.fixture(scope="module")
def survey_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir in which the three shipped survey studies ran (small budgets)."""
    data = tmp_path_factory.mktemp("survey") / "data"
    for task, n in BUDGETS.items():
        out = _json("study", "run", str(SURVEY / f"{task}.toml"), "--n-trials", str(n), "--data-dir", str(data), "--quiet")
        assert out["study_name"] == f"survey-{task}" and out["n_done"] == n
    _cli("sync", "--data-dir", str(data))  # the studies' summaries are in MLflow before any copy
    return data


@pytest.fixture
def data(survey_dir: Path, tmp_path: Path) -> Path:
    """This test's own copy of the surveyed data dir."""
    return _clone(survey_dir, tmp_path / "data")


def _spirals_spec(path: Path, name: str, optimizers: list[str]) -> Path:
    """A study on spirals (a task the survey never saw) whose space is a subset of the
    survey's: some of its optimizers with narrower lr ranges, fewer norms, one activation."""
    lr = {
        "sgd": (1e-2, 1.0), "momentum": (1e-3, 0.3), "nesterov": (1e-3, 0.3), "adagrad": (1e-2, 1.0),
        "adadelta": (0.1, 10.0), "rmsprop": (1e-4, 1e-2), "adam": (1e-4, 1e-2), "adamw": (1e-4, 1e-2),
    }  # fmt: skip
    ranges = "\n".join(f"[space.optimizers.{o}]\nlr = {{ low = {lr[o][0]}, high = {lr[o][1]}, log = true }}" for o in optimizers)
    path.write_text(
        f"""
[study]
name = "{name}"
task = "spirals"
metric = "val_accuracy"
n_trials = 5
sampler = "random"
pruner = "none"
seed = 1

[train]
epochs = 2
batch_size = 64

[space]
optimizer = {json.dumps(optimizers)}
optimizer_defaults = "fixed"
norm = ["none", "batch"]
activation = ["relu"]

{ranges}
"""
    )
    return path


def _trials(data: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{data / 'hposvc.db'}")
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def test_recommend_all_after_the_survey_gives_numbers_stored_in_sql_and_mlflow(data: Path, tmp_path: Path) -> None:
    import mlflow

    rec = _json("recommend", "--all", "--data-dir", str(data))
    assert sorted(rec["studies"]) == ["survey-digits", "survey-mnist1d", "survey-moons"]
    assert rec["n_trials"] == sum(BUDGETS.values())  # no pruner: every trial finished
    # 16 random trials over 8 optimizers rarely tell one apart: best is named only when
    # it is detectably ahead, else the summary says so and tied lists the top group.
    best, top = rec["best"], _top(rec)
    assert top in {"sgd", "momentum", "nesterov", "adagrad", "adadelta", "rmsprop", "adam", "adamw"}
    if best is None:
        assert rec["summary"].startswith(("No detectable difference among", "No recommendation")), rec["summary"]
        assert rec["config"] is None and (rec["tied"][0] == top if rec["tied"] else True)
    else:
        assert best == top and rec["tied"] == [] and rec["summary"].startswith(f"Use {best} by default (lr=")
        assert rec["config"]["optimizer"] == best and rec["config"]["lr"] == rec["numbers"][best]["lr"]
    # Explicit numbers for the top optimizer: every number its optimizer takes, inside
    # the survey's lr range for it.
    numbers = rec["numbers"][top]
    assert set(TrialConfig(optimizer=top).optimizer_params) <= set(numbers)
    lr_dim = load_spec(SURVEY / "digits.toml").optimizer_space(top)["lr"][1]
    assert lr_dim.low <= numbers["lr"] <= lr_dim.high
    row = {r["optimizer"]: r for r in rec["table"]}[top]
    assert row["status"] == "ok" and 0 <= row["p_best"] <= 1 and row["ci_low"] <= row["score"] <= row["ci_high"]
    # Too little data is said: with 8 mnist1d trials over 8 optimizers, none has 3 there.
    assert any(r["status"] == "insufficient data" for r in rec["task_scores"] if r["task"].startswith("mnist1d"))

    # The SQL row, listed by --history.
    history = _json("recommend", "--history", "--data-dir", str(data))
    assert [h["id"] for h in history] == [rec["id"]]
    assert history[0]["best"] == best and history[0]["mlflow_run_id"] == rec["mlflow_run_id"]
    assert history[0]["summary"] == rec["summary"]

    # The MLflow run in the tmp data dir's tracking store, with its CSV and PNG plots.
    client = mlflow.MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hposvc-recommendations")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [rec["mlflow_run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["best"] == str(best)
    assert run.data.tags["hposvc.recommendation_id"] == str(rec["id"])
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recommendation.csv", "task_scores.csv", "budget_curves.csv", "recommendation.json"} <= files
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/budget_curves.png", "plots/performance_profiles.png", "plots/score_distributions.png"}
    got = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    assert (got / "plots" / "budget_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert top in (got / "recommendation.csv").read_text().splitlines()[1]  # the top first
    assert Path(exp.artifact_location.removeprefix("file://")).is_relative_to(data)  # inside the data dir


def _top(rec: dict) -> str:
    """The first ranked optimizer: the best one, or the top of the tied group."""
    return next(r["optimizer"] for r in rec["table"] if r["status"] == "ok")


def test_warm_start_enqueues_the_recommendation_inside_the_spec_space(data: Path, tmp_path: Path) -> None:
    rec = _json("recommend", "--all", "--data-dir", str(data), "--no-store")
    best = _top(rec)  # warm start follows the ranking whether or not the top is detectably best
    spec_path = _spirals_spec(tmp_path / "spirals.toml", "spirals-warm", ["sgd", "momentum", "nesterov", "rmsprop", "adam", "adamw"])
    spec = load_spec(spec_path)
    assert best in spec.optimizers  # the survey's usual winners are all in this subset
    out = _json("study", "run", str(spec_path), "--data-dir", str(data), "--warm-start", "--quiet")
    assert out["n_done"] == 5

    trials = _trials(data, "spirals-warm")
    warm = [t for t in trials if t.user_attrs.get("hposvc.warm_start")]
    assert 1 <= len(warm) <= 3 and [t.number for t in warm] == list(range(len(warm)))  # first in the queue
    configs = [TrialConfig.from_dict(t.user_attrs["hposvc.config"]) for t in trials]
    assert all(config_in_space(c, spec) for c in configs)
    first = configs[0]
    assert first.optimizer == best  # the recommended optimizer first, with its numbers
    lr = spec.optimizer_space(best)["lr"][1]
    assert first.lr == pytest.approx(min(max(rec["numbers"][best]["lr"], lr.low), lr.high))
    assert len({c.optimizer for c in configs[: len(warm)]}) == len(warm)  # one per optimizer
    # A second run of the same study is a resume: nothing is enqueued again.
    _cli("study", "run", str(spec_path), "--data-dir", str(data), "--warm-start", "--quiet", "--n-trials", "6")
    assert sum(bool(t.user_attrs.get("hposvc.warm_start")) for t in _trials(data, "spirals-warm")) == len(warm)


def test_warm_start_never_enqueues_an_optimizer_the_spec_excludes(data: Path, tmp_path: Path) -> None:
    rec = _json("recommend", "--all", "--data-dir", str(data), "--no-store")
    best = _top(rec)
    # The runner-up(s) with survey data, and sgd (whatever data it has) unless it is the best.
    measured = [r["optimizer"] for r in rec["table"] if r["status"] == "ok" and r["optimizer"] != best]
    allowed = list(dict.fromkeys([*measured[:2], *(["sgd"] if best != "sgd" else [])]))
    assert measured and best not in allowed
    spec_path = _spirals_spec(tmp_path / "spirals.toml", "spirals-narrow", allowed)
    spec = load_spec(spec_path)
    _cli("study", "run", str(spec_path), "--data-dir", str(data), "--warm-start", "--quiet")

    trials = _trials(data, "spirals-narrow")
    configs = [TrialConfig.from_dict(t.user_attrs["hposvc.config"]) for t in trials]
    assert best not in {c.optimizer for c in configs}
    assert all(config_in_space(c, spec) for c in configs)
    warm = [c for t, c in zip(trials, configs) if t.user_attrs.get("hposvc.warm_start")]
    assert warm, "the allowed runner-ups have survey data, so they are recommended"
    assert {c.optimizer for c in warm} <= set(allowed) and warm[0].optimizer in measured
