"""Tune your own model: a ``[study] model`` factory whose norm, activation and init hposvc
swaps and applies, end to end through ``hposvc study run`` (real SQLite and MLflow stores,
real training), the checks that fail a spec before any trial runs, and the built-in 2-D
families on digits-as-images."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from torch import nn

import hposvc
from hposvc.cli import main
from hposvc.config import TrialConfig
from hposvc.nn import ACTIVATION_TYPES, NORM_TYPES
from hposvc.plugins import build_user_model, load_callable, model_factory
from hposvc.population import train_population
from hposvc.spec import load_spec
from hposvc.tasks import load_task
from hposvc.tracking import experiment_name
from hposvc.train import seed_everything, train

MODELS = '''\
import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """digits' 64 pixels as one 8×8 image; batch norm and ReLU modules to be swapped."""

    def __init__(self, n_outputs, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, n_outputs)
        for m in self.modules():  # the factory's own init, which "default" must keep
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight)

    def forward(self, x):
        return self.head(self.features(x.reshape(len(x), 1, 8, 8)).mean(dim=(2, 3)))


def small_cnn(task, config):
    return SmallCNN(task.n_outputs)


def picky(task, config):
    if config.activation == "gelu":
        raise ValueError("this factory refuses gelu")
    return SmallCNN(task.n_outputs)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def functional(task, config):
    return Functional()


def not_a_model(task, config):
    return "a string"


class Gate(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, h):
        if h.mean() > 0:
            return self.fc(h)
        return h


class Gated(nn.Module):
    def __init__(self, n_outputs):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.gate = Gate(16)
        self.head = nn.Linear(16, n_outputs)

    def forward(self, x):
        return self.head(self.gate(self.body(x)))


def gated(task, config):
    """Data-dependent control flow: cannot be vectorised, so its trials train alone."""
    return Gated(task.n_outputs)


def builds_its_own(task, config, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU):
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), norm_layer(8), activation_layer(inplace=True),
        nn.Flatten(), nn.Linear(8 * 64, task.n_outputs),
    )
