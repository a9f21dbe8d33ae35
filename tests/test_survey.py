"""The optimizer survey (issue 14): the declared protocol, `hposvc survey run --scale ci`
end to end through the CLI (real training, SQLite, MLflow), its report, and the result
that ships with hposvc."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hposvc.cli import main
from hposvc.config import ONE_SHOT_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
SURVEY = ROOT / "studies" / "survey"
# Settings from a developer's shell must not redirect the CLI away from the tmp data dir.
CLEAN_ENV = {"HPOSVC_STORAGE": None, "HPOSVC_DATA_DIR": None, "MLFLOW_TRACKING_URI": None}
CI_LIMIT_S = 180  # the budget for the CI scale on this 2-core machine


def _cli(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(main, list(args), env=CLEAN_ENV, catch_exceptions=False)
    assert result.exit_code == code, f"hposvc {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    return result


# -- the protocol -------------------------------------------------------------------------------


def test_full_protocol_is_balanced_and_in_each_spec_space() -> None:
    from hposvc.recommendation._survey import survey_studies
    from hposvc.space import config_in_space

    todo = survey_studies("full")
    tasks = {c.task.name for c in todo if not c.task.held_out}
    held = {c.task.name for c in todo if c.task.held_out}
    assert len(tasks) >= 8 and len(held) >= 2 and not tasks & held
    assert {"digits", "digits-cnn2d", "mnist1d-cnn", "mnist1d-mlp", "breast-cancer", "diabetes", "moons", "spirals"} <= tasks
    # every kind of model has protocol tasks and a held-out one (issue 19): >= 2 attention tasks
    kinds = {c.task.name: c.task.kind for c in todo}
    assert {kinds[t] for t in held} == {kinds[t] for t in tasks} == {"mlp", "linear", "cnn", "resnet", "transformer"}
    assert sum(kinds[t] == "transformer" for t in tasks) >= 2 and {"linear", "resnet", "cnn"} <= {kinds[t] for t in tasks}
    optimizers = {c.optimizer for c in todo}
    assert optimizers == set(ONE_SHOT_DEFAULTS)
    # every optimizer on every task, the same 8 + 3 trials, each a config of its study's space
    assert len(todo) == len(tasks | held) * len(optimizers)
    for c in todo:
        assert len(c.configs) == 11 and c.spec.n_trials == 11
        assert all(config_in_space(x, c.spec) for x in c.configs)
        sweep, defaults = c.configs[:8], c.configs[8:]
        default_lr = ONE_SHOT_DEFAULTS[c.optimizer]["lr"]
        lrs = [x.lr for x in sweep]
        assert lrs == sorted(lrs) and 2.5 < math.log10(lrs[-1] / lrs[0]) < 3.0  # ~3 decades (centres of 8 bins)
        assert math.isclose(math.log10(lrs[0] * lrs[-1]) / 2, math.log10(default_lr), abs_tol=0.02)  # centred on the default
        assert default_lr not in lrs and {x.seed for x in sweep} == {0}
        assert [(x.lr, x.seed) for x in defaults] == [(default_lr, s) for s in (1, 2, 3)]
        assert all(x.to_dict() | {"seed": 0} == defaults[0].to_dict() | {"seed": 0} for x in defaults)
    # fixed architecture per task: configs of one task differ only in optimizer numbers and seed
    shape = {(c.task.name, x.depth, x.width, x.epochs, x.batch_size, x.norm, x.activation, x.family) for c in todo for x in c.configs}
    assert len(shape) == len(tasks | held)


def test_survey_task_factories_build_offline_tasks() -> None:
    from hposvc.recommendation import _tasks

    assert _tasks.breast_cancer(seed=0).kind == "binary"
    d = _tasks.diabetes(seed=0)
    assert d.kind == "regression" and abs(float(d.y_train.mean())) < 1e-5
    assert _tasks.wine(seed=0).n_outputs == 3
    c = _tasks.classification(seed=0, n_samples=300, n_classes=4)
    assert c.n_outputs == 4 and len(c.x_train) == 180
    m = _tasks.mnist1d_flat(seed=0, num_samples=400)
    assert m.family == "mlp" and m.input_shape == (40,)
    # the held-out cnn and resnet tasks: other draws of mnist1d and of moved, noisy digits
    import torch

    from hposvc.tasks import load_task

    s = _tasks.mnist1d_signals(seed=0, num_samples=400, data_seed=7)
    assert s.family == "cnn1d" and s.input_shape == (1, 40) and len(s.x_train) == 240
    assert not torch.equal(s.x_test, load_task("mnist1d", options={"num_samples": 400}).x_test)
    j = _tasks.digits_jittered(seed=0, shift=1, noise=0.0, data_seed=3)
    assert j.family == "cnn2d" and j.input_shape == (1, 8, 8) and j.n_outputs == 10
    digits = load_task("digits").x_train  # unmoved and noiseless: the built-in digits task, split alike
    assert torch.equal(_tasks.digits_jittered(seed=0, shift=0, noise=0.0).x_train.flatten(1), digits)
    assert not torch.equal(j.x_train.flatten(1), digits)


def test_survey_cli_rejects_bad_input() -> None:
    r = _cli("survey", "run", "--scale", "huge", code=2)
    assert "'huge' is not one of 'ci', 'full'" in r.output
    r = _cli("survey", "run", "--population", "0", code=2)
    assert "the '--population' parameter must be an integer >= 1 or 'auto'. Got 0 instead." in r.stderr
    r = _cli("survey", "report", "--shipped", "--out", "x", code=2)
    assert "'--shipped' option conflicts with '--out'" in r.stderr


def test_report_without_a_survey_run_says_how_to_run_it(tmp_path: Path) -> None:
    r = _cli("survey", "report", "--scale", "ci", "--data-dir", str(tmp_path / "empty"), code=2)
    assert "the storage has no study of the 'ci' survey. Run it first: `hposvc survey run --scale ci`" in r.stderr
    assert r.stdout == ""


# -- the shipped result --------------------------------------------------------------------------


def test_shipped_result_is_the_full_survey_and_results_md_is_generated_from_it() -> None:
    from hposvc.recommendation import load_shipped_survey

    shipped = load_shipped_survey()
    assert shipped.source == "shipped" and shipped.scale == "full" and shipped.budgets == [1, 4, 8]
    assert (SURVEY / "RESULTS.md").read_text(encoding="utf-8") == shipped.markdown()
    assert shipped.summary.startswith(("No detectable difference among", "Use "))
    assert len(shipped.protocol["tasks"]) >= 8 and len(shipped.protocol["held_out"]) >= 2
    assert {o["optimizer"] for o in shipped.optimizers} == set(ONE_SHOT_DEFAULTS)
    assert shipped.run["n_trials"] == 11 * 9 * (len(shipped.protocol["tasks"]) + len(shipped.protocol["held_out"]))
    # a kind per task, decisions per kind, the known answers and the warm-start table (issue 19)
    assert {t["kind"] for t in shipped.tasks} == {"mlp", "linear", "cnn", "resnet", "transformer"}
    assert set(shipped.kinds) == {"mlp", "linear", "cnn", "resnet", "transformer"}
    assert shipped.kinds["resnet"]["status"] == "too few tasks" and shipped.kinds["transformer"]["status"] == "decided"
    assert [a["outcome"] in ("reproduced", "not reproduced") for a in shipped.known_answers] == [True] * 3
    ev = shipped.warm_start_eval
    assert {t["task"] for t in ev["tasks"]} == set(shipped.protocol["held_out"]) and ev["best"] in ev["methods"]
    for o in shipped.optimizers:
        for k in shipped.budgets:
            low, high = o[f"ci@{k}"]
            assert low <= o[f"score@{k}"] + 1e-9 and o[f"score@{k}"] <= high + 1e-9


def test_shipped_result_prints_without_storage_and_warm_starts_a_fresh_install(tmp_path: Path) -> None:
    from hposvc.recommendation import load_shipped_survey, warm_start_configs
    from hposvc.space import config_in_space
    from hposvc.spec import load_spec

    r = _cli("survey", "report", "--shipped")
    assert load_shipped_survey().summary in r.stdout.replace("\n", " ") or load_shipped_survey().summary[:60] in r.stdout
    data = json.loads(_cli("survey", "report", "--shipped", "--json").stdout)
    assert data["summary"] == load_shipped_survey().summary and data["schema"] == 2

    # An empty storage (a fresh install): --warm-start comes from the shipped survey.
    spec = load_spec(SURVEY / "held-out" / "wine.toml")
    configs = warm_start_configs(spec, storage=f"sqlite:///{tmp_path / 'fresh.db'}")
    assert 1 <= len(configs) <= 3 and all(config_in_space(c, spec) for c in configs)
    shipped = load_shipped_survey()
    geo = shipped.warm_start_eval["geometric_mean"]
    # the list of wine's kind (an MLP) when the survey measured it ahead on its held-out tasks
    expected = shipped.warm_start_by_kind["mlp"] if geo["shortlist (same kind)"] > geo["shortlist"] else shipped.warm_start
    assert configs[0].optimizer == expected[0]["optimizer"]


# -- the CI scale, end to end -----------------------------------------------------------------


@pytest.mark.slow
def test_ci_survey_runs_reports_stores_and_resumes(tmp_path: Path) -> None:
    import mlflow

    from hposvc.recommendation import SurveyResult, collect_trials, recommendation_history

    data = tmp_path / "data"
    t0 = time.perf_counter()
    run = json.loads(_cli("survey", "run", "--scale", "ci", "--data-dir", str(data), "--quiet", "--json").stdout)
    elapsed = time.perf_counter() - t0
    assert run["n_trials"] == run["n_done"] == run["ran"] == 5 * 4 * 7  # 5 tasks x 4 optimizers x (4 + 3)
    assert run["studies"] == 20 and run["population"] == 7
    assert elapsed < CI_LIMIT_S, f"the CI scale took {elapsed:.0f} s"

    # Held-out studies stay out of plain recommendations.
    url = f"sqlite:///{data / 'hposvc.db'}"
    assert not any("wine" in s for s in collect_trials(url)["study"].unique())
    assert any("wine" in s for s in collect_trials(url, held_out=True)["study"].unique())

    out = tmp_path / "out"
    report = json.loads(_cli("survey", "report", "--scale", "ci", "--data-dir", str(data), "--out", str(out), "--bootstrap", "200", "--json").stdout)
    result = SurveyResult.from_dict(report, source="test")
    assert result.budgets == [1, 4] and result.headline_budget == 1
    assert result.protocol["tasks"] == ["breast-cancer", "clf-small", "imbalance", "moons"] and result.protocol["held_out"] == ["wine"]
    assert {t["name"]: t["kind"] for t in result.tasks}["imbalance"] == "linear"
    assert result.kinds["linear"]["status"] == "too few tasks" and result.kinds["mlp"]["tasks"] == ["breast-cancer", "clf-small", "moons"]
    assert [d["budget"] for d in result.decisions] == [1, 4]
    for d in result.decisions:
        assert (d["best"] is None) == bool(d["tied"])
        assert d["summary"].startswith("No detectable difference among" if d["best"] is None else f"Use {d['best']} by default")
    assert result.summary == result.decisions[0]["summary"]
    rows = {o["optimizer"]: o for o in result.optimizers}
    assert set(rows) == {"sgd", "momentum", "adam", "adamw"}
    for o in rows.values():
        assert o["status"] == "ok" and o["ci@4"][0] <= o["score@4"] <= o["ci@4"][1] + 1e-9
        assert 0 <= o["held_out@1"] <= 1 and o["default_score"] is not None
    assert {t["name"] for t in result.tasks} == {"breast-cancer", "clf-small", "imbalance", "moons", "wine"}
    assert [c["default_runs"] for c in result.per_task] == [3] * 16  # 4 tasks x 4 optimizers, 3 seeds each
    dvt = result.defaults_vs_tuned
    assert dvt["trials"] == 4 and 0 <= dvt["best_default_of_all"] <= 1 and set(dvt["tuned"]) == set(rows)

    # The files, the SQL row and the MLflow run with both files.
    md = (out / "RESULTS.md").read_text(encoding="utf-8")
    assert result.summary in md and "hposvc survey run --scale ci" in md
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["summary"] == result.summary
    history = recommendation_history(url)
    assert history["id"].tolist() == [result.recommendation_id] and history["summary"].tolist() == [result.summary]
    client = mlflow.MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    assert {a.path for a in client.list_artifacts(result.mlflow_run_id, "survey")} == {"survey/RESULTS.md", "survey/results.json"}

    # Running it again resumes: nothing is trained twice.
    again = json.loads(_cli("survey", "run", "--scale", "ci", "--data-dir", str(data), "--quiet", "--json").stdout)
    assert again["ran"] == 0 and again["n_done"] == run["n_done"]


def test_recommend_reads_the_shipped_survey_with_no_studies(tmp_path: Path) -> None:
    # A fresh install has no studies: `hposvc recommend --shipped` prints what ships.
    import json

    from hposvc.recommendation import load_shipped_survey

    r = _cli("recommend", "--shipped", "--json", "--data-dir", str(tmp_path / "empty"))
    shipped = json.loads(r.stdout)
    assert shipped == json.loads(json.dumps(load_shipped_survey().to_dict()))
    assert not (tmp_path / "empty").exists()  # nothing written
    r = _cli("recommend", "--shipped", "--all", code=2)
    assert "'--shipped' option conflicts with '--study', '--task', '--all'" in r.stderr


def test_recommend_shipped_kind_prints_that_kinds_decisions() -> None:
    from hposvc.recommendation import load_shipped_survey

    shipped = load_shipped_survey()
    data = json.loads(_cli("recommend", "--shipped", "--kind", "transformer", "--json").stdout)
    assert data == json.loads(json.dumps(shipped.to_dict()["kinds"]["transformer"] | {"kind": "transformer"}))
    assert data["tasks"] == ["char-lm", "recall"] and [d["budget"] for d in data["decisions"]] == shipped.budgets
    for d in data["decisions"]:  # the same decision objects as the overall ones, on this kind only
        assert {"best", "tied", "top", "runner_up", "difference", "low", "high", "friedman_p", "n_tasks", "status"} <= set(d)
        assert d["n_tasks"] == 2 and d["summary"].startswith(("On transformer tasks: ", "Too few"))
    text = " ".join(_cli("recommend", "--shipped", "--kind", "transformer").stdout.split())
    assert "optimizers on transformer tasks (char-lm, recall; shipped)" in text and " ".join(data["summary"].split())[:50] in text
    r = _cli("recommend", "--shipped", "--kind", "rnn", code=2)
    assert "the 'kind' parameter must be one of 'cnn', 'linear', 'mlp', 'resnet', 'transformer'. Got 'rnn' instead." in r.stderr
