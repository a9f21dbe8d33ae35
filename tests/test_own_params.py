"""The user's own dimensions ([space.params]) reach a command, a trainer and a model
factory, and what each received is what Optuna, MLflow, trials() and best_config() say.

Real studies on real SQLite and MLflow stores; the command is a real subprocess.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

import hposvc
from hposvc.cli import main
from hposvc.errors import InvalidInputError, SpecError
from hposvc.spec import parse_spec
from hposvc.tracking import experiment_name

PARAMS = """
[space.params]
dropout = { low = 0.0, high = 0.5 }
clip = { low = 0.05, high = 1.0, log = true }
n_layer = { low = 1, high = 3 }
hidden = [8, 16]
tied = [true, false]
tag = "fixed"
"""

HEAD = """
[study]
name = "{name}"
task = "moons"
metric = "val_loss"
n_trials = 3
sampler = "random"
pruner = "none"
seed = 3
{runner}
[task]
n_samples = 100
[train]
epochs = 1
"""

COMMAND = '''\
import argparse, json, os, sys
parser = argparse.ArgumentParser()
parser.add_argument("--dropout", type=float)
parser.add_argument("--clip", type=float)
parser.add_argument("--n-layer", type=int)
parser.add_argument("--hidden", type=int)
parser.add_argument("--tied", action="store_true")
parser.add_argument("--tag")
args = parser.parse_args()
got = {"dropout": args.dropout, "clip": args.clip, "n_layer": args.n_layer, "hidden": args.hidden, "tied": args.tied, "tag": args.tag}
assert json.loads(os.environ["HPOSVC_CONFIG"])["params"] == got, (os.environ["HPOSVC_CONFIG"], got)
with open(os.path.join("received", os.environ["HPOSVC_TRIAL_NUMBER"] + ".json"), "w") as f:
    json.dump(got, f)
print('hposvc: {"epoch": 1, "val_loss": %r}' % (args.dropout + args.n_layer))
'''

CODE = '''\
import json, os
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def train(ctx):
    assert ctx.task is None, "the trainer's spec names no task"
    with open(os.path.join(HERE, "received", f"{ctx.trial_number}.json"), "w") as f:
        json.dump(ctx.params, f)
    loss = ctx.params["dropout"] + ctx.params["n_layer"]
    ctx.report(1, val_loss=loss)
    return {"val_loss": loss}


def net(task, config, *, dropout, clip, n_layer, hidden, tied, tag="?"):
    got = {"dropout": dropout, "clip": clip, "n_layer": n_layer, "hidden": hidden, "tied": tied, "tag": tag}
    with open(os.path.join(HERE, "received", "factory.jsonl"), "a") as f:
        f.write(json.dumps(got) + "\\n")
    layers = [nn.Linear(task.input_shape[0], hidden), nn.ReLU(), nn.Dropout(dropout)]
    for _ in range(n_layer - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, task.n_outputs))


def net_without_clip(task, config, *, dropout, n_layer, hidden, tied, tag):
    return net(task, config, dropout=dropout, clip=0.0, n_layer=n_layer, hidden=hidden, tied=tied, tag=tag)
'''

RUNNERS = {
    "command": f'command = ["{sys.executable}", "train.py", "--dropout={{dropout}}", "--clip={{clip}}", "--n-layer={{n_layer}}", '
    '"--hidden={hidden}", "{tied?--tied}", "--tag={tag}"]',
    "trainer": 'trainer = "mycode:train"',
    "model": 'model = "mycode:net"',
}


def _write(tmp_path: Path, name: str, runner: str) -> Path:
    (tmp_path / "train.py").write_text(COMMAND)
    # a module name of its own: one imported by an earlier test would still be in sys.modules
    (tmp_path / f"code_{name}.py").write_text(CODE)
    (tmp_path / "received").mkdir(exist_ok=True)
    spec = tmp_path / f"{name}.toml"
    text = HEAD.format(name=name, runner=runner.replace("mycode:", f"code_{name}:")) + PARAMS
    if "trainer" in runner:  # it loads nothing: no task (ctx.task is None)
        text = text.replace('task = "moons"\n', "").replace("[task]\nn_samples = 100\n", "")
    spec.write_text(text)
    return spec


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir (SQLite and MLflow stores) for the module's studies: the stores are
    created and migrated once, not per test; each study has a name of its own."""
    return tmp_path_factory.mktemp("data")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["command", "trainer", "model"])