'''

SPEC = """\
[study]
name = "{name}"
task = "digits"
model = "{model}"
n_trials = {n_trials}
sampler = "grid"
pruner = "none"

[train]
epochs = 1
batch_size = 128

[space]
{space}
"""

GRID = """\
norm = ["batch", "group", "layer", "none"]
activation = ["relu", "gelu"]
init = ["xavier_uniform", "default"]
"""

# What model.txt must show for each norm: the layer types (layer norm on feature maps is
# GroupNorm(1, C): hposvc.nn.norm_layer says why) and nothing else.
NORM_TEXT = {"batch": {"BatchNorm2d"}, "group": {"GroupNorm"}, "layer": {"GroupNorm"}, "none": set()}
ACT_TEXT = {"relu": {"ReLU"}, "gelu": {"GELU"}}
NORM_NAMES = {"BatchNorm1d", "BatchNorm2d", "GroupNorm", "LayerNorm", "InstanceNorm2d"}
ACT_NAMES = {"ReLU", "GELU", "LeakyReLU", "PReLU", "Mish", "Sigmoid", "Tanh", "Softsign", "SiLU"}


def write_study(tmp_path: Path, *, name: str = "own-model", model: str = "mymodels:small_cnn", n_trials: int = 16, space: str = GRID) -> Path:
    (tmp_path / "mymodels.py").write_text(MODELS)
    spec = tmp_path / f"{name}.toml"
    spec.write_text(SPEC.format(name=name, model=model, n_trials=n_trials, space=space))
    return spec


def run(spec: Path, data: Path, *args: str):
    return CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet", *args])


def trial_runs(data: Path, name: str) -> dict[int, object]:
    client = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment_name(name))
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'trial'", max_results=1000)
    return {int(r.data.tags["hposvc.trial_number"]): r for r in runs}


def artifact(data: Path, run_id: str, path: str) -> str:
    local = MlflowClient(f"sqlite:///{data / 'mlflow.db'}").download_artifacts(run_id, path)
    return Path(local).read_text()


def module_types(text: str) -> set[str]:
    return set(re.findall(r"\): (\w+)\(", text))


def test_a_model_factory_study_runs_end_to_end(tmp_path: Path) -> None:
    spec = write_study(tmp_path)
    data = tmp_path / "data"
    result = run(spec, data)
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="own-model", storage=f"sqlite:///{data / 'hposvc.db'}").trials
    assert len(trials) == 16 and {t.state.name for t in trials} == {"COMPLETE"}
    runs = trial_runs(data, "own-model")
    seen = set()
    for t in trials:
        config = TrialConfig.from_dict(t.user_attrs["hposvc.config"])
        seen.add((config.norm, config.activation, config.init))
        run_ = runs[t.number]
        text = artifact(data, run_.info.run_id, "model.txt")
        types = module_types(text)
        # exactly the requested norm and activation layer types, and no others
        assert types & NORM_NAMES == NORM_TEXT[config.norm], (config.norm, text)
        assert types & ACT_NAMES == ACT_TEXT[config.activation], (config.activation, text)
        if config.norm == "layer":
            assert "GroupNorm(1, 8," in text and "GroupNorm(1, 16," in text
        assert run_.data.metrics["n_params"] == sum(p.numel() for p in _rebuild(spec, config).parameters())
        conversion = artifact(data, run_.info.run_id, "conversion.txt")
        assert conversion.startswith(f"norm layers replaced: {0 if config.norm == 'batch' else 2}")
    assert len(seen) == 16  # the grid: every norm × activation × init


def _rebuild(spec_path: Path, config: TrialConfig) -> nn.Module:
    spec = load_spec(spec_path)
    return model_factory(spec, load_task("digits"), config)()


def test_default_keeps_the_factorys_weights_bit_identical_and_schemes_set_them(tmp_path: Path) -> None:
    spec = load_spec(write_study(tmp_path))
    task = load_task("digits")
    factory = load_callable("mymodels:small_cnn", key="model", code_dir=str(tmp_path))
    for norm, activation in (("batch", "relu"), ("group", "gelu")):
        config = TrialConfig(norm=norm, activation=activation, init="default")
        seed_everything(0)
        own = factory(task, config).state_dict()
        seed_everything(0)
        built = model_factory(spec, task, config)().state_dict()
        weights = [k for k in own if k.endswith("weight") and own[k].dim() > 1]  # convs and the head
        assert weights and all(torch.equal(own[k], built[k]) for k in weights)
        if norm == "batch":  # nothing swapped: the whole state, running statistics included
            assert own.keys() == built.keys() and all(torch.equal(own[k], built[k]) for k in own)
    # a scheme replaces the factory's orthogonal init
    seed_everything(0)
    xavier = model_factory(spec, task, TrialConfig(init="xavier_uniform"))().state_dict()
    assert not torch.equal(xavier["features.0.weight"], own["features.0.weight"])


WIDE = 1024


@pytest.mark.parametrize(
    ("init", "activation", "variance"),
    [
        ("he_normal", "relu", 2 / WIDE),
        ("he_uniform", "leaky_relu", 2 / (1.0001 * WIDE)),
        ("xavier_uniform", "gelu", 2 / (WIDE + WIDE)),
        ("xavier_normal", "tanh", 2 / (WIDE + WIDE)),
    ],
)
def test_init_statistics_match_the_scheme_within_10_percent_on_wide_layers(init: str, activation: str, variance: float) -> None:
    def wide(task, config):
        return nn.Sequential(nn.Linear(WIDE, WIDE), nn.ReLU(), nn.Conv1d(WIDE // 16, WIDE // 16, 16), nn.ReLU())

    torch.manual_seed(0)
    model, report = build_user_model(wide, None, TrialConfig(init=init, activation=activation), apply=("activation", "init"))
    assert report.initialised == ("0", "2")
    for layer in (model[0], model[2]):  # fan_in = fan_out = 1024 for both
        assert abs(layer.weight.var().item() / variance - 1) < 0.10, (init, layer)
        assert torch.count_nonzero(layer.bias) == 0


def test_a_factory_that_builds_its_own_layers_gets_hposvcs_builders(tmp_path: Path) -> None:
    spec = load_spec(write_study(tmp_path, model="mymodels:builds_its_own", space='norm = ["group", "none"]\nactivation = ["prelu"]\n'))
    model = model_factory(spec, load_task("digits"), TrialConfig(norm="group", activation="prelu"))()
    assert [type(m).__name__ for m in model[2:4]] == ["GroupNorm", "PReLU"] and model[2].num_groups == 4


def test_unset_dimensions_leave_the_users_layers_alone(tmp_path: Path) -> None:
    # The spec searches only the optimizer: TrialConfig's defaults (norm 'none', He init)
    # must not strip the batch norms or re-initialise the weights.
    spec = load_spec(write_study(tmp_path, space='optimizer = ["adam", "sgd"]\n'))
    task = load_task("digits")
    seed_everything(0)
    model = model_factory(spec, task, TrialConfig(optimizer="sgd"))()
    seed_everything(0)
    own = load_callable("mymodels:small_cnn", key="model", code_dir=str(tmp_path))(task, TrialConfig())
    assert str(model) == str(own) and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), own.state_dict().values()))


@pytest.mark.parametrize(
    ("model", "space", "needles"),
    [
        ("mymodels:missing", 'norm = ["batch", "group"]\n', ["study.model", "has no function 'missing'"]),
        ("mymodels:not_a_model", 'norm = ["batch", "group"]\n', ["study.model", "returned str; it must return a torch.nn.Module"]),
        ("mymodels:functional", 'norm = ["batch", "group"]\n', ["[space] norm cannot act on the model of mymodels:functional", "no BatchNorm"]),
        ("mymodels:functional", 'activation = ["relu", "gelu"]\n', ["[space] activation", "Functional.forward calls F.relu", "activation_layer"]),
    ],
    ids=["missing", "not-a-module", "no-norm-layers", "functional-activation"],
)
def test_a_factory_hposvc_cannot_use_is_refused_before_anything_is_written(tmp_path: Path, model: str, space: str, needles: list[str]) -> None:
    spec = write_study(tmp_path, model=model, n_trials=2, space=space)
    data = tmp_path / "data"
    result = run(spec, data)
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert not (data / "hposvc.db").exists()
    assert CliRunner().invoke(main, ["study", "validate", str(spec)]).exit_code == 2


def test_a_factory_that_raises_for_some_trials_fails_them_with_its_error(tmp_path: Path) -> None:
    spec = write_study(tmp_path, name="picky", model="mymodels:picky", n_trials=2, space='activation = ["relu", "gelu"]\n')
    data = tmp_path / "data"
    result = run(spec, data)
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="picky", storage=f"sqlite:///{data / 'hposvc.db'}").trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all(t.user_attrs["hposvc.config"]["activation"] == "gelu" for t in failed)
    assert failed[0].user_attrs["hposvc.reason"] == (
        "TrainingError: the model factory mymodels:picky(task, config) raised ValueError: this factory refuses gelu"
    )
    assert any(t.state.name == "COMPLETE" for t in trials)


DATASETS = '''\
import torch
from hposvc.tasks import Task


