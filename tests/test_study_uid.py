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
from hposvc.drain import drain_once
from hposvc.tracking import Tracker, find_study_run, mlflow_client

SPEC = {
    "study": {"name": "twin", "task": "moons", "n_trials": 1, "sampler": "random", "pruner": "none", "seed": 3},
    "train": {"epochs": 2},
    "space": {"optimizer": ["adam"]},
}


def _stale_trial() -> optuna.trial.FrozenTrial:
    study = optuna.create_study(study_name="twin")
    study.ask()
    return study.trials[0]


def test_a_namesakes_records_in_one_outbox_land_on_their_own_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr("hposvc.tracking.PROCESS_MODE", "external")  # drained below, in this process
    # The older study "twin" (uid "old") left a trial in the outbox; the current "twin"
    # (uid "new") writes there too and closes a stale trial of its own, trial 0 as well.
    old = Tracker(uri, study="twin", uid="old", data_dir=tmp_path)
    old.start_trial(0, TrialConfig(optimizer="adam")).end("COMPLETE")
    new = Tracker(uri, study="twin", uid="new", data_dir=tmp_path)
    new.start_study(spec={})
    new.close_stale_trial(_stale_trial())
    sent, left = drain_once(new.folder)
    assert sent > 0 and left == 0

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
    client = mlflow_client(tracking)
    my_run = find_study_run(client, "twin", uid=records.study_info(load_study("twin", storage=mine)).uid).info.run_id
    their_run = find_study_run(client, "twin", uid=records.study_info(load_study("twin", storage=theirs)).uid).info.run_id
    assert my_run and their_run and my_run != their_run

    from hposvc.report import build_report

    report = build_report(["twin"], storage=mine, out_dir=tmp_path / "report", tracking_uri=tracking, data_dir=tmp_path)
    assert report.mlflow_runs == {"twin": my_run}
    client = MlflowClient(tracking)
    assert [a.path for a in client.list_artifacts(my_run, "report")]  # logged to mine
    assert not client.list_artifacts(their_run, "report")  # and not to the namesake's
