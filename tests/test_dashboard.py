"""The study as MLflow shows it (hposvc/dashboard.py): the experiment opens on training
runs, trial runs are comparable, the parent run summarises, the plots are there.

One tiny real study (``hposvc study run``, SQLite store and MLflow store) is shared by
these tests and tests/test_dashboard_browser.py, which opens it in Chromium.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from hposvc import dashboard
from hposvc.cli import main
from hposvc.config import TrialConfig
from hposvc.tracking import experiment_name

STUDY = "dash"
N_TRIALS = 5
SPEC = f"""\
[study]
name = "{STUDY}"
task = "moons"
metric = "val_accuracy"
n_trials = {N_TRIALS}
sampler = "random"
pruner = "none"
seed = 3

[train]
epochs = 3

[space]
optimizer = ["adam", "sgd"]
lr = {{ low = 1e-3, high = 0.3, log = true }}
init = ["he_normal", "xavier_uniform"]
norm = ["none", "batch"]
"""


@dataclass(frozen=True)
class DashRun:
    data: Path
    stderr: str  # what `hposvc study run` printed on stderr
    client: MlflowClient
    experiment_id: str
    parent_id: str
    trial_runs: dict[int, object]  # trial number -> mlflow Run
    study: optuna.Study


_SHARED: dict[str, DashRun] = {}


def dash_outputs(tmp_path_factory: pytest.TempPathFactory) -> DashRun:
    """Run the tiny study once per process, through the CLI as a user would."""
    if "run" in _SHARED:
        return _SHARED["run"]
    root = tmp_path_factory.mktemp("dashboard")
    spec = root / "dash.toml"
    spec.write_text(textwrap.dedent(SPEC))
    data = root / "data"
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--device", "cpu", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    # the trial runs are in MLflow when `study run` returns; the parent run's summary and
    # plots follow from the tracking process a moment later: `hposvc sync` waits for them
    synced = CliRunner().invoke(main, ["sync", "--data-dir", str(data)])
    assert synced.exit_code == 0, synced.output
    client = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment_name(STUDY))
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("hposvc.role") == "study"]
    assert len(parent) == 1
    trials = {int(r.data.tags["hposvc.trial_number"]): r for r in runs if r.data.tags.get("hposvc.role") == "trial"}
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{data / 'hposvc.db'}")
    _SHARED["run"] = DashRun(data, result.stderr, client, exp.experiment_id, parent[0].info.run_id, trials, study)
    return _SHARED["run"]


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> DashRun:
    return dash_outputs(tmp_path_factory)


def test_the_experiment_opens_on_training_runs_and_says_what_the_study_is(dash: DashRun) -> None:
    tags = dash.client.get_experiment(dash.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["hposvc.direction"] == "maximize"
    assert f"hposvc study **{STUDY}**" in tags["mlflow.note.content"]
    # `study run` ends by saying where to look (no tracking server: the command that serves it)
    assert f"Inspect it in MLflow: hposvc ui {STUDY} --data-dir {dash.data}" in dash.stderr


def test_trial_runs_carry_the_value_their_state_and_their_params(dash: DashRun) -> None:
    trials = dash.study.get_trials()
    assert sorted(dash.trial_runs) == [t.number for t in trials] == list(range(N_TRIALS))
    for t in trials:
        run = dash.trial_runs[t.number]
        assert t.state.name == "COMPLETE"
        assert run.data.metrics[dashboard.VALUE_METRIC] == pytest.approx(t.value)
        assert run.data.tags["hposvc.state"] == "COMPLETE"
        assert run.data.params == TrialConfig.from_dict(t.user_attrs["hposvc.config"]).flat_params()


def test_parent_run_summarises_the_study(dash: DashRun, tmp_path: Path) -> None:
    best = dash.study.best_trial
    parent = dash.client.get_run(dash.parent_id)
    assert parent.info.status == "FINISHED"
    # the best trial's config as params; counts by state
    assert parent.data.params == TrialConfig.from_dict(best.user_attrs["hposvc.config"]).flat_params()
    assert parent.data.tags["hposvc.best_trial"] == str(best.number)
    assert parent.data.tags["hposvc.best_run_id"] == dash.trial_runs[best.number].info.run_id
    assert parent.data.metrics["n_complete"] == N_TRIALS
    # best_value: one point per finished trial, step = trial number, the running best
    history = sorted((m.step, m.value) for m in dash.client.get_metric_history(dash.parent_id, "best_value"))
    values = [t.value for t in sorted(dash.study.trials, key=lambda t: t.number)]
    assert history == [(n, pytest.approx(max(values[: n + 1]))) for n in range(N_TRIALS)]
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    # summary.md: counts, the best config, the top 5, the plan that ran, the spec
    summary = Path(dash.client.download_artifacts(dash.parent_id, "summary.md", str(tmp_path))).read_text()
    assert summary.startswith(f"# Study `{STUDY}`")
    for heading in ("## Best config", "## Top 5 trials", "## The plan that ran", "## Spec"):
        assert heading in summary
    assert f"Trial {best.number}: `val_accuracy` = {best.value:.6g}" in summary
    top = re.findall(r"^\| (\d+) \| ([0-9.e-]+) \|", summary.split("## Top 5 trials")[1].split("##")[0], re.M)
    ranked = sorted(dash.study.trials, key=lambda t: -t.value)
    assert [int(n) for n, _ in top] == [t.number for t in ranked]
    assert "1 worker(s) on 1 host(s); devices: cpu (5 trials)." in summary
    assert json.loads(summary.split("```json")[1].split("```")[0])["study"]["name"] == STUDY


def test_plots_are_one_interactive_page_and_png_copies(dash: DashRun, tmp_path: Path) -> None:
    listed = {a.path: a.file_size for a in dash.client.list_artifacts(dash.parent_id, "plots")}
    assert set(listed) == {"plots/dashboard.html"} | {f"plots/{name}.png" for name in dashboard.PLOTS}
    assert all(size > 1000 for size in listed.values())
    page = Path(dash.client.download_artifacts(dash.parent_id, "plots/dashboard.html", str(tmp_path))).read_text()
    assert re.findall(r'<section id="(\w+)" class="plot">', page) == list(dashboard.PLOTS)
    assert page.count("Plotly.newPlot(") == len(dashboard.PLOTS)
    # plotly.js is inline once (MLflow's viewer shows the file without its folder; no CDN)
    assert page.count("plotly.js v") == 1 and "cdn.plot.ly" not in page.split("<body>")[1].split("<script")[0]


def test_ui_refuses_a_study_without_an_experiment(dash: DashRun) -> None:
    result = CliRunner().invoke(main, ["ui", "no-such-study", "--data-dir", str(dash.data)])
    assert result.exit_code == 2
    assert "the 'STUDY' argument of hposvc ui names a study with no MLflow experiment" in result.stderr
    assert "got 'no-such-study'" in result.stderr


def test_study_run_names_a_tracking_store_of_its_own_in_the_ui_command(tmp_path: Path) -> None:
    from hposvc.cli import _where_to_look

    default = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert _where_to_look("s", data_dir=str(tmp_path), tracking_uri=default) == f"hposvc ui s --data-dir {tmp_path}"
    other = f"sqlite:///{tmp_path / 'elsewhere' / 'm.db'}"
    assert _where_to_look("s", data_dir=str(tmp_path), tracking_uri=other) == f"hposvc ui s --data-dir {tmp_path} --tracking-uri {other}"


def test_runs_url_opens_model_training_sorted_best_first() -> None:
    url = dashboard.runs_url("http://h:5000/", "7", maximize=True)
    assert url == "http://h:5000/#/experiments/7/runs?workflowType=machine_learning&orderByKey=metrics.%60value%60&orderByAsc=false"
    assert dashboard.runs_url("http://h:5000", "7", maximize=False).endswith("&orderByAsc=true")


def test_history_points_missed_or_out_of_order_are_made_right_at_the_end(dash: DashRun, tmp_path: Path) -> None:
    """Trials finishing out of order (several workers) or during an MLflow outage: the
    study's end logs a point for each finished trial without one, and the last step ends
    on the study's best."""
    client = dash.client  # its store, another experiment
    run_id = client.create_run(client.create_experiment("history", artifact_location=str(tmp_path / "art"))).info.run_id
    study = optuna.create_study(direction="minimize")
    for value in (0.5, 0.7, 0.2, 0.9):
        study.add_trial(optuna.trial.create_trial(value=value, params={}, distributions={}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={}))
    # trial 3 finished before trial 2 (seen then: best of 0..1 finished) ...
    dashboard.log_best_value(client, run_id, _as_of(study, finished=[0, 1, 3]), 3)
    # ... trial 1's point was lost in an outage; a failed trial gets none
    assert dashboard.log_best_value(client, run_id, study, 4) is None
    dashboard.summarise_study(client, run_id, study, spec={}, plots=False)
    points = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, "best_value"))
    assert [(s, v) for s, _, v in points] == [(0, 0.5), (1, 0.5), (2, 0.2), (3, 0.5), (3, 0.2)]
    assert client.get_run(run_id).data.metrics["best_value"] == 0.2  # the latest point of the last step
    assert client.get_run(run_id).data.metrics["n_fail"] == 1


def _as_of(study: optuna.Study, *, finished: list[int]) -> optuna.Study:
    """The study as it looked when only ``finished`` had finished (an in-memory copy)."""
    copy = optuna.create_study(direction=study.direction)
    for t in study.get_trials():
        copy.add_trial(t if t.number in finished else optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, params={}, distributions={}))
    return copy