class Pixels(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].reshape(1, 8, 8), int(self.y[i])


def digits_as_datasets(seed=0):
    from hposvc.tasks import load_task

    d = load_task("digits", seed=seed)
    return Task.from_datasets("digits-ds", "multiclass", 10, Pixels(d.x_train, d.y_train), Pixels(d.x_val, d.y_val), Pixels(d.x_test, d.y_test))
'''


def test_a_task_factory_of_datasets_and_a_user_model_train_through_the_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mydata.py").write_text(DATASETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = write_study(tmp_path, name="loader", n_trials=1, space='norm = "group"\n')
    spec.write_text(spec.read_text().replace('task = "digits"', 'task = "mydata:digits_as_datasets"').replace("[train]\n", '[train]\ndata = "loader"\n'))
    data = tmp_path / "data"
    result = run(spec, data)
    assert result.exit_code == 0, result.output
    (t,) = optuna.load_study(study_name="loader", storage=f"sqlite:///{data / 'hposvc.db'}").trials
    assert t.state.name == "COMPLETE" and t.user_attrs["hposvc.config"]["data"] == "loader"
    assert len(t.user_attrs["hposvc.probe.activation_std"]) > 0  # the probes read a few samples of the dataset


# -- the built-in 2-D families ---------------------------------------------------------


def test_a_population_of_2d_family_trials_matches_sequential_training() -> None:
    task = load_task("digits")
    configs = [TrialConfig(optimizer="adam", lr=lr, epochs=2, depth=1, width=4, norm="group", family="resnet", seed=3) for lr in (1e-3, 1e-2)]
    together = train_population(configs, task, device="cpu")
    alone = [train(c, task, device="cpu") for c in configs]
    for a, b in zip(together, alone):
        # Batched kernels sum in another order; a ResNet amplifies that rounding more than
        # test_population's MLPs do, so the curves agree to ~1e-3 rather than ~1e-6.
        assert abs(a.history[0].train_loss - b.history[0].train_loss) < 1e-3 * b.history[0].train_loss
        assert abs(a.final["val_loss"] - b.final["val_loss"]) < 1e-2 * b.final["val_loss"]
        assert a.n_params == b.n_params and a.status == b.status == "completed"


def test_best_config_rebuilds_the_family_and_the_users_model(tmp_path: Path) -> None:
    config = TrialConfig(family="resnet", depth=1, width=8, zero_init_residual=True, norm="batch")
    assert TrialConfig.from_json(config.to_json()) == config
    built = hposvc.build_training(config, "digits", device="cpu")
    assert type(built.model).__name__ == "ResNet"
    write_study(tmp_path)
    own = hposvc.build_training(TrialConfig(norm="group"), "digits", device="cpu", model="mymodels:small_cnn", apply=["norm"], code_dir=str(tmp_path))
    assert {type(m).__name__ for m in own.model.modules() if isinstance(m, NORM_TYPES)} == {"GroupNorm"}
    assert {type(m).__name__ for m in own.model.modules() if isinstance(m, ACTIVATION_TYPES)} == {"ReLU"}


@pytest.mark.slow
def test_the_resnet_family_reaches_95_percent_on_digits_as_images(tmp_path: Path) -> None:
    # Budget: 2 trials × 10 epochs of a ResNet (1 block per stage, 16 base channels) on
    # digits' 1077 training images (8×8); about a minute on an idle CPU core.
    spec = tmp_path / "resnet-digits.toml"
    spec.write_text(
        textwrap.dedent(
            """\
            [study]
            name = "resnet-digits"
            task = "digits"
            n_trials = 2
            sampler = "grid"
            pruner = "none"
            [train]
            epochs = 10
            batch_size = 64
            schedule = "cosine"
            [model]
            family = "resnet"
            depth = 1
            width = 16
            [space]
            optimizer = "adam"
            lr = 0.003
            norm = ["batch", "group"]
            """
        )
    )
    data = tmp_path / "data"
    result = run(spec, data)
    assert result.exit_code == 0, result.output
    best = hposvc.best_config("resnet-digits", storage=f"sqlite:///{data / 'hposvc.db'}")
    assert best.value >= 0.95 and best.config.family == "resnet"


# -- spec keys for families and training paths -----------------------------------------

HEAD = '[study]\nname = "s"\ntask = "digits"\n'


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (HEAD + '[model]\nfamily = "cnn1d"\n', "'model.family' parameter must be a family that fits the task's input shape (64,). Got 'cnn1d' instead. 'cnn1d' needs per-sample inputs (channels, length); this task fits 'mlp', 'cnn2d', 'resnet'."),
        ('[study]\nname = "s"\ntask = "moons"\n[space]\nfamily = ["mlp", "resnet"]\n', "'space.family' parameter must be a family that fits the task's input shape (2,). Got 'resnet'"),
        (HEAD + '[space]\nnorm = ["batch", "instance"]\n', "'digits' trains an MLP, whose features have no length to normalise over; 'instance' norm needs a convolutional family: the CNN task 'mnist1d', or [model] family = 'cnn2d'."),
        (HEAD + '[model]\nfamily = "resnet"\n[space]\nfamily = "cnn2d"\n', "set in one place only"),
        (HEAD + '[model]\nfamily = "cnn2d"\nzero_init_residual = true\n', "'model.zero_init_residual' parameter must be absent. Got True instead. It only applies when family is one of resnet"),
        (HEAD + '[train]\nprecision = "fp8"\n', "'train.precision' parameter must be one of 'fp32', 'bf16', 'fp16'. Got 'fp8' instead."),
        (HEAD + '[train]\ncompile = "yes"\n', "'train.compile' parameter must be true or false. Got 'yes' instead."),
        (HEAD + '[train]\ndata = ["tensors", "loader"]\n', "'train.data' parameter must be a single value"),
        (HEAD + '[train]\nnum_workers = -1\n', "'train.num_workers' parameter must be an integer >= 0. Got -1 instead."),
        (HEAD + 'trainer = "m:f"\npopulation = 4\n', "'study.population' parameter must be absent with a [study] trainer"),
    ],
    ids=["family-shape", "searched-family-shape", "instance-on-mlp", "family-twice", "zero-init-on-cnn2d", "precision", "compile", "data-searched", "workers", "population-with-trainer"],
)
def test_family_and_training_keys_are_checked_in_the_spec(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["study", "validate", str(path)])
    assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output


def test_family_keys_reach_the_trials_config(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(HEAD + '[train]\nprecision = "bf16"\ndata = "loader"\nnum_workers = 2\n[model]\nfamily = "resnet"\nzero_init_residual = true\n[space]\nnorm = ["instance", "group"]\n')
    spec = load_spec(path)
    assert spec.family == "resnet" and spec.task_key == "digits[family=resnet,depth=2,width=128,epochs=10]"
    from hposvc.space import first_config

    config = first_config(spec)
    assert (config.family, config.zero_init_residual, config.norm, config.precision, config.data, config.num_workers) == ("resnet", True, "instance", "bf16", "loader", 2)


def _alone(spec_path: Path, trial: "optuna.trial.FrozenTrial"):
    """The trial trained alone, its model built as its TrialContext builds it."""
    spec = load_spec(spec_path)
    task = load_task(spec.task, seed=spec.seed, options=spec.task_options)
    config = TrialConfig.from_dict(trial.user_attrs["hposvc.config"])
    seed_everything(config.seed)
    return train(config, task, device="cpu", model=model_factory(spec, task, config)())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "vectorised"),
    [("mymodels:small_cnn", True), ("mymodels:gated", False)],
    ids=["batchnorm-cnn-vectorised", "data-dependent-refused"],
)
def test_a_population_of_a_users_model(tmp_path: Path, caplog: pytest.LogCaptureFixture, model: str, vectorised: bool) -> None:
    # --population with a model factory: trials of one structure train as one vectorised
    # population (each member as its trial alone, within float rounding); a model that
    # cannot be vectorised trains one trial at a time, the layer at fault said once.
    space = 'optimizer = ["momentum"]\nnorm = ["batch"]\nlr = [0.01, 0.03, 0.1, 0.3]\n'
    spec = write_study(tmp_path, name="pop-model", model=model, n_trials=4, space=space)
    data = tmp_path / "data"
    with caplog.at_level("INFO", logger="hposvc.trial"):
        result = run(spec, data, "--population", "4")
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="pop-model", storage=f"sqlite:///{data / 'hposvc.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    together = [r.getMessage() for r in caplog.records if "train as one population" in r.getMessage()]
    alone = [r.getMessage() for r in caplog.records if "train one at a time" in r.getMessage()]
    if vectorised:
        assert len(together) == 1 and not alone
    else:
        assert not together and len(alone) == 1
        assert "mymodels:gated" in alone[0] and "data-dependent control flow" in alone[0] and "in layer 'gate' (Gate)" in alone[0]
        assert "mymodels.py:" in alone[0] and "`if h.mean() > 0:`" in alone[0]
    for t in trials:
        expected = _alone(spec, t).final["val_accuracy"]
        assert t.value == (pytest.approx(expected, abs=1 / 360) if vectorised else expected)  # alone: exact
