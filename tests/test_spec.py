"""Study specs: the issue's spec parses as written, bad specs say file/key/value/allowed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from contract_spec import CONTRACT_SPEC
from hposvc.config import OPTIMIZERS
from hposvc.errors import InvalidInputError, SpecError
from hposvc.spec import DEFAULT_RANGES, Dim, StudySpec, default_lr_dim, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]

ISSUE_SPEC = CONTRACT_SPEC  # the study-service issue's spec, verbatim

HEAD = '[study]\nname = "s"\ntask = "digits"\n'


def write(tmp_path: Path, text: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_issue_spec_parses_as_written(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, ISSUE_SPEC, "digits-quick.toml"))
    assert (spec.name, spec.task, spec.metric, spec.direction) == ("digits-quick", "digits", "val_accuracy", "maximize")
    assert (spec.n_trials, spec.sampler, spec.pruner, spec.seed, spec.population) == (12, "tpe", "median", 0, None)
    assert spec.source == str(tmp_path / "digits-quick.toml")
    assert spec.dims["epochs"] == Dim.fixed(10)
    assert spec.dims["optimizer"] == Dim.choice(("sgd", "momentum", "adam", "rmsprop"))
    assert spec.dims["lr"] == Dim.range(1e-4, 0.5, log=True)
    assert spec.dims["init"].choices == ("xavier_uniform", "he_normal")
    assert spec.dims["norm"].choices == ("none", "batch")
    assert spec.dims["activation"].choices == ("relu", "tanh")
    assert spec.dims["batch_size"].choices == (32, 64)
    assert set(spec.dims) == {"optimizer", "lr", "init", "norm", "activation", "batch_size", "epochs"}
    assert spec.optimizer_overrides == {}
    assert spec.task_key == "digits[depth=2,width=128,epochs=10]"
    assert spec.implicit_values() == {"depth": 2, "width": 128, "seed": 0}
    # The optimizer is searched, so its other numbers get the default ranges; lr is shared.
    assert spec.searches_optimizer_defaults
    assert spec.optimizer_space("sgd") == {"lr": ("lr", spec.dims["lr"])}
    assert spec.optimizer_space("momentum")["momentum"] == ("momentum.momentum", DEFAULT_RANGES["momentum"])
    assert set(spec.optimizer_space("adam")) == {"lr", "beta1", "beta2"}
    assert set(spec.optimizer_space("rmsprop")) == {"lr", "rho"}
    assert sorted(spec.search_space()) == sorted(
        ["optimizer", "lr", "momentum.momentum", "adam.beta1", "adam.beta2", "rmsprop.rho",
         "init", "norm", "activation", "batch_size"]
    )


def test_shipped_studies_load() -> None:
    quick = load_spec(REPO / "studies" / "quickstart.toml")
    issue = parse_spec(_toml(ISSUE_SPEC))
    assert quick.name == "quickstart"
    assert quick == issue.with_overrides(name="quickstart")
    for task in ("digits", "mnist1d", "moons"):
        spec = load_spec(REPO / "studies" / "survey" / f"{task}.toml")
        assert spec.task == task and spec.name == f"survey-{task}"
        assert spec.sampler == "random" and spec.n_trials <= 32
        assert set(spec.optimizers) == set(OPTIMIZERS) - {"nadam"}  # the guide's eight
        assert not spec.searches_optimizer_defaults
        for opt in spec.optimizers:
            name, dim = spec.optimizer_space(opt)["lr"]
            assert name == f"{opt}.lr" and dim.log and dim.low < dim.high
            assert set(spec.optimizer_space(opt)) == {"lr"}


def _toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


# (spec text, key, bad value as shown, what is allowed) — each must be in the message.
BAD_SPECS = [
    pytest.param('[studdy]\nname = "s"\n', "spec", "'studdy'", "did you mean 'study'", id="unknown-table"),
    pytest.param(HEAD + 'samplr = "tpe"\n', "study", "'samplr'", "did you mean 'sampler'", id="unknown-study-key"),
    pytest.param(HEAD + "[space]\nlrr = 0.1\n", "space.lrr", "'lrr'", "did you mean 'lr'", id="unknown-space-key"),
    pytest.param(HEAD + "[space]\nlr = {low = 1e-4, high = 0.1, lgo = true}\n", "space.lr", "'lgo'", "'log'", id="unknown-range-key"),
    pytest.param(HEAD + "[train]\nlr = 0.1\n", "train", "'lr'", "'batch_size', 'epochs'", id="unknown-train-key"),
    pytest.param(HEAD + "[model]\nlayers = 3\n", "model", "'layers'", "'depth', 'width'", id="unknown-model-key"),
    pytest.param(HEAD + 'n_trials = "12"\n', "study.n_trials", "'12'", "an integer >= 1", id="wrong-type-int"),
    pytest.param(HEAD + '[space]\nlr = "fast"\n', "space.lr", "'fast'", "a number > 0", id="wrong-type-dim"),
    pytest.param(HEAD + "[train]\nepochs = 2.5\n", "train.epochs", "2.5", "an integer >= 1", id="float-for-int"),
    pytest.param(HEAD + "[space]\nmomentum = true\n", "space.momentum", "True", "a number in [0, 1)", id="bool-for-float"),
    pytest.param(HEAD + '[space]\noptimizer = ["sgd", "adamm"]\n', "space.optimizer", "'adamm'", "'adamw'", id="unknown-optimizer"),
    pytest.param(HEAD + '[space]\ninit = "glorot"\n', "space.init", "'glorot'", "'xavier_uniform'", id="unknown-init"),
    pytest.param(HEAD + '[space]\nnorm = "weight"\n', "space.norm", "'weight'", "'layer', 'group'", id="unknown-norm"),
    pytest.param(HEAD + '[space]\nactivation = ["relu", "swish"]\n', "space.activation", "'swish'", "'gelu', 'mish'", id="unknown-activation"),
    pytest.param('[study]\nname = "s"\ntask = "digit"\n', "study.task", "'digit'", "'mnist1d', 'moons'", id="unknown-task"),
    pytest.param('[study]\nname = "s"\ntask = "my task"\n', "study.task", "'my task'", "'module:function'", id="bad-factory"),
    pytest.param('[study]\nname = "s"\ntask = "tabular"\n[task]\ntarget = "y"\n', "task.path", "nothing", "CSV or Parquet", id="tabular-no-path"),
    pytest.param('[study]\nname = "s"\ntask = "tabular"\n[task]\npath = "d.csv"\n', "task.target", "nothing", "target column", id="tabular-no-target"),
    pytest.param('[study]\nname = "s"\ntask = "tabular"\n[task]\npath = "d.csv"\ntarget = "y"\nkind = "ordinal"\n',
                 "task.kind", "'ordinal'", "'classification', 'binary', 'regression'", id="tabular-kind"),
    pytest.param('[study]\nname = "s"\ntask = "digits"\n[task]\nnoise = 0.1\n', "task", "'noise'", "an empty table", id="digits-takes-no-options"),
    pytest.param('[study]\nname = "s"\ntask = "moons"\n[task]\nnoize = 0.1\n', "task", "'noize'", "'n_samples', 'noise'", id="unknown-task-option"),
    pytest.param('[study]\nname = "s"\ntask = "spirals"\n[task]\narms = 1\n', "task.arms", "1", "an integer >= 2", id="bad-task-option"),
    pytest.param('[study]\nname = "s"\ntask = "tabular"\n[task]\npath = "d.csv"\ntarget = "y"\nsep = ";"\n',
                 "task", "'sep'", "'path', 'target', 'kind'", id="unknown-tabular-option"),
    pytest.param(HEAD + "[space]\nlr = {low = 0.1, high = 0.1}\n", "space.lr.high", "0.1", "empty range", id="empty-range"),
    pytest.param(HEAD + "[space]\nlr = {low = 0.1, high = 0.01}\n", "space.lr.high", "0.01", "a number > low (0.1)", id="reversed-range"),
    pytest.param(HEAD + "[space]\nlr = {high = 0.01}\n", "space.lr.low", "nothing", "low and high", id="range-no-low"),
    pytest.param(HEAD + "[space]\nlr = 0\n", "space.lr", "0", "a number > 0", id="lr-zero"),
    pytest.param(HEAD + "[space]\nlr = [0.1, -0.01]\n", "space.lr", "-0.01", "a number > 0", id="lr-negative-choice"),
    pytest.param(HEAD + "[space]\nlr = {low = 0.0, high = 0.1}\n", "space.lr.low", "0.0", "a number > 0", id="lr-range-zero"),
    pytest.param(HEAD + '[space]\noptimizer = ["adam", "sgd"]\n[space.optimizers.adam]\nlr = -1e-3\n',
                 "space.optimizers.adam.lr", "-0.001", "a number > 0", id="lr-override-negative"),
    pytest.param(HEAD + "[space]\nlr = nan\n", "space.lr", "nan", "a number > 0", id="lr-nan"),
    pytest.param(HEAD + "[space]\nmomentum = 1.0\noptimizer = \"momentum\"\n", "space.momentum", "1.0", "a number in [0, 1)", id="momentum-one"),
    pytest.param(HEAD + '[space]\noptimizer = "momentum"\nmomentum = {low = 0.0, high = 0.9, log = true}\n',
                 "space.momentum.low", "0.0", "log range cannot include 0", id="log-range-zero"),
    pytest.param('[study]\ntask = "digits"\n', "study.name", "nothing", "name and task", id="missing-name"),
    pytest.param('[study]\nname = "s"\n', "study.task", "nothing", "name and task", id="missing-task"),
    pytest.param('[study]\nname = "my study!"\ntask = "digits"\n', "study.name", "'my study!'", "letters, digits", id="bad-name"),
    pytest.param(HEAD + 'metric = "accuracy"\n', "study.metric", "'accuracy'", "'val_accuracy', 'val_loss'", id="unknown-metric"),
    pytest.param('[study]\nname = "s"\ntask = "tabular"\nmetric = "val_accuracy"\n[task]\npath = "d.csv"\ntarget = "y"\nkind = "regression"\n',
                 "study.metric", "'val_accuracy'", "'val_loss'", id="accuracy-for-regression"),
    pytest.param(HEAD + 'sampler = "bayes"\n', "study.sampler", "'bayes'", "'tpe', 'random', 'cmaes', 'gp', 'grid', 'nsga2', 'qmc'", id="unknown-sampler"),
    pytest.param(HEAD + 'pruner = "asha"\n', "study.pruner", "'asha'", "'none', 'median', 'successive_halving', 'hyperband'", id="unknown-pruner"),
    pytest.param(HEAD + 'sampler = "grid"\n[space]\nlr = {low = 1e-4, high = 0.1, log = true}\n',
                 "space.lr", "'log': True", "finite set of values", id="grid-continuous"),
    pytest.param(HEAD + 'sampler = "grid"\n[space]\noptimizer = ["sgd", "adam"]\noptimizer_defaults = "search"\n',
                 "space.optimizer_defaults", "'search'", "'fixed', 'auto'", id="grid-default-ranges"),
    pytest.param(HEAD + '[space]\nnorm = ["batch", "instance"]\n', "space.norm", "'instance'", "'none', 'batch', 'layer', 'group'", id="instance-norm-mlp"),
    pytest.param(HEAD + '[space]\nbatch_size = [32, 32]\n', "space.batch_size", "[32, 32]", "without duplicates", id="duplicate-choice"),
    pytest.param(HEAD + '[space]\nactivation = []\n', "space.activation", "[]", "a non-empty list", id="empty-choice"),
    pytest.param(HEAD + '[space]\noptimizer = "sgd"\n[space.optimizers.sgd]\nbeta1 = 0.9\n',
                 "space.optimizers.sgd", "'beta1'", "'lr', 'weight_decay'", id="override-unused-param"),
    pytest.param(HEAD + '[space]\noptimizer = "sgd"\n[space.optimizers.adam]\nlr = 0.1\n',
                 "space.optimizers", "'adam'", "this spec's optimizers (sgd)", id="override-not-searched"),
    pytest.param(HEAD + '[space]\noptimizer = "sgd"\n[space.optimizers.sgdd]\nlr = 0.1\n',
                 "space.optimizers", "'sgdd'", "'nesterov'", id="override-unknown-optimizer"),
    pytest.param(HEAD + '[space]\noptimizer = ["sgd", "momentum"]\nbeta1 = 0.9\n',
                 "space.beta1", "0.9", "none of this spec's optimizers (sgd, momentum)", id="shared-param-unused"),
    pytest.param(HEAD + "[train]\nepochs = [5, 10]\n", "train.epochs", "[5, 10]", "search it in [space]", id="train-list"),
    pytest.param(HEAD + "[train]\nepochs = 10\n[space]\nepochs = [5, 10]\n", "space.epochs", "[5, 10]", "already set as train.epochs", id="set-twice"),
    pytest.param(HEAD + "[model]\nchannels = 16\n", "model.channels", "16", "write width", id="channels-mlp"),
    pytest.param(HEAD + "[space]\ninit = {low = 1, high = 2}\n", "space.init", "{'low': 1, 'high': 2}", "'he_normal'", id="range-for-enum"),
    pytest.param(HEAD + "[space]\nbatch_size = {low = 16, high = 64.5}\n", "space.batch_size.high", "64.5", "an integer >= 1", id="float-in-int-range"),
    pytest.param(HEAD + "[space]\nbatch_size = {low = 16, high = 64, step = 0.5}\n", "space.batch_size.step", "0.5", "an integer > 0", id="float-step-int"),
    pytest.param(HEAD + "[space]\nwarmup = {low = 0.0, high = 0.3, step = 0.2}\nschedule = \"warmup_cosine\"\n",
                 "space.warmup.step", "0.2", "divides high - low (0.3)", id="step-not-dividing"),
    pytest.param(HEAD + "[space]\nlr = {low = 1e-4, high = 0.1, log = true, step = 0.01}\n", "space.lr.step", "0.01", "absent when log = true", id="log-and-step"),
    pytest.param(HEAD + '[space]\ninit = ["he_normal", "xavier_normal"]\ninit_std = 0.1\n',
                 "space.init_std", "0.1", "init is one of normal, uniform", id="init-std-without-normal"),
    pytest.param(HEAD + "[train]\nwarmup = 0.1\n", "train.warmup", "0.1", "schedule is one of warmup_cosine", id="warmup-without-schedule"),
    pytest.param(HEAD + '[space]\nnorm = "group"\nnorm_groups = 5\n', "model.width", "128", "a multiple of norm_groups=5", id="groups-not-dividing"),
    pytest.param(HEAD + '[space]\nnorm = "group"\n[model]\nwidth = {low = 30, high = 60, step = 10}\n',
                 "model.width", "'low': 30", "a multiple of norm_groups=4", id="groups-width-range"),
    pytest.param(HEAD + '[space]\ninit = "pretrained"\n', "model.pretrained_path", "nothing", "state_dict", id="pretrained-no-path"),
    pytest.param(HEAD + "population = 0\n", "study.population", "0", "an integer >= 1 or 'auto'", id="population-zero"),
    pytest.param(HEAD + 'population = "many"\n', "study.population", "'many'", "'auto'", id="population-word"),
    pytest.param(HEAD + "seed = -1\n", "study.seed", "-1", "an integer >= 0", id="negative-seed"),
    pytest.param(HEAD + "[space]\noptimizer_defaults = \"yes\"\n", "space.optimizer_defaults", "'yes'", "'auto', 'search', 'fixed'", id="optimizer-defaults"),
    pytest.param(HEAD + "[space]\nlr = [[0.1]]\n", "space.lr", "[0.1]", "a list of single values", id="nested-list"),
]


@pytest.mark.parametrize(("text", "key", "value", "allowed"), BAD_SPECS)
def test_bad_spec_names_file_key_value_and_allowed(tmp_path: Path, text: str, key: str, value: str, allowed: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert f"'{key}'" in message or f"Unknown key '{key}" in message, message
    assert value in message, message
    assert allowed in message, message


def test_unknown_key_lists_every_allowed_key(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, HEAD + "[space]\nlearning_rate = 0.1\n"))
    message = str(info.value)
    for key in ("optimizer", "lr", "momentum", "beta1", "beta2", "eps", "rho", "weight_decay", "schedule",
                "warmup", "init", "init_std", "norm", "norm_groups", "activation", "batch_size", "epochs",
                "depth", "width", "optimizers"):
        assert f"'{key}'" in message


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "[space]\nlr = { low = 1e-4 high = 0.5 }\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}:5:"), message
    assert "line 5" in message and "column" in message and "valid TOML" in message, message
    assert "lr = { low = 1e-4 high = 0.5 }" in message, message


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="an existing TOML file"):
        load_spec(tmp_path / "nope.toml")


def test_dict_specs_name_their_source() -> None:
    with pytest.raises(SpecError, match=r"^<dict>: the 'study.sampler' parameter"):
        parse_spec({"study": {"name": "s", "task": "digits", "sampler": "x"}})
    with pytest.raises(SpecError, match=r"^api: the 'spec' parameter must be a table"):
        parse_spec(["not", "a", "table"], source="api")  # type: ignore[arg-type]


RICH_SPEC = """\
[study]
name = "rich"
task = "mnist1d"
metric = "val_loss"
n_trials = 7
sampler = "random"
pruner = "hyperband"
seed = 3
population = 4
description = "every kind of key"