def test_user_dimensions_reach_the_code_and_every_record(tmp_path: Path, shared_data: Path, how: str) -> None:
    spec = _write(tmp_path, how, RUNNERS[how])
    data = shared_data
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet"])
    assert result.exit_code == 0, result.output
    storage, uri = f"sqlite:///{data / 'hposvc.db'}", f"sqlite:///{data / 'mlflow.db'}"
    trials = [t for t in optuna.load_study(study_name=how, storage=storage).trials if t.state.name == "COMPLETE"]
    assert len(trials) == 3
    if how == "model":
        lines = [json.loads(line) for line in (tmp_path / "received" / "factory.jsonl").read_text().splitlines()]
    table = hposvc.trials(how, storage=storage).set_index("number")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name(how))
    runs = {int(r.data.tags["hposvc.trial_number"]): r for r in client.search_runs([exp.experiment_id], "tags.`hposvc.role` = 'trial'")}
    for t in trials:
        if how == "model":
            stored = {**t.params, "tag": "fixed"}
            assert stored in lines  # the factory was called with this trial's values
            got = stored
        else:
            got = json.loads((tmp_path / "received" / f"{t.number}.json").read_text())
        # 1) Optuna: plain params of the same names (the fixed one is not a param)
        assert t.params == {k: v for k, v in got.items() if k != "tag"}
        assert type(t.params["n_layer"]) is int and type(t.params["hidden"]) is int and type(t.params["tied"]) is bool
        # 2) the trial's config, trials() columns and MLflow params
        assert t.user_attrs["hposvc.config"]["params"] == got
        for name, value in got.items():
            assert table.loc[t.number, name] == value
            assert runs[t.number].data.params[name] == str(value)
    # 3) best_config() and `hposvc best`
    best = hposvc.best_config(how, storage=storage)
    best_trial = next(t for t in trials if t.number == best.trial_number)
    assert dict(best.config.params) == {**best_trial.params, "tag": "fixed"}
    shown = CliRunner().invoke(main, ["best", how, "--data-dir", str(data), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["config"]["params"] == dict(best.config.params)
    exported = CliRunner().invoke(main, ["study", "export", how, "--format", "json", "--data-dir", str(data)])
    assert {r["number"]: r["dropout"] for r in json.loads(exported.output)} == {t.number: t.params["dropout"] for t in trials}


def test_a_factory_that_does_not_take_a_dimension_is_refused_at_validate(tmp_path: Path) -> None:
    spec = _write(tmp_path, "m", 'model = "mycode:net_without_clip"')
    result = CliRunner().invoke(main, ["study", "validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert "'space.params.clip'" in result.output and "code_m:net_without_clip" in result.output
    # a built-in model has no way to take them at all
    spec.write_text(spec.read_text().replace('model = "code_m:net_without_clip"', ""))
    result = CliRunner().invoke(main, ["study", "validate", str(spec)])
    assert result.exit_code == 2 and "'space.params.clip'" in result.output and "trainer or command" in result.output


def test_a_flag_placeholder_needs_a_boolean(tmp_path: Path) -> None:
    spec = _write(tmp_path, "c", RUNNERS["command"].replace("{tied?--tied}", "{hidden?--hidden}"))
    result = CliRunner().invoke(main, ["study", "validate", str(spec)])
    assert result.exit_code == 2 and "{hidden?...}" in result.output and "[8, 16]" in result.output, result.output


@pytest.mark.parametrize(
    ("params", "key", "says"),
    [
        ({"lr": [0.1, 0.2]}, "space.params", "set it as [space] lr"),
        ({"task": 1}, "space.params", "what hposvc passes to your code"),
        ({"my-flag": True}, "space.params", "letters, digits and '_'"),
        ({"x": []}, "space.params.x", "non-empty list"),
        ({"x": {"low": 1, "high": 1}}, "space.params.x.high", "empty range"),
        ({"x": {"low": 0, "high": 1, "log": True}}, "space.params.x.low", "log range cannot include 0"),
        ({"x": [1, 1]}, "space.params.x", "appears twice"),
        ({"x": {"low": 1, "high": 4}, "y": {"low": 0.0, "high": 1.0}}, "space.params.y", "for sampler 'grid'"),
    ],
)
def test_bad_user_dimensions_name_key_and_fix(params: dict, key: str, says: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({"study": {"name": "s", "task": "moons", "sampler": "grid"}, "space": {"params": params}}, source="p.toml")
    message = str(e.value)
    assert message.startswith(f"p.toml: the '{key}' parameter"), message
    assert says in message, message


def test_ints_stay_ints_and_the_spec_round_trips() -> None:
    spec = parse_spec({"study": {"name": "s", "task": "moons"}, "space": {"params": {
        "a": {"low": 1, "high": 4}, "b": {"low": 1, "high": 4.0}, "c": [1, 2], "d": [True, False], "e": 3, "f": "x"}}})
    assert spec.params["a"].integer and not spec.params["b"].integer and spec.params["b"].low == 1.0
    assert sorted(spec.search_space()) == ["a", "b", "c", "d"]
    assert parse_spec(spec.to_dict()) == spec and "params" in spec.to_dict()["space"]
    assert parse_spec({"study": {"name": "s", "task": "moons"}}).spec_hash != spec.spec_hash


TASK_FACTORY = '''
from hposvc.tasks import load_task


def noisy_moons(seed, *, noise, n_samples=60):
    return load_task("moons", seed=seed, options={"noise": noise, "n_samples": n_samples})


def net(task, config, *, width_factor):
    from torch import nn
    return nn.Sequential(nn.Linear(2, 4 * width_factor), nn.ReLU(), nn.Linear(4 * width_factor, 2))
'''


def test_a_task_factory_gets_the_dimensions_it_names_per_trial(tmp_path: Path) -> None:
    from hposvc.plugins import check_spec_code, load_spec_task, trial_task

    (tmp_path / "taskmod.py").write_text(TASK_FACTORY)
    data = {"study": {"name": "t", "task": "taskmod:noisy_moons", "model": "taskmod:net", "code_dir": str(tmp_path)},
            "space": {"params": {"noise": [0.05, 0.3], "width_factor": 2}}}
    spec = parse_spec(data)
    check_spec_code(spec)  # noise reaches the task factory, width_factor the model factory
    first = load_spec_task(spec)  # each dimension's first value
    assert first is trial_task(spec, first, {"noise": 0.05, "width_factor": 2})  # the same data: no reload
    other = trial_task(spec, first, {"noise": 0.3, "width_factor": 2})
    assert other is not first and not (other.x_train == first.x_train).all()
    data["space"]["params"]["depth_factor"] = 1
    with pytest.raises(InvalidInputError) as e:
        check_spec_code(parse_spec(data, source="t.toml"))
    assert "'space.params.depth_factor'" in str(e.value) and "taskmod:net nor the task factory taskmod:noisy_moons" in str(e.value)
