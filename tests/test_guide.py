"""The optimisation guide, tested: probes, the shipped guide studies at their CI budget,
and the report built from their stored trials.

The guide studies run once per test session (:func:`guide_outputs`, shared with
tests/test_report_browser.py) into a temporary data directory, or into
``$HPOSVC_TEST_ARTIFACTS/guide`` when that is set, so CI can keep the report and its
screenshot as artifacts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sqlite3
import time
import tomllib
from dataclasses import dataclass, replace
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import hposvc
from hposvc.cli import main
from hposvc.config import TrialConfig
from hposvc.nn import build_model
from hposvc.probes import UNIT_SYMMETRY_ATTR, activation_std_per_layer, unit_symmetry
from hposvc.report import CLAIMS, GUIDE_STUDIES, VERDICTS, Report, build_report, guide_spec_paths
from hposvc.report.claims import claim_for_study
from hposvc.report.data import StudyData
from hposvc.report.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from hposvc.tasks import load_task
from hposvc.train import seed_everything, train

REPO = Path(__file__).resolve().parents[1]
GUIDE_DIR = REPO / "studies" / "guide"
ARTIFACTS_ENV = "HPOSVC_TEST_ARTIFACTS"  # CI: keep the guide's data and report here
# The guide's CI budget must stay small: the whole set runs in CI on 2 cores.
CI_BUDGET_SECONDS = 240


# --- the guide, run once per session --------------------------------------------------------------


@dataclass(frozen=True)
class GuideRun:
    root: Path  # data directory: study DB, MLflow store, the report folder
    storage: str
    tracking_uri: str
    seconds: dict[str, float]  # study -> wall time of its run
    report: Report


_SHARED: dict[str, GuideRun] = {}


def guide_outputs(tmp_path_factory: pytest.TempPathFactory) -> GuideRun:
    """Run every guide study at its CI budget and build the report, once per process."""
    if "run" in _SHARED:
        return _SHARED["run"]
    artifacts = os.environ.get(ARTIFACTS_ENV)
    if artifacts:
        root = Path(artifacts) / "guide"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    else:
        root = tmp_path_factory.mktemp("guide")
    storage = f"sqlite:///{root / 'hposvc.db'}"
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    seconds = {}
    for path in guide_spec_paths(scale="ci", guide_dir=GUIDE_DIR):
        t0 = time.perf_counter()
        result = hposvc.run_study(path, storage=storage, tracking_uri=tracking, data_dir=root, device="cpu")
        seconds[result.study_name] = time.perf_counter() - t0
    report = build_report(GUIDE_STUDIES, storage=storage, out_dir=root / "report", tracking_uri=tracking, data_dir=root)
    _SHARED["run"] = GuideRun(root, storage, tracking, seconds, report)
    print(f"\nguide studies at CI budget: {sum(seconds.values()):.0f}s " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return _SHARED["run"]


# Runs every guide study: the tests that take it are marked slow.
@pytest.fixture(scope="session")
def guide(tmp_path_factory: pytest.TempPathFactory) -> GuideRun:
    return guide_outputs(tmp_path_factory)


def _spec(path: Path) -> dict:
    return tomllib.loads(path.read_text())


# --- probes -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_task("digits", seed=0)


def _model(task, **kw):
    config = TrialConfig(**kw)
    seed_everything(config.seed)
    return build_model(task, config)


def test_activation_std_one_value_per_hidden_block_and_model_untouched(digits):
    model = _model(digits, depth=3, width=16, norm="batch")
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stds = activation_std_per_layer(model, digits.x_val[:128])
    assert len(stds) == 3 and all(s > 0 for s in stds)
    # a copy ran in training mode: the model's mode and running statistics are as they were
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # batch norm (training mode) normalises each block: ReLU of a unit normal has std ~0.58
    assert all(0.45 < s < 0.7 for s in stds)
    assert activation_std_per_layer(_model(digits, depth=0), digits.x_val[:8]) == []


def test_activation_std_tells_he_from_xavier_in_a_deep_relu_mlp(digits):
    x = digits.x_val[:256]
    he = activation_std_per_layer(_model(digits, depth=30, width=64, init="he_normal"), x)
    xavier = activation_std_per_layer(_model(digits, depth=30, width=64, init="xavier_normal"), x)
    assert len(he) == len(xavier) == 30
    assert 0.1 < he[-1] / he[0] < 10  # He keeps the scale
    assert xavier[-1] / xavier[0] < 1e-3  # Xavier halves the variance per ReLU layer: 2^-14.5 in std


def test_activation_std_is_identical_across_seeds_only_for_zero_init(digits):
    x = digits.x_val[:256]
    zero = [activation_std_per_layer(_model(digits, depth=6, width=64, init="zero", seed=s), x) for s in (0, 1)]
    he = [activation_std_per_layer(_model(digits, depth=6, width=64, init="he_normal", seed=s), x) for s in (0, 1)]
    assert zero[0] == zero[1]
    assert he[0] != he[1]


def test_activation_std_on_the_cnn():
    task = load_task("mnist1d", seed=0)
    stds = activation_std_per_layer(_model(task, depth=3, width=8, norm="group", norm_groups=2), task.x_val[:64])
    assert len(stds) == 3 and all(math.isfinite(s) and s > 0 for s in stds)


def test_unit_symmetry_zero_for_identical_units_and_large_for_random_init(digits):
    assert unit_symmetry(_model(digits, depth=2, width=16, init="zeros")) == 0.0
    assert unit_symmetry(_model(digits, depth=2, width=16, init="he_normal")) > 0.5
    assert math.isnan(unit_symmetry(_model(digits, depth=0)))  # a linear model has no hidden units
    # identical but non-zero units (one constant row repeated) count as identical
    model = _model(digits, depth=1, width=8)
    with torch.no_grad():
        model.hidden[0].linear.weight.copy_(torch.linspace(-1, 1, 64).expand(8, 64))
        model.hidden[0].linear.bias.fill_(0.3)
    assert unit_symmetry(model) < 1e-6
    with torch.no_grad():
        model.hidden[0].linear.bias[3] = 0.0  # one unit differs (in its bias alone)
    assert unit_symmetry(model) > 1e-3
    cnn = load_task("mnist1d", seed=0)
    assert unit_symmetry(_model(cnn, depth=2, width=8, init="zeros")) == 0.0
    assert unit_symmetry(_model(cnn, depth=2, width=8, init="he_normal")) > 0.5


def test_zero_init_units_stay_identical_through_training(digits):
    # symmetry never breaks: with sigmoid the weights do move, but every unit the same way
    config = TrialConfig(init="zeros", activation="sigmoid", depth=2, width=16, epochs=2)
    result = train(config, digits, device="cpu", keep_model=True)
    assert result.model.hidden[1].linear.weight.abs().max() > 1e-4  # it trained
    assert unit_symmetry(result.model) < 1e-5
    random_init = train(config.replace(init="he_normal"), digits, device="cpu", keep_model=True)
    assert unit_symmetry(random_init.model) > 0.5


# --- the guide's specs -------------------------------------------------------------------------------


def test_every_claim_has_a_ci_spec_and_a_full_spec_of_the_same_study():
    ci = {p.name for p in GUIDE_DIR.glob("*.toml")}
    full = {p.name for p in (GUIDE_DIR / "full").glob("*.toml")}
    expected = {spec for claim in CLAIMS for spec in claim.spec_files}
    assert ci == full == expected
    assert {c.number.rstrip("ab") for c in CLAIMS} == {str(i) for i in range(1, 9)}
    for name in sorted(ci):
        small, big = _spec(GUIDE_DIR / name), _spec(GUIDE_DIR / "full" / name)
        assert small["study"]["name"] == big["study"]["name"] == "guide-" + name.removesuffix(".toml")
        assert small["study"]["task"] == big["study"]["task"]
        assert small["study"]["sampler"] == big["study"]["sampler"] and small["study"]["sampler"] in ("grid", "random")
        assert big["study"]["n_trials"] >= small["study"]["n_trials"]
        assert claim_for_study(small["study"]["name"]) is not None
        # each spec states its claim in a comment
        for path in (GUIDE_DIR / name, GUIDE_DIR / "full" / name):
            assert re.search(r"^# Claims?:", path.read_text(), re.M), path
        hposvc.load_spec(GUIDE_DIR / name)
        hposvc.load_spec(GUIDE_DIR / "full" / name)


@pytest.mark.slow
def test_guide_studies_ran_within_the_ci_budget(guide: GuideRun):
    studies = hposvc.studies(storage=guide.storage).set_index("name")
    assert set(GUIDE_STUDIES) <= set(studies.index)
    for name in GUIDE_STUDIES:
        row = studies.loc[name]
        assert row.complete + row.pruned == row.n_trials, name
        assert row.failed == 0, name
    assert sum(guide.seconds.values()) < CI_BUDGET_SECONDS * 1.5, guide.seconds  # slack for a busy CI box


# --- the report ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_structure(guide: GuideRun):
    report = guide.report
    html = report.index.read_text()
    data = json.loads((report.out_dir / "report.json").read_text())
    assert [s.claim.number for s in report.sections] == [c.number for c in CLAIMS]
    assert data["verdicts"] == report.verdicts and set(report.verdicts.values()) <= set(VERDICTS)
    assert data["mlflow_runs"] == dict(report.mlflow_runs) and all(report.mlflow_runs.values())
    referenced = set(re.findall(r'<img src="([^"]+)"', html))
    written = {p.name for p in report.out_dir.glob("*.png")} - {"screenshot.png"}
    assert referenced == written and len(written) >= len(CLAIMS)
    for name in written:
        assert (report.out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for section in report.sections:
        claim = section.claim
        assert f'id="claim-{claim.key}"' in html
        assert escape(claim.text) in html
        assert section.figures and not section.table.empty, claim.key
        assert section.verdict in VERDICTS and section.verdicts
        assert f'data-verdict="{section.verdict}"' in html
        for v in section.verdicts:
            assert v.verdict in VERDICTS and v.statistic and v.rule, v
            assert escape(v.hypothesis) in html
        # every study the claim needs is there, with all its trials
        assert set(section.studies) == set(claim.studies)


@pytest.mark.slow
def test_robust_claims_come_out_supported(guide: GuideRun):
    r = guide.report
    # zero init: hidden units identical after training, accuracy at chance
    assert r.verdict("zero-init-identical-units").verdict == SUPPORTED, r.verdict("zero-init-identical-units")
    assert r.verdict("zero-init-at-chance").verdict == SUPPORTED, r.verdict("zero-init-at-chance")
    # a 30-layer plain ReLU MLP: He trains, Xavier's signal vanishes
    assert r.verdict("relu-he-beats-xavier").verdict == SUPPORTED, r.verdict("relu-he-beats-xavier")
    assert r.verdict("relu-xavier-signal-shrinks").verdict == SUPPORTED, r.verdict("relu-xavier-signal-shrinks")


@pytest.mark.slow
def test_every_other_hypothesis_has_a_verdict_with_its_statistic(guide: GuideRun):
    for section in guide.report.sections:
        for v in section.verdicts:
            assert v.verdict in VERDICTS
            assert v.estimate is not None and math.isfinite(v.estimate), v  # computed, not missing
            if "bootstrap" in v.statistic:
                assert v.ci_low is not None and v.ci_high is not None and v.ci_low <= v.ci_high, v
            else:
                assert "exact check" in v.statistic, v


@pytest.mark.slow
def test_report_is_logged_to_each_studys_mlflow_parent_run(guide: GuideRun):
    from mlflow import MlflowClient

    client = MlflowClient(guide.tracking_uri)
    files = {p.name for p in guide.report.out_dir.iterdir() if p.is_file()}
    for section in guide.report.sections:
        for study in section.studies:
            exp = client.get_experiment_by_name(f"hposvc/{study}")
            (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'study'")
            assert guide.report.mlflow_runs[study] == run.info.run_id
            logged = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "report")}
            assert {"index.html", "report.json"} <= logged and files - {"screenshot.png"} <= logged, study
            assert run.data.tags["hposvc.report.verdict"] == section.verdict


# --- verdicts follow the stored trials -------------------------------------------------------------


def _copy_db(guide: GuideRun, tmp_path: Path) -> tuple[str, sqlite3.Connection]:
    path = tmp_path / "copy.db"
    src = sqlite3.connect(guide.root / "hposvc.db")
    dst = sqlite3.connect(path)
    src.backup(dst)  # a consistent copy even with SQLite's WAL
    src.close()
    return f"sqlite:///{path}", dst


def _trial_ids(con: sqlite3.Connection, study: str, **config) -> list[int]:
    rows = con.execute(
        "SELECT t.trial_id, a.value_json FROM trials t JOIN studies s ON s.study_id = t.study_id "
        "JOIN trial_user_attributes a ON a.trial_id = t.trial_id WHERE s.study_name = ? AND a.key = 'hposvc.config'",
        (study,),
    ).fetchall()
    return [tid for tid, cfg in rows if all(json.loads(cfg)[k] == v for k, v in config.items())]


@pytest.mark.slow
def test_changing_the_stored_trials_changes_the_verdicts(guide: GuideRun, tmp_path: Path):
    url, con = _copy_db(guide, tmp_path)
    # 1) Xavier's ReLU runs now "reach" 0.95 and He's stay at 0.1
    for init, value in (("xavier_normal", 0.95), ("he_normal", 0.1)):
        ids = _trial_ids(con, "guide-init-deep", activation="relu", init=init)
        assert ids
        con.executemany("UPDATE trial_values SET value = ? WHERE trial_id = ?", [(value, i) for i in ids])
    # 2) the zero-init MLP's hidden units are now different from each other
    ids = _trial_ids(con, "guide-zero-init", init="zeros", depth=2)
    assert ids
    con.executemany(
        "UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = ?",
        [(json.dumps(0.7), i, UNIT_SYMMETRY_ATTR) for i in ids],
    )
    con.commit()
    con.close()
    changed = build_report(["guide-init-deep", "guide-zero-init"], storage=url, out_dir=tmp_path / "report", log_to_mlflow=False)
    assert changed.verdict("relu-he-beats-xavier").verdict == NOT_SUPPORTED
    assert changed.verdict("relu-he-beats-xavier").estimate == pytest.approx(-0.85)
    assert changed.verdict("zero-init-identical-units").verdict == NOT_SUPPORTED
    assert changed.verdicts["init-deep"] == changed.verdicts["zero-init"] == NOT_SUPPORTED
    # the untouched hypotheses say what they said before
    for key in ("relu-xavier-signal-shrinks", "zero-init-at-chance", "tanh-xavier-beats-he"):
        assert changed.verdict(key) == guide.report.verdict(key)


def _frame(rows: list[dict]) -> pd.DataFrame:
    f = pd.DataFrame(rows)
    f["state"], f["value"], f["reason"] = "COMPLETE", f["score"], None
    f["curve"] = [[s] for s in f.score]
    f["activation_std"], f["unit_symmetry"] = None, math.nan
    return f


def test_verdicts_from_constructed_trials():
    # claim 4 on made-up numbers: batch norm loses 0.2 at batch 2, group/layer/rms norm nothing
    rng = np.random.default_rng(0)
    rows = [
        {"norm": norm, "batch_size": bs, "seed": seed, "score": 0.9 - (0.2 if norm == "batch" and bs == 2 else 0.0) + rng.normal(0, 0.005)}
        for norm in ("batch", "group", "layer", "rms") for bs in (2, 64) for seed in range(5)
    ]  # fmt: skip
    data = StudyData("guide-norm-batch", "val_accuracy", "maximize", "mnist1d", "mnist1d", 0.1, _frame(rows), {})
    claim = claim_for_study("guide-norm-batch")
    result = claim.evaluate({"guide-norm-batch": data})
    assert result.verdict == SUPPORTED
    assert [v.estimate for v in result.verdicts] == [pytest.approx(0.2, abs=0.02)] * 3
    assert [v.key for v in result.verdicts] == ["bn-drop-vs-group", "bn-drop-vs-layer", "bn-drop-vs-rms"]
    # the same with no effect: the intervals straddle 0
    flat = [dict(r, score=0.9 + rng.normal(0, 0.005)) for r in rows]
    result = claim.evaluate({"guide-norm-batch": replace(data, trials=_frame(flat))})
    assert result.verdict == INCONCLUSIVE
    # and with two seeds only, nothing can be concluded however large the effect
    two = [r for r in rows if r["seed"] < 2]
    result = claim.evaluate({"guide-norm-batch": replace(data, trials=_frame(two))})
    assert result.verdict == INCONCLUSIVE and "replicate" in result.verdicts[0].note


# --- CLI -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_report_one_study_and_a_study_without_a_claim(guide: GuideRun, tmp_path: Path):
    other = hposvc.run_study(
        {"study": {"name": "tiny", "task": "moons", "n_trials": 2, "sampler": "random", "pruner": "none"}, "train": {"epochs": 2}},
        storage=guide.storage, tracking_uri=guide.tracking_uri, data_dir=guide.root, device="cpu",
    )  # fmt: skip
    assert other.n_done == 2
    out = tmp_path / "out"
    args = ["report", "guide-zero", "tiny", "--out", str(out), "--storage", guide.storage, "--tracking-uri", guide.tracking_uri, "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verdicts"] == {"zero": guide.report.verdicts["zero"]}
    assert [s["studies"] for s in data["sections"]] == [["guide-zero"], ["tiny"]]
    tiny = data["sections"][1]
    assert tiny["claim"] is None and tiny["verdict"] is None and len(tiny["table"]) == 2
    assert {f["file"] for f in tiny["figures"]} == {"study-tiny-curves.png", "study-tiny-history.png"}
    assert (out / "index.html").is_file() and (out / "study-tiny-history.png").is_file()
    assert set(data["mlflow_runs"]) == {"guide-zero", "tiny"} and all(data["mlflow_runs"].values())


@pytest.mark.slow
def test_cli_report_bad_input_exits_2(guide: GuideRun, tmp_path: Path):
    runner = CliRunner()
    out = str(tmp_path / "out")
    cases = [
        (["report", "--out", out], "give study names, or --guide"),
        (["report", "guide-zero", "--guide", "--out", out], "conflict"),
        (["report", "guide-zero", "--run", "--out", out], "need --guide"),
        (["report", "--guide", "--scale", "full", "--out", out], "needs --run"),
        (["report", "no-such-study", "--out", out, "--storage", guide.storage], "'no-such-study'"),
    ]
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    assert not (tmp_path / "out" / "index.html").exists()


def test_missing_guide_study_names_the_spec_to_run(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    hposvc.run_study(
        {"study": {"name": "tiny", "task": "moons", "n_trials": 1, "sampler": "random", "pruner": "none"}, "train": {"epochs": 1}},
        storage=url, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", data_dir=tmp_path, device="cpu",
    )  # fmt: skip
    with pytest.raises(hposvc.InvalidInputError, match=r"studies/guide/zero-init.toml"):
        build_report(["guide-zero-init"], storage=url, out_dir=tmp_path / "out", log_to_mlflow=False)