[train]
epochs = 6
schedule = "warmup_cosine"
warmup = 0.1
seed = 11

[model]
depth = [2, 3]
channels = { low = 16, high = 48, step = 16 }

[space]
optimizer = ["sgd", "momentum", "adam", "adamw"]
lr = { low = 1e-4, high = 1, log = true }
momentum = [0.8, 0.9]
weight_decay = 0
init = ["normal", "he_uniform"]
init_std = { low = 0.01, high = 0.1, log = true }
norm = ["group", "instance"]
norm_groups = [4, 8]
activation = "gelu"
batch_size = { low = 32, high = 128, step = 32 }

[space.optimizers.adam]
lr = { low = 1e-5, high = 1e-2, log = true }
beta2 = [0.99, 0.999]
eps = 1e-8

[space.optimizers.momentum]
momentum = 0.5
"""


def test_rich_spec_parses_and_round_trips(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, RICH_SPEC, "rich.toml"))
    assert spec.direction == "minimize" and spec.population == 4 and spec.description == "every kind of key"
    assert spec.dims["width"] == Dim.range(16, 48, step=16, integer=True)  # channels is width
    assert spec.dims["lr"] == Dim.range(1e-4, 1.0, log=True)  # ints become floats for float fields
    assert spec.dims["weight_decay"] == Dim.fixed(0.0)
    assert spec.dims["seed"] == Dim.fixed(11)
    assert spec.task_key == "mnist1d[epochs=6]"  # depth and width are searched
    assert spec.optimizer_space("adam") == {
        "lr": ("adam.lr", Dim.range(1e-5, 1e-2, log=True)),
        "beta1": ("adam.beta1", DEFAULT_RANGES["beta1"]),
        "beta2": ("adam.beta2", Dim.choice((0.99, 0.999))),
        "eps": ("adam.eps", Dim.fixed(1e-8)),
        "weight_decay": ("adam.weight_decay", Dim.fixed(0.0)),
    }
    assert spec.optimizer_space("momentum")["momentum"] == ("momentum.momentum", Dim.fixed(0.5))
    assert spec.optimizer_space("sgd") == {"lr": ("lr", spec.dims["lr"]), "weight_decay": ("sgd.weight_decay", Dim.fixed(0.0))}
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data  # JSON-safe
    again = parse_spec(json.loads(json.dumps(data)))
    assert again == spec and again.spec_hash == spec.spec_hash
    assert again.source == "<dict>"  # where it came from is not part of the spec


def test_issue_spec_round_trips() -> None:
    spec = parse_spec(_toml(ISSUE_SPEC), source="issue.toml")
    again = parse_spec(spec.to_dict())
    assert again == spec and again.spec_hash == spec.spec_hash
    assert again.to_dict() == spec.to_dict()


def test_hash_ignores_n_trials_population_and_description_only() -> None:
    spec = parse_spec(_toml(ISSUE_SPEC))
    assert len(spec.spec_hash) == 64
    assert spec.with_overrides(n_trials=500).spec_hash == spec.spec_hash
    assert spec.with_overrides(population="auto").spec_hash == spec.spec_hash
    data = spec.to_dict()
    data["study"]["description"] = "notes"
    assert parse_spec(data).spec_hash == spec.spec_hash
    assert spec.with_overrides(seed=1).spec_hash != spec.spec_hash
    assert spec.with_overrides(sampler="random").spec_hash != spec.spec_hash
    data = spec.to_dict()
    data["space"]["lr"]["high"] = 0.4
    assert parse_spec(data).spec_hash != spec.spec_hash


def test_with_overrides_validates() -> None:
    spec = parse_spec(_toml(ISSUE_SPEC), source="issue.toml")
    changed = spec.with_overrides(n_trials=3, name="other", seed=5, sampler="random", pruner="none", population=2)
    assert (changed.n_trials, changed.name, changed.seed, changed.sampler, changed.pruner, changed.population) == (
        3, "other", 5, "random", "none", 2)
    assert changed.with_overrides(population=None, n_trials=None).population == 2  # None: leave as it is
    assert changed.with_overrides(population="auto").population == "auto"
    with pytest.raises(SpecError, match=r"^issue.toml: the 'study.n_trials' parameter must be an integer >= 1. Got 0"):
        spec.with_overrides(n_trials=0)
    with pytest.raises(SpecError, match="'study.sampler'.*Got 'bogus'"):
        spec.with_overrides(sampler="bogus")
    with pytest.raises(SpecError, match="'override'.*Got 'epochs'"):
        spec.with_overrides(epochs=3)
    # A continuous lr cannot be a grid: the override is checked like the file.
    with pytest.raises(SpecError, match="'space.lr'.*grid"):
        spec.with_overrides(sampler="grid")


def test_defaults_and_metric_choice() -> None:
    spec = parse_spec({"study": {"name": "s", "task": "moons"}})
    assert (spec.metric, spec.n_trials, spec.sampler, spec.pruner, spec.seed) == ("val_accuracy", 20, "tpe", "median", 0)
    assert spec.optimizers == ("adam",) and spec.dims == {} and spec.task_key == "moons[depth=2,width=32,epochs=10]"
    assert spec.search_space() == {}
    factory = parse_spec({"study": {"name": "s", "task": "mypkg.tasks:make"}, "task": {"rows": 10}})
    assert factory.metric == "val_loss" and factory.task_options == {"rows": 10}
    assert factory.task_key == "mypkg.tasks:make[rows=10,epochs=10]"
    regression = parse_spec({"study": {"name": "s", "task": "tabular"},
                             "task": {"path": "/data/h.csv", "target": "price", "kind": "regression"}})
    assert regression.metric == "val_loss" and regression.direction == "minimize"
    assert regression.task_key == "tabular:h.csv[kind=regression,target=price,depth=2,width=64,epochs=10]"


def test_relative_paths_resolve_against_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", '[study]\nname = "t"\ntask = "tabular"\n[task]\npath = "data/x.csv"\ntarget = "y"\n'
                 '[space]\ninit = "pretrained"\n[model]\npretrained_path = "w.pt"\n', "t.toml")
    spec = load_spec(path)
    assert spec.task_options["path"] == str(tmp_path / "sub" / "data" / "x.csv")
    assert spec.dims["pretrained_path"] == Dim.fixed(str(tmp_path / "sub" / "w.pt"))
    assert parse_spec(spec.to_dict()) == spec


def test_optimizer_defaults_rules() -> None:
    def spec(space: dict, **study: object) -> StudySpec:
        return parse_spec({"study": {"name": "s", "task": "digits", **study}, "space": space})

    # Only the optimizer fixed: the one-shot defaults, nothing searched.
    fixed = spec({"optimizer": "adam"})
    assert fixed.optimizer_space("adam") == {} and fixed.search_space() == {}
    assert spec({"optimizer": "adam", "lr": {"low": 1e-4, "high": 1e-2, "log": True}}).optimizer_space("adam") == {
        "lr": ("lr", Dim.range(1e-4, 1e-2, log=True))}
    # The optimizer searched: lr, momentum, beta1/2 and rho get default ranges; eps and weight decay stay.
    searched = spec({"optimizer": ["sgd", "nesterov", "adadelta", "adamw"]})
    assert searched.optimizer_space("sgd") == {"lr": ("sgd.lr", default_lr_dim("sgd"))}
    assert default_lr_dim("sgd") == Dim.range(0.000333, 0.3, log=True)
    assert default_lr_dim("adam") == Dim.range(3.33e-5, 0.03, log=True)
    assert default_lr_dim("adadelta") == Dim.range(0.0333, 30.0, log=True)
    assert set(searched.optimizer_space("nesterov")) == {"lr", "momentum"}
    assert set(searched.optimizer_space("adadelta")) == {"lr", "rho"}
    assert set(searched.optimizer_space("adamw")) == {"lr", "beta1", "beta2"}
    # An explicit setting wins either way; grid turns "auto" into "fixed".
    assert spec({"optimizer": ["sgd", "adam"], "optimizer_defaults": "fixed"}).search_space() == {"optimizer": Dim.choice(("sgd", "adam"))}
    assert set(spec({"optimizer": "adam", "optimizer_defaults": "search"}).search_space()) == {"adam.lr", "adam.beta1", "adam.beta2"}
    assert spec({"optimizer": ["sgd", "adam"]}, sampler="grid").search_space() == {"optimizer": Dim.choice(("sgd", "adam"))}


def test_dim_values_and_contains() -> None:
    assert Dim.range(0.1, 0.3, step=0.1).values() == (0.1, 0.2, 0.3)
    assert Dim.range(32, 128, step=32, integer=True).values() == (32, 64, 96, 128)
    assert Dim.range(1, 3, integer=True).values() == (1, 2, 3)
    assert Dim.range(1e-4, 1.0, log=True).values() is None
    r = Dim.range(0.1, 0.3, step=0.1)
    assert r.contains(0.2) and not r.contains(0.25) and not r.contains(0.4) and not r.contains("0.2")
    assert Dim.range(1, 3, integer=True).contains(2) and not Dim.range(1, 3, integer=True).contains(2.0)
    assert Dim.choice((0.9, 0.99)).contains(0.99) and not Dim.choice((0.9, 0.99)).contains(0.95)
    assert Dim.fixed("adam").contains("adam") and not Dim.fixed(1).contains(True)


def test_spec_module_stays_light() -> None:
    code = "import sys, hposvc.spec; print(sorted({'torch', 'optuna', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_regression_has_no_accuracy_for_arrays_too(tmp_path: Path) -> None:
    """arrays with kind = "regression" and metric val_accuracy used to pass validation, and
    then every trial failed."""
    text = HEAD.replace('task = "digits"', 'task = "arrays"\nmetric = "val_accuracy"') + '[task]\npath = "a.npz"\nkind = "regression"\n'
    assert 'task = "arrays"' in text
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    assert "'study.metric'" in str(info.value) and "use val_loss" in str(info.value)


def test_a_detected_regression_has_no_accuracy_either(tmp_path: Path) -> None:
    """Without [task] kind, float targets make arrays a regression: found at validate."""
    import numpy as np

    from hposvc.plugins import check_runnable

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x_train=rng.normal(size=(40, 3)).astype("float32"), y_train=rng.normal(size=40).astype("float32"))
    text = HEAD.replace('task = "digits"', 'task = "arrays"\nmetric = "val_accuracy"') + '[task]\npath = "a.npz"\n'
    spec = load_spec(write(tmp_path, text))
    with pytest.raises(InvalidInputError) as info:
        check_runnable(spec)
    assert "'study.metric'" in str(info.value) and "regression" in str(info.value), str(info.value)


# -- any metric for your own code, and [metrics] patterns ------------------------------------

CMD = {"name": "s", "command": ["python", "train.py"]}


@pytest.mark.parametrize(
    ("study", "metrics", "key", "says"),
    [
        ({**CMD, "metric": "score"}, {}, "study.direction", "does not say whether lower or higher is better"),
        ({"name": "s", "task": "digits", "metric": "valid_loss"}, {}, "study.metric", "needs your own [study] trainer or command"),
        ({**CMD, "metric": "val_loss", "direction": "maximize"}, {}, "study.direction", "better when it is lower"),
        ({**CMD, "metric": "valid loss"}, {}, "study.metric", "a metric name of letters"),
        ({**CMD, "metric": "valid_loss"}, {"valid_loss": "valid loss ("}, "metrics.valid_loss", "re says: missing )"),
        ({**CMD, "metric": "valid_loss"}, {"valid_loss": r"valid loss \S+"}, "metrics.valid_loss", "It has 0"),
        ({**CMD, "metric": "valid_loss"}, {"valid_loss": r"(valid|val) loss (\S+)"}, "metrics.valid_loss", "It has 2; write (?:...)"),
        ({**CMD, "metric": "valid_loss"}, {"valid_loss": 3}, "metrics.valid_loss", "a regular expression (a string)"),
        ({"name": "s", "trainer": "m:f", "metric": "valid_loss"}, {"valid_loss": r"loss (\S+)"}, "metrics", "absent without a [study] command"),
        ({"name": "s", "metric": "val_loss"}, {}, "study.task", "name and task"),
    ],
)
def test_metric_direction_and_patterns_are_checked(study: dict, metrics: dict, key: str, says: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"study": study, "metrics": metrics}, source="m.toml")
    message = str(info.value)
    assert message.startswith(f"m.toml: the '{key}' parameter"), message
    assert says in message, message


def test_a_command_study_reads_any_metric_and_round_trips() -> None:
    spec = parse_spec({"study": {**CMD, "metric": "bleu_score"}, "metrics": {"bleu_score": r"BLEU = ([0-9.]+)", "epoch": r"epoch (\d+)"}})
    assert (spec.task, spec.metric, spec.direction) == (None, "bleu_score", "maximize")
    assert parse_spec(spec.to_dict()) == spec and spec.to_dict()["study"]["direction"] == "maximize"
    explicit = parse_spec({"study": {**CMD, "metric": "score", "direction": "minimize"}})
    assert explicit.direction == "minimize" and explicit.task_key.startswith("own-data")
    # the built-in metrics keep their stored form (and their specs' hashes)
    assert "direction" not in parse_spec({"study": {"name": "s", "task": "digits"}}).to_dict()["study"]
