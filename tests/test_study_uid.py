"""A study's MLflow runs are found by its uid, never by its name alone.

Two studies can share a name and one MLflow store: a study deleted and created again, or
two storages (two data dirs, a laptop and a cluster) logging to one tracking server. Each
must write to and read from its own runs.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

import hposvc
from hposvc import records
from hposvc.config import TrialConfig
from hposvc.storage import load_study
from hposvc.tracking import Tracker, sync_outbox

from conftest import free_port

SPEC = {
    "study": {"name": "twin", "task": "moons", "n_trials": 1, "sampler": "random", "pruner": "none", "seed": 3},
    "train": {"epochs": 2},
    "space": {"optimizer": ["adam"]},
}


def _stale_trial() -> optuna.trial.FrozenTrial:
    study = optuna.create_study(study_name="twin")
    study.ask()
    return study.trials[0]


def test_syncing_a_namesakes_outbox_does_not_change_who_closes_stale_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The older study "twin" (uid "old") lost its tracking server: its trial record waits
    # in the shared outbox.
    old = Tracker(f"http://127.0.0.1:{free_port()}", study="twin", uid="old", data_dir=tmp_path)
    run = old.start_trial(0, TrialConfig(optimizer="adam"))
    run.end("COMPLETE")
    old.drain()
    assert len(list((tmp_path / "outbox").glob("*.json"))) == 1

    # The current "twin" (uid "new") replays it under the old uid, then closes a stale trial.
    new = Tracker(uri, study="twin", uid="new", data_dir=tmp_path)
    new.start_study(spec={})
    assert sync_outbox(new) == 1
    new.close_stale_trial(_stale_trial())

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("hposvc/twin")
    by_uid = {
        uid: client.search_runs([exp.experiment_id], filter_string=f"tags.`hposvc.role` = 'trial' and tags.`hposvc.study_uid` = '{uid}'")
        for uid in ("old", "new")
    }
    assert [r.data.tags["hposvc.state"] for r in by_uid["old"]] == ["COMPLETE"]  # the replayed record
    assert [r.data.tags["hposvc.state"] for r in by_uid["new"]] == ["FAIL"]  # the stale close, under the new uid
    assert by_uid["new"][0].data.tags["hposvc.reason"].startswith("worker died")


@pytest.mark.slow
def test_a_report_is_logged_to_its_own_studys_parent_run(tmp_path: Path) -> None:
    # Two storages, one tracking store: "twin" in `mine`, then a newer "twin" in `theirs`.
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mine, theirs = f"sqlite:///{tmp_path / 'mine.db'}", f"sqlite:///{tmp_path / 'theirs.db'}"
    hposvc.run_study(SPEC, storage=mine, tracking_uri=tracking, data_dir=tmp_path)
    hposvc.run_study(SPEC, storage=theirs, tracking_uri=tracking, data_dir=tmp_path)
    my_run = records.study_info(load_study("twin", storage=mine)).parent_run_id
    their_run = records.study_info(load_study("twin", storage=theirs)).parent_run_id
    assert my_run and their_run and my_run != their_run

    from hposvc.report import build_report

    report = build_report(["twin"], storage=mine, out_dir=tmp_path / "report", tracking_uri=tracking, data_dir=tmp_path)
    assert report.mlflow_runs == {"twin": my_run}
    client = MlflowClient(tracking)
    assert [a.path for a in client.list_artifacts(my_run, "report")]  # logged to mine
    assert not client.list_artifacts(their_run, "report")  # and not to the namesake's
