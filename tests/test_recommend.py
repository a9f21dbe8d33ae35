"""Tests of hposvc.recommend: estimator, profiles, ranking, bootstrap, storage, MLflow."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import sqlalchemy as sa

from hposvc.config import TrialConfig
from hposvc.errors import InvalidInputError, StorageError
from hposvc.recommendation import (
    collect_trials,
    expected_max,
    expected_max_curve,
    expected_max_weights,
    anchored,
    load_recommendation,
    performance_profile,
    profile_area,
    recommend,
    recommend_from_frame,
    recommendation_history,
    warm_start_configs,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- budget-curve estimator --------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 2, 3, 5, 7])
def test_expected_max_equals_brute_force_over_all_subsets(N: int) -> None:
    rng = np.random.default_rng(N)
    values = rng.normal(size=N).round(1)  # rounding makes ties, which must not matter
    curve = expected_max_curve(values)
    for n in range(1, N + 1):
        brute = np.mean([max(c) for c in itertools.combinations(values, n)])
        assert expected_max(values, n) == pytest.approx(brute, abs=1e-12)
        assert curve[n - 1] == pytest.approx(brute, abs=1e-12)
    assert curve[-1] == pytest.approx(values.max())  # n = N is the maximum
    assert curve[0] == pytest.approx(values.mean())  # n = 1 is the untuned mean


def test_expected_max_is_stable_for_large_n_and_refuses_more_trials_than_ran() -> None:
    values = np.random.default_rng(0).uniform(size=2000)
    curve = expected_max_curve(values)
    assert np.all(np.isfinite(curve)) and np.all(np.diff(curve) >= -1e-12)
    assert curve[-1] == pytest.approx(values.max()) and len(curve) == 2000  # k = 1 … N, never beyond
    w = expected_max_weights(2000, 1000)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    # k > N: no unbiased estimate exists, and none is made up.
    with pytest.raises(InvalidInputError, match=r"the 'k' parameter must be at most 3, the number of trials that ran\. Got 5"):
        expected_max([0.1, 0.5, 0.9], 5)
    with pytest.raises(InvalidInputError, match="at most 3"):
        expected_max_weights(3, 4)


# -- normalisation and performance profiles ---------------------------------------------

# Costs (error at the budget) of 3 optimizers on 4 tasks, and the ratios to each task's best:
#        a     b     c          r_a r_b r_c
# t1   0.10  0.20  0.40          1   2   4
# t2   0.05  0.05  0.10          1   1   2
# t3   0.30  0.15  0.60          2   1   4
# t4   0.02  0.08  0.04          1   4   2
COSTS = pd.DataFrame(
    {"a": [0.10, 0.05, 0.30, 0.02], "b": [0.20, 0.05, 0.15, 0.08], "c": [0.40, 0.10, 0.60, 0.04]},
    index=["t1", "t2", "t3", "t4"],
)


def test_performance_profile_matches_hand_computed_values() -> None:
    prof = performance_profile(COSTS, [1.0, 1.5, 2.0, 3.0, 3.99, 4.0])
    assert prof["a"].tolist() == [0.75, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert prof["b"].tolist() == [0.5, 0.5, 0.75, 0.75, 0.75, 1.0]
    assert prof["c"].tolist() == [0.0, 0.0, 0.5, 0.5, 0.5, 1.0]


def test_profile_area_matches_hand_computed_values_and_dominated_scores_lower() -> None:
    # B = mean over tasks of (4 − clip(r, 1, 4)) / 3
    area = profile_area(COSTS)
    assert area["a"] == pytest.approx((3 + 3 + 2 + 3) / 12)
    assert area["b"] == pytest.approx((2 + 3 + 3 + 0) / 12)
    assert area["c"] == pytest.approx((0 + 2 + 0 + 2) / 12)
    assert (COSTS["c"] > COSTS["a"]).all()  # c is dominated by a ...
    assert area["c"] < area["a"]  # ... and scores lower
    # The area is the integral of the profile: check against a fine numerical integral.
    taus = np.linspace(1, 4, 300001)
    prof = performance_profile(COSTS, taus)
    numeric = np.trapezoid(prof.to_numpy(), taus, axis=0) / 3
    np.testing.assert_allclose(numeric, area.to_numpy(), atol=1e-4)


def test_anchored_scores_use_fixed_floor_and_best_known() -> None:
    # Task 1: floor 0.5 (e.g. chance), best known 0.9; task 2: floor 0.1, best 0.3.
    scores = np.array([[0.8, 0.9, 0.5, np.nan], [0.2, 0.3, 0.1, 0.0]])
    out = anchored(scores, floor=np.array([0.5, 0.1]), best=np.array([0.9, 0.3]))
    np.testing.assert_allclose(out, [[0.75, 1.0, 0.0, np.nan], [0.5, 1.0, 0.0, -0.5]])
    # Removing an optimizer moves nobody else's score (unlike worst-to-best scaling).
    np.testing.assert_allclose(anchored(scores[:, :2], np.array([0.5, 0.1]), np.array([0.9, 0.3])), out[:, :2])


# -- recommendations from constructed trial sets ----------------------------------------


def _frame(means: dict[str, float], *, n_tasks: int, n_trials: int, sd: float = 0.03, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(n_tasks):
        base = rng.uniform(-0.05, 0.05)  # tasks differ in difficulty
        for opt, mu in means.items():
            cfg = TrialConfig(optimizer=opt).to_dict()
            for k in range(n_trials):
                lr = float(cfg["lr"] * 10 ** rng.uniform(-1, 1))
                rows.append(
                    {
                        **cfg,
                        "lr": lr,
                        "task": f"task{t}",
                        "study": f"study{t}",
                        "metric": "val_accuracy",
                        "direction": "maximize",
                        "value": float(np.clip(mu + base + rng.normal(0, sd), 0, 1)),
                        "norm": ("none", "batch")[k % 2],
                        "activation": ("relu", "tanh")[k % 2],
                    }
                )
    return pd.DataFrame(rows)


def test_known_best_is_named_with_high_p_best() -> None:
    df = _frame({"sgd": 0.80, "momentum": 0.82, "adam": 0.90}, n_tasks=5, n_trials=12)
    rec = recommend_from_frame(df, budget=5, n_bootstrap=500, seed=1)
    assert rec.best == "adam"
    row = rec.table.set_index("optimizer").loc["adam"]
    assert row["p_best"] >= 0.9
    assert row["ci_low"] <= row["score"] <= row["ci_high"]
    assert row["rank"] == pytest.approx(1.0)
    assert rec.table["p_best"].sum() == pytest.approx(1.0)
    assert rec.friedman["p"] is not None and rec.friedman["p"] < 0.05
    assert rec.config is not None and rec.config.optimizer == "adam"
    assert rec.summary.startswith("Use adam by default (lr=")
    # Recommended lr: the log-space median of the top-quartile trials, a number in range.
    assert 1e-4 <= rec.numbers["adam"]["lr"] <= 1e-2
    # The budget curve in long form: n = 1..12 per task and optimizer, non-decreasing.
    curves = rec.budget_curves
    assert set(curves.columns) >= {"task", "optimizer", "n", "expected_best"}
    assert len(curves) == 5 * 3 * 12
    assert (curves.groupby(["task", "optimizer"])["expected_best"].diff().dropna() >= -1e-12).all()
    json.dumps(rec.to_dict(), allow_nan=False)  # JSON-safe


def test_identical_distributions_give_near_uniform_p_best_and_friedman_does_not_reject() -> None:
    # On one data set the bootstrap P(best) follows whoever happens to lead (that is what
    # it should do), so "near uniform" is checked over independent data sets: on average
    # each optimizer is best a third of the time, a confident winner (≥ 0.9) is rare, and
    # Friedman rejects at about its nominal 5 % rate.
    names = ["sgd", "momentum", "adam"]
    p_best, friedman_p = [], []
    for seed in range(30):
        df = _frame(dict.fromkeys(names, 0.85), n_tasks=8, n_trials=12, seed=seed)
        rec = recommend_from_frame(df, budget=5, n_bootstrap=100, seed=seed)
        p = rec.table.set_index("optimizer")["p_best"].reindex(names)
        assert p.sum() == pytest.approx(1.0)
        p_best.append(p.to_numpy())
        friedman_p.append(rec.friedman["p"])
    p_best = np.array(p_best)
    # Each mean has a standard error of about 0.25 / sqrt(30) = 0.05.
    np.testing.assert_allclose(p_best.mean(axis=0), 1 / 3, atol=0.12)
    assert (p_best.max(axis=1) >= 0.9).sum() <= 3
    assert sum(p <= 0.05 for p in friedman_p) <= 3
    assert friedman_p[0] > 0.05


def test_reference_scores_are_relative_to_it() -> None:
    df = _frame({"sgd": 0.80, "adam": 0.90, "rmsprop": 0.85}, n_tasks=3, n_trials=6)
    rec = recommend_from_frame(df, budget=3, reference="sgd", n_bootstrap=50)
    scores = rec.table.set_index("optimizer")["score"]
    assert scores["sgd"] == 0.0 and scores["adam"] > scores["rmsprop"] > 0
    assert "relative to sgd" in rec.summary


def test_insufficient_data_is_reported_not_hidden() -> None:
    df = _frame({"sgd": 0.80, "adam": 0.90, "rmsprop": 0.85}, n_tasks=3, n_trials=6)
    # nadam: only 2 trials per task, below min_trials=3.
    df = pd.concat([df, _frame({"nadam": 0.99}, n_tasks=3, n_trials=2)], ignore_index=True)
    rec = recommend_from_frame(df, budget=3, n_bootstrap=50, min_trials=3)
    row = rec.table.set_index("optimizer").loc["nadam"]
    assert row["status"] == "insufficient data" and math.isnan(row["score"])
    assert row["n_trials"] == 6 and row["insufficient_tasks"] == 3
    assert set(rec.insufficient["optimizer"]) == {"nadam"}
    assert "Insufficient data" in rec.summary and "nadam" in rec.summary
    assert rec.best == "adam"  # 0.99 on 2 trials does not win
    # With too little data everywhere there is no recommendation, and it says so.
    none = recommend_from_frame(df, budget=3, n_bootstrap=10, min_trials=50)
    assert none.best is None and none.summary.startswith("No recommendation: insufficient data")
    # Enough trials of one optimizer but nothing to compare it with is said as such.
    alone = recommend_from_frame(df[df.optimizer == "adam"], budget=3, n_bootstrap=10)
    assert alone.best is None and alone.table["status"].tolist() == ["no comparison"]
    assert "nothing to compare with on the same task: adam" in alone.summary


def test_context_split_by_norm_and_activation() -> None:
    df = _frame({"sgd": 0.85, "adam": 0.85}, n_tasks=3, n_trials=12)
    # adam wins with batch norm, sgd without (clear margins).
    df.loc[(df.optimizer == "adam") & (df.norm == "batch"), "value"] += 0.1
    df.loc[(df.optimizer == "sgd") & (df.norm == "none"), "value"] += 0.1
    rec = recommend_from_frame(df, budget=3, by="norm", n_bootstrap=100)
    best = rec.by[rec.by["rank"] == 1].set_index("context")["optimizer"]
    assert best.to_dict() == {"batch": "adam", "none": "sgd"}
    assert "with batch norm: adam" in rec.summary and "without norm: sgd" in rec.summary
    rec = recommend_from_frame(df, budget=3, by="activation", n_bootstrap=20)
    assert set(rec.by["context"]) == {"relu-like", "saturating"}


def test_pruned_and_diverged_values_count() -> None:
    df = _frame({"sgd": 0.80, "adam": 0.90}, n_tasks=2, n_trials=5)
    df.loc[0, "value"] = np.nan  # a trial pruned before its first report
    rec = recommend_from_frame(df, budget=1, n_bootstrap=0)
    assert rec.table["n_trials"].sum() == len(df)
    assert rec.table["ci_low"].isna().all()  # no bootstrap asked for


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"budget": 0}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({"by": "depth"}, "by"),
        ({"reference": "lion"}, "reference"),
        ({"min_trials": 0}, "min_trials"),
        ({"n_bootstrap": -1}, "n_bootstrap"),
    ],
)
def test_bad_arguments_are_invalid_input(kwargs: dict, key: str) -> None:
    df = _frame({"sgd": 0.80, "adam": 0.90}, n_tasks=2, n_trials=3)
    with pytest.raises(InvalidInputError, match=rf"the '{key}' parameter must be .* Got .* instead"):
        recommend_from_frame(df, **kwargs)


# -- end to end through real SQLite Optuna storage and a real MLflow store ---------------


def _add_study(storage: str, name: str, task: str, metric: str, means: dict[str, float], rng: np.random.Generator) -> None:
    maximize = metric == "val_accuracy"
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize" if maximize else "minimize")
    study.set_user_attr("hposvc.task", task)
    study.set_user_attr("hposvc.metric", metric)
    trials = []
    for opt, mu in means.items():
        for k in range(6):
            cfg = TrialConfig(optimizer=opt, norm=("none", "batch")[k % 2], epochs=3).to_dict()
            acc = float(np.clip(mu + rng.normal(0, 0.02), 0, 1))
            value = acc if maximize else 1.0 - acc
            curve = {1: value * 0.9 if maximize else value * 1.1, 2: value, 3: value}
            attrs = {"hposvc.config": cfg, "hposvc.device": "cpu"}
            if k == 5:  # pruned after epoch 2: counts with its last reported value
                attrs["hposvc.reason"] = "pruned at epoch 2"
                trials.append(
                    optuna.trial.create_trial(
                        state=optuna.trial.TrialState.PRUNED, user_attrs=attrs, intermediate_values={1: curve[1], 2: curve[2]}
                    )
                )
            else:
                trials.append(optuna.trial.create_trial(value=value, user_attrs=attrs, intermediate_values=curve))
    # A failed trial is left out.
    trials.append(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL, user_attrs={"hposvc.config": TrialConfig(optimizer="adam").to_dict()}
        )
    )
    study.add_trials(trials)


@pytest.fixture(scope="module")
def survey_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("survey") / "hposvc.db"
    url = f"sqlite:///{path}"
    rng = np.random.default_rng(0)
    means = {"sgd": 0.75, "momentum": 0.85, "adam": 0.92}
    _add_study(url, "digits-a", "digits", "val_accuracy", means, rng)
    _add_study(url, "digits-b", "digits", "val_accuracy", means, rng)  # pools with digits-a
    _add_study(url, "moons", "moons", "val_accuracy", means, rng)
    _add_study(url, "spirals", "spirals", "val_loss", means, rng)
    return path


@pytest.fixture
def survey_db(survey_template: Path, tmp_path) -> str:
    """A fresh copy of the survey database per test (tests write to it)."""
    path = tmp_path / "hposvc.db"
    shutil.copy(survey_template, path)
    return f"sqlite:///{path}"


def test_collect_trials_reads_the_storage_contract(survey_db: str) -> None:
    df = collect_trials(survey_db)
    assert len(df) == 4 * 3 * 6  # FAIL trials excluded
    assert set(df["task"]) == {"digits", "moons", "spirals"}
    assert set(df["state"]) == {"COMPLETE", "PRUNED"}
    pruned = df[df["state"] == "PRUNED"]
    assert pruned["value"].notna().all()
    acc = df[df["metric"] == "val_accuracy"]
    np.testing.assert_allclose(acc["cost"], 1 - acc["value"])
    loss = df[df["metric"] == "val_loss"]
    np.testing.assert_allclose(loss["score"], -loss["value"])
    assert {"optimizer", "lr", "beta1", "norm", "activation", "batch_size"} <= set(df.columns)
    only = collect_trials(survey_db, tasks=["moons"])
    assert set(only["study"]) == {"moons"}
    with pytest.raises(InvalidInputError, match="the 'studies' parameter must be one of"):
        collect_trials(survey_db, studies=["nope"])
    with pytest.raises(InvalidInputError, match="the 'tasks' parameter"):
        collect_trials(survey_db, tasks=["nope"])


def test_recommend_end_to_end_stores_sql_row_and_mlflow_run(survey_db: str, tmp_path) -> None:
    import mlflow

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rec = recommend(storage=survey_db, budget=3, by="norm", n_bootstrap=200, store=True, tracking_uri=tracking)
    assert rec.best == "adam"
    assert rec.config is not None and rec.config.optimizer == "adam"
    assert rec.friedman["p"] is not None  # 3 tasks, 3 optimizers
    assert sorted(rec.studies) == ["digits-a", "digits-b", "moons", "spirals"]
    assert rec.id is not None and rec.mlflow_run_id

    # The SQL row, read with plain SQLAlchemy.
    engine = sa.create_engine(survey_db)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, budget, n_trials, best, mlflow_run_id, result FROM hposvc_recommendations")).all()
        version = conn.execute(sa.text("SELECT version FROM hposvc_schema WHERE component = 'recommendations'")).scalar_one()
    engine.dispose()
    assert len(rows) == 1 and version == 1
    row = rows[0]
    assert (row.id, row.budget, row.n_trials, row.best, row.mlflow_run_id) == (rec.id, 3, 72, "adam", rec.mlflow_run_id)
    assert json.loads(row.result)["summary"] == rec.summary

    history = recommendation_history(survey_db)
    assert history["id"].tolist() == [rec.id] and history["best"].tolist() == ["adam"]
    stored = load_recommendation(survey_db, rec.id)
    assert stored["best"] == "adam" and stored["mlflow_run_id"] == rec.mlflow_run_id
    assert stored["numbers"]["adam"]["lr"] == rec.numbers["adam"]["lr"]

    # The MLflow run with its params, metrics and artifacts.
    client = mlflow.MlflowClient(tracking)
    run = client.get_run(rec.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "hposvc-recommendations"
    assert run.data.params["budget"] == "3" and "digits-a" in run.data.params["studies"]
    assert run.data.metrics["p_best/adam"] == pytest.approx(rec.table.set_index("optimizer").at["adam", "p_best"])
    assert run.data.tags["hposvc.recommendation_id"] == str(rec.id)
    top = {a.path for a in client.list_artifacts(rec.mlflow_run_id)}
    assert {"recommendation.csv", "recommendation.json", "budget_curves.csv", "plots"} <= top
    plots = {a.path for a in client.list_artifacts(rec.mlflow_run_id, "plots")}
    assert plots == {"plots/budget_curves.png", "plots/performance_profiles.png", "plots/score_distributions.png"}
    png = client.download_artifacts(rec.mlflow_run_id, "plots/performance_profiles.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "mlruns").is_dir()  # artifacts beside the tracking database

    # A second computation adds a row; history is newest first.
    rec2 = recommend(storage=survey_db, budget=1, n_bootstrap=20, store=True, tracking_uri=tracking)
    assert recommendation_history(survey_db)["id"].tolist() == [rec2.id, rec.id]


def test_recommend_without_store_writes_nothing(survey_db: str) -> None:
    rec = recommend(storage=survey_db, studies=["moons", "spirals"], budget=2, n_bootstrap=20, store=False)
    assert rec.id is None and rec.mlflow_run_id is None
    assert sorted(rec.studies) == ["moons", "spirals"]
    assert recommendation_history(survey_db).empty


def test_storage_errors_are_wrapped(tmp_path) -> None:
    bad = tmp_path / "not-a-db.db"
    bad.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(StorageError):
        recommend(storage=f"sqlite:///{bad}", store=False)
    with pytest.raises(StorageError):
        recommendation_history(f"sqlite:///{bad}")


def test_warm_start_configs_fit_the_spec_space(survey_db: str) -> None:
    from hposvc.space import config_in_space
    from hposvc.spec import parse_spec

    spec = parse_spec(
        {
            "study": {"name": "spirals-new", "task": "spirals"},
            "space": {"optimizer": ["sgd", "adam"], "lr": {"low": 1e-3, "high": 0.1, "log": True}, "norm": ["none", "batch"]},
        }
    )
    study = optuna.create_study(study_name="spirals-new", storage=survey_db)
    configs = warm_start_configs(spec, storage=study)  # what hposvc.study passes
    assert [c.optimizer for c in configs] == ["adam", "sgd"]  # momentum is outside the space
    assert all(config_in_space(c, spec) for c in configs)
    assert 1e-3 <= configs[0].lr <= 0.1


def test_warm_start_configs_accept_the_storage_url(survey_db: str) -> None:
    from hposvc.spec import parse_spec

    spec = parse_spec({"study": {"name": "moons", "task": "moons"}, "space": {"optimizer": ["sgd", "momentum"]}})
    configs = warm_start_configs(spec, storage=survey_db)  # a URL: no study object needed
    # Ranked among the allowed optimizers only, over the *other* studies (not "moons").
    assert [c.optimizer for c in configs] == ["momentum", "sgd"]


def test_defaults_come_from_the_data_dir(survey_template: Path, data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import mlflow

    # Nothing given: $HPOSVC_DATA_DIR (set per test by conftest) holds all three stores.
    data_dir.mkdir(parents=True)
    shutil.copy(survey_template, data_dir / "hposvc.db")
    rec = recommend(budget=2, n_bootstrap=20)
    assert recommendation_history()["id"].tolist() == [rec.id]
    run = mlflow.MlflowClient(f"sqlite:///{data_dir / 'mlflow.db'}").get_run(rec.mlflow_run_id)
    assert run.info.artifact_uri.startswith((data_dir / "mlruns").as_uri())

    # An explicit data_dir wins over the environment, for storage, tracking and artifacts.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(survey_template, other / "hposvc.db")
    monkeypatch.setenv("HPOSVC_DATA_DIR", str(tmp_path / "unused"))
    rec = recommend(budget=2, n_bootstrap=20, data_dir=other)
    assert recommendation_history(f"sqlite:///{other / 'hposvc.db'}")["id"].tolist() == [rec.id]
    run = mlflow.MlflowClient(f"sqlite:///{other / 'mlflow.db'}").get_run(rec.mlflow_run_id)
    assert run.info.artifact_uri.startswith((other / "mlruns").as_uri())
    assert not (tmp_path / "unused").exists()


def test_warm_start_hedges_over_optimizers_and_contexts() -> None:
    from hposvc.recommendation import ranked_contexts, warm_start_configs_from_frame
    from hposvc.space import config_in_space
    from hposvc.spec import parse_spec

    # adam > momentum > sgd; context (norm, activation): batch/tanh > batch/relu > none/*.
    df = _frame({"sgd": 0.80, "momentum": 0.83, "adam": 0.90}, n_tasks=3, n_trials=12)
    rng = np.random.default_rng(0)
    df["norm"] = rng.choice(["none", "batch", "layer"], size=len(df))
    df["activation"] = rng.choice(["relu", "tanh"], size=len(df))
    df.loc[df.norm == "batch", "value"] += 0.2
    df.loc[(df.norm == "batch") & (df.activation == "tanh"), "value"] += 0.05
    spec = parse_spec(
        {
            "study": {"name": "new", "task": "spirals"},
            "space": {
                "optimizer": ["sgd", "momentum", "adam"],
                "lr": {"low": 1e-4, "high": 1.0, "log": True},
                "norm": ["none", "batch"],  # layer is outside the space: never proposed
                "activation": ["relu", "tanh"],
            },
        }
    )
    contexts = ranked_contexts(df, spec)
    assert contexts[:2] == [{"norm": "batch", "activation": "tanh"}, {"norm": "batch", "activation": "relu"}]
    assert all(c["norm"] != "layer" for c in contexts) and len(contexts) == 4
    configs = warm_start_configs_from_frame(df, spec, top=3)
    assert [(c.optimizer, c.norm, c.activation) for c in configs] == [
        ("adam", "batch", "tanh"),  # the recommendation itself, in the best context
        ("momentum", "batch", "relu"),  # next optimizer, next context
        ("sgd", "none", contexts[2]["activation"]),
    ]
    assert all(config_in_space(c, spec) for c in configs)
    # Too few trials for any context: the old per-optimizer pick, still in the space.
    assert ranked_contexts(df, spec, min_trials=10_000) == []
    assert all(config_in_space(c, spec) for c in warm_start_configs_from_frame(df.head(60), spec, min_trials=3))


def test_warm_start_methods_are_measured_on_held_out_tasks_from_protocol_tasks_only() -> None:
    """A constructed survey: on 'transformer' tasks only adam at lr 3e-3 is good, on 'mlp'
    tasks only sgd at 0.1. The held-out transformer task is found at once by the same-kind
    shortlist and box, while the list over every task (mostly mlp) ranks sgd first."""
    from hposvc.recommendation._warm_eval import METHODS, evaluate_warm_starts, expected_first_hit

    lrs = {"sgd": [0.001, 0.01, 0.1], "adam": [3e-4, 1e-3, 3e-3]}
    good = {"transformer": ("adam", 3e-3), "mlp": ("sgd", 0.1)}

    def task(name: str, kind: str, held_out: bool) -> list[dict]:
        rows = []
        for opt, grid in lrs.items():
            for lr in grid:
                hit = (opt, lr) == good[kind]
                rows.append({"task": name, "kind": kind, "held_out": held_out, "optimizer": opt, "lr": lr, "at_defaults": False,
                             "value": 0.9 if hit else 0.5, "score": 0.9 if hit else 0.5, "direction": "maximize", "floor": 0.1})
        return rows

    proto = pd.DataFrame([r for i in range(3) for r in task(f"m{i}", "mlp", False)] + [r for i in range(2) for r in task(f"t{i}", "transformer", False)])
    held = pd.DataFrame(task("t-held", "transformer", True))
    ev = evaluate_warm_starts(proto, held, cma_seeds=2)
    row = ev["tasks"][0]
    assert ev["methods"] == list(METHODS) and row["pool"] == 6 and row["reaching"] == 1
    assert row["trials"]["random"] == expected_first_hit(6, 1) == 3.5
    assert row["trials"]["shortlist (same kind)"] == 1.0 and row["trials"]["narrowed space (same kind)"] == 1.0
    assert row["trials"]["shortlist"] > 1.0  # sgd at 0.1 first: wrong for attention
    assert row["same_kind_tasks"] == ["t0", "t1"]  # the held-out task never informs itself
    assert ev["best"] in ("shortlist (same kind)", "narrowed space (same kind)") and ev["geometric_mean"]["random"] == 1.0
