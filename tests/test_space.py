"""The search space: Optuna suggestions -> TrialConfig, and back (in-memory studies)."""

from __future__ import annotations

import math
import warnings

import optuna
import pytest

from hposvc.config import ONE_SHOT_DEFAULTS, OPTIMIZERS, TrialConfig
from hposvc.errors import InvalidInputError, SpecError
from hposvc.space import (
    build_pruner,
    build_sampler,
    config_in_space,
    epoch_bounds,
    grid_search_space,
    params_for_config,
    suggest_config,
)
from hposvc.spec import DEFAULT_RANGES, Dim, StudySpec, default_lr_dim, parse_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Every optimizer; a shared lr range except for adam (override); momentum fixed for
# "momentum"; the default ranges for the rest; conditional init_std / norm_groups / warmup.
WIDE = {
    "study": {"name": "wide", "task": "mnist1d", "sampler": "random", "seed": 1},
    "train": {"epochs": 3, "seed": 5},
    "model": {"width": 32},
    "space": {
        "optimizer": list(OPTIMIZERS),
        "lr": {"low": 1e-3, "high": 0.3, "log": True},
        "weight_decay": [0.0, 1e-4],
        "init": ["normal", "uniform", "he_normal"],
        "init_std": {"low": 0.01, "high": 0.1, "log": True},
        "norm": ["none", "group", "instance"],
        "norm_groups": [2, 4],
        "schedule": ["constant", "warmup_cosine"],
        "warmup": {"low": 0.0, "high": 0.2, "step": 0.1},
        "batch_size": {"low": 16, "high": 64, "step": 16},
        "depth": {"low": 1, "high": 3},
        "optimizers": {
            "adam": {"lr": {"low": 1e-5, "high": 1e-4, "log": True}, "beta1": [0.85, 0.95]},
            "momentum": {"momentum": 0.5},
        },
    },
}


def wide_spec(**study: object) -> StudySpec:
    data = {**WIDE, "study": {**WIDE["study"], **study}}
    return parse_spec(data)


def sample(spec: StudySpec, n: int) -> list[tuple[optuna.trial.FrozenTrial, TrialConfig]]:
    study = optuna.create_study(sampler=build_sampler(spec), direction=spec.direction)
    out = []
    for _ in range(n):
        trial = study.ask()
        config = suggest_config(trial, spec)
        study.tell(trial, 0.0)
        out.append((study.trials[-1], config))
    return out


def test_conditional_params_only_for_their_optimizer() -> None:
    spec = wide_spec()
    space = spec.search_space()
    seen = set()
    for frozen, config in sample(spec, 150):
        params = frozen.params
        opt = params["optimizer"]
        seen.add(opt)
        assert config.optimizer == opt
        prefixed = {k.split(".")[0] for k in params if "." in k}
        assert prefixed <= {opt}, (opt, params)  # no other optimizer's numbers
        # lr is shared except where adam overrides it
        assert ("adam.lr" in params) == (opt == "adam") and ("lr" in params) == (opt != "adam")
        expected = {f"{opt}.{p}" for p in ("momentum", "beta1", "beta2", "rho", "weight_decay") if p in ONE_SHOT_DEFAULTS[opt]}
        if opt == "momentum":
            expected.discard("momentum.momentum")  # fixed by [space.optimizers.momentum]
        assert {k for k in params if "." in k and not k.endswith(".lr")} == expected, (opt, params)
        for name, value in params.items():
            assert space[name].contains(value), (name, value)
        # the config carries exactly what was suggested
        assert config.lr == params.get("lr", params.get("adam.lr"))
        for name, value in params.items():
            if name.startswith(f"{opt}."):
                assert getattr(config, name.split(".")[1]) == value
        # weight decay is shared (list) and stored per optimizer
        assert params[f"{opt}.weight_decay"] in (0.0, 1e-4) and config.weight_decay == params[f"{opt}.weight_decay"]
    assert seen == set(OPTIMIZERS)


def test_fixed_dims_overrides_and_conditions_are_honoured() -> None:
    for frozen, config in sample(wide_spec(), 80):
        params = frozen.params
        assert (config.epochs, config.width, config.seed) == (3, 32, 5)
        assert not {"epochs", "width", "seed"} & set(params)
        assert 1 <= config.depth <= 3 and config.batch_size in (16, 32, 48, 64)
        if config.optimizer == "momentum":
            assert config.momentum == 0.5
        if config.optimizer == "adam":
            assert 1e-5 <= config.lr <= 1e-4 and config.beta1 in (0.85, 0.95)
            assert config.eps == ONE_SHOT_DEFAULTS["adam"]["eps"]  # eps is never searched by default
        if config.optimizer in ("adamw", "nadam"):
            assert 0.8 <= config.beta1 <= 0.99 and config.beta2 in DEFAULT_RANGES["beta2"].choices
        if config.optimizer in ("rmsprop", "adadelta"):
            assert 0.8 <= config.rho <= 0.99
        # conditional fields: suggested exactly when their owner's value applies
        assert ("init_std" in params) == (config.init in ("normal", "uniform"))
        assert ("norm_groups" in params) == (config.norm == "group")
        assert ("warmup" in params) == (config.schedule == "warmup_cosine")
        if config.init == "he_normal":
            assert config.init_std is None
        if config.schedule == "warmup_cosine":
            assert config.warmup in (0.0, 0.1, 0.2)


def test_only_fixed_optimizer_means_one_shot_defaults() -> None:
    spec = parse_spec({"study": {"name": "s", "task": "digits"}, "space": {"optimizer": "nadam", "activation": ["relu", "gelu"]}})
    for frozen, config in sample(spec, 5):
        assert set(frozen.params) == {"activation"}
        assert config.optimizer_params == ONE_SHOT_DEFAULTS["nadam"]
        assert (config.depth, config.width, config.seed) == (2, 128, 0)  # task defaults, spec seed
    # A user factory's sizes come from its Task when the runner passes them.
    factory = parse_spec({"study": {"name": "s", "task": "pkg.mod:make"}})
    trial = optuna.create_study().ask()
    assert suggest_config(trial, factory, task_defaults={"depth": 4, "width": 16}).depth == 4


def test_default_ranges_when_the_optimizer_is_searched() -> None:
    spec = parse_spec({"study": {"name": "s", "task": "digits", "sampler": "random"},
                       "space": {"optimizer": ["sgd", "adadelta"]}})
    for frozen, config in sample(spec, 30):
        opt = config.optimizer
        lr = frozen.params[f"{opt}.lr"]
        assert default_lr_dim(opt).contains(lr) and config.lr == lr
        if opt == "adadelta":
            assert 0.8 <= frozen.params["adadelta.rho"] <= 0.99
            assert config.eps == ONE_SHOT_DEFAULTS["adadelta"]["eps"]


def test_config_in_space() -> None:
    spec = wide_spec()
    assert all(config_in_space(c, spec) for _, c in sample(spec, 40))
    base = TrialConfig(optimizer="sgd", lr=0.01, weight_decay=0.0, init="he_normal", norm="none", batch_size=32,
                       epochs=3, depth=2, width=32, seed=5)
    assert config_in_space(base, spec)
    outside = [
        base.replace(lr=0.5),  # above lr.high
        base.replace(epochs=4),  # epochs fixed at 3
        base.replace(seed=0),  # [train] seed 5
        base.replace(width=64),  # [model] width 32
        base.replace(batch_size=20),  # off the step-16 grid
        base.replace(activation="tanh"),  # not in the spec: TrialConfig's relu only
        base.replace(weight_decay=0.01),  # not in [0.0, 1e-4]
        base.replace(extra={"k": 1}),
        base.replace(optimizer="adam", lr=1e-3),  # adam's lr range is [1e-5, 1e-4]
        base.replace(optimizer="momentum", lr=0.01, momentum=0.9),  # momentum's is fixed at 0.5
        base.replace(init="xavier_uniform"),
    ]
    for config in outside:
        assert not config_in_space(config, spec), config
    adam = base.replace(optimizer="adam", lr=5e-5, beta1=0.85, beta2=0.99, weight_decay=0.0)
    assert config_in_space(adam, spec)
    assert not config_in_space(adam.replace(eps=1e-6), spec)  # eps stays at the one-shot default
    normal = base.replace(init="normal", init_std=0.05)
    assert config_in_space(normal, spec) and not config_in_space(base.replace(init="normal", init_std=0.5), spec)
    # A spec that does not search init_std keeps TrialConfig's default for it.
    plain = parse_spec({"study": {"name": "s", "task": "digits"}, "space": {"init": ["normal", "he_normal"]}})
    assert config_in_space(TrialConfig(init="normal", depth=2, width=128), plain)
    assert not config_in_space(TrialConfig(init="normal", init_std=0.05, depth=2, width=128), plain)


def test_params_for_config_reproduces_configs_through_enqueue() -> None:
    spec = wide_spec(sampler="tpe")
    configs = [c for _, c in sample(wide_spec(seed=9), 25)]
    study = optuna.create_study(sampler=build_sampler(spec), direction=spec.direction)
    for config in configs:
        params = params_for_config(config, spec)
        assert set(params) <= set(spec.search_space())
        study.enqueue_trial(params)
        trial = study.ask()
        assert suggest_config(trial, spec) == config
        assert trial.params == params
        study.tell(trial, 1.0)
    # JSON round trip of the config (as stored on trials) still maps onto the categoricals.
    again = TrialConfig.from_json(configs[0].to_json())
    assert params_for_config(again, spec) == params_for_config(configs[0], spec)
    with pytest.raises(InvalidInputError, match=r"'config' parameter must be a config inside the search space of study 'wide'.*lr=0\.5"):
        params_for_config(configs[0].replace(optimizer="sgd", lr=0.5, weight_decay=0.0), spec)


def test_grid_search_space_and_grid_sampler_cover_the_grid() -> None:
    spec = parse_spec({
        "study": {"name": "g", "task": "digits", "sampler": "grid", "n_trials": 100},
        "space": {
            "optimizer": ["sgd", "momentum"],
            "lr": {"low": 0.1, "high": 0.3, "step": 0.1},
            "optimizers": {"momentum": {"momentum": [0.8, 0.9]}},
            "batch_size": {"low": 32, "high": 64, "step": 32},
        },
    })
    grid = grid_search_space(spec)
    assert grid == {"optimizer": ["sgd", "momentum"], "lr": [0.1, 0.2, 0.3], "momentum.momentum": [0.8, 0.9], "batch_size": [32, 64]}
    study = optuna.create_study(sampler=build_sampler(spec), direction=spec.direction)
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a grid value off Optuna's step grid would warn
        study.optimize(lambda t: _objective(t, spec), n_trials=spec.n_trials)
    for trial in study.trials:
        config = TrialConfig.from_dict(trial.user_attrs["config"])
        seen.add((config.optimizer, config.lr, config.momentum, config.batch_size))
    # 24 grid points; sgd ignores the momentum column, so 6 sgd + 12 momentum configs.
    assert len(study.trials) == 24
    assert len(seen) == 18
    with pytest.raises(SpecError, match="'lr'.*a list, or a range with a step"):
        grid_search_space(parse_spec({"study": {"name": "s", "task": "digits"}, "space": {"lr": {"low": 0.1, "high": 0.3}}}))


def test_grid_sampler_works_with_ask_and_tell() -> None:
    spec = parse_spec({"study": {"name": "g", "task": "digits", "sampler": "grid"}, "space": {"optimizer": ["sgd", "adam"]}})
    sampler = build_sampler(spec)
    study = optuna.create_study(sampler=sampler, direction=spec.direction)
    seen = []
    while not sampler.is_exhausted(study):
        trial = study.ask()
        seen.append(suggest_config(trial, spec).optimizer)
        study.tell(trial, 1.0)  # Optuna's own GridSampler raises here once the grid is done
    assert sorted(seen) == ["adam", "sgd"]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def _objective(trial: optuna.trial.Trial, spec: StudySpec) -> float:
    """A stand-in for training: a smooth function of the config, reported per epoch."""
    config = suggest_config(trial, spec)
    trial.set_user_attr("config", config.to_dict())
    score = -abs(math.log10(config.lr) + 1.5) + (0.2 if config.optimizer in ("adam", "momentum") else 0.0)
    for epoch in range(1, config.epochs + 1):
        value = score * (1 - 0.5 ** epoch)
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return value


SAMPLER_SPACE = {
    "optimizer": ["sgd", "adam", "rmsprop"],
    "lr": [0.001, 0.01, 0.1],
    "batch_size": {"low": 16, "high": 48, "step": 16},
    "norm": ["none", "batch"],
}


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp", "grid", "nsga2", "qmc"])
def test_every_sampler_runs(sampler: str) -> None:
    spec = parse_spec({"study": {"name": "s", "task": "digits", "sampler": sampler, "pruner": "none"},
                       "train": {"epochs": 2}, "space": SAMPLER_SPACE})
    study = optuna.create_study(sampler=build_sampler(spec), pruner=build_pruner(spec), direction=spec.direction)
    study.optimize(lambda t: _objective(t, spec), n_trials=3)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for trial in study.trials:
        assert config_in_space(TrialConfig.from_dict(trial.user_attrs["config"]), spec)


def test_tpe_models_conditional_params_past_its_startup() -> None:
    spec = wide_spec(sampler="tpe", n_trials=12, pruner="none")
    sampler = build_sampler(spec)
    assert sampler._n_startup_trials == 5 and sampler._multivariate and sampler._group
    study = optuna.create_study(sampler=sampler, pruner=build_pruner(spec), direction=spec.direction)
    study.optimize(lambda t: _objective(t, spec), n_trials=10)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(config_in_space(TrialConfig.from_dict(t.user_attrs["config"]), spec) for t in study.trials)


def test_sampler_is_seeded() -> None:
    spec = wide_spec(sampler="tpe")
    first = [c for _, c in sample(spec, 8)]
    assert [c for _, c in sample(spec, 8)] == first
    assert [c for _, c in sample(wide_spec(sampler="tpe", seed=2), 8)] != first


@pytest.mark.parametrize("pruner", ["none", "median", "successive_halving", "hyperband"])
def test_every_pruner_runs(pruner: str) -> None:
    spec = parse_spec({"study": {"name": "s", "task": "digits", "sampler": "random", "pruner": pruner},
                       "space": {**SAMPLER_SPACE, "epochs": [3, 9]}})
    study = optuna.create_study(sampler=build_sampler(spec), pruner=build_pruner(spec), direction=spec.direction)
    study.optimize(lambda t: _objective(t, spec), n_trials=3)
    assert len(study.trials) == 3 and all(t.state.is_finished() for t in study.trials)
    assert all(t.intermediate_values for t in study.trials)


def test_pruner_settings_follow_epochs() -> None:
    def pruner(name: str, epochs: object) -> optuna.pruners.BasePruner:
        return build_pruner(parse_spec({"study": {"name": "s", "task": "digits", "pruner": name}, "space": {"epochs": epochs}}))

    assert isinstance(pruner("none", 10), optuna.pruners.NopPruner)
    median = pruner("median", {"low": 10, "high": 30})
    assert isinstance(median, optuna.pruners.MedianPruner) and median._n_warmup_steps == 3 and median._n_startup_trials == 5
    halving = pruner("successive_halving", 27)
    assert halving._min_resource == 3 and halving._reduction_factor == 3
    hyper = pruner("hyperband", [5, 20])
    assert isinstance(hyper, optuna.pruners.HyperbandPruner) and hyper._max_resource == 20 and hyper._min_resource == 2
    assert epoch_bounds(parse_spec({"study": {"name": "s", "task": "digits"}})) == (10, 10)


def test_cmaes_needs_its_package_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "cmaes", None)  # as if not installed
    spec = parse_spec({"study": {"name": "s", "task": "digits", "sampler": "cmaes"}}, source="c.toml")
    with pytest.raises(SpecError, match=r"^c.toml: the 'study.sampler' parameter .* pip install cmaes"):
        build_sampler(spec)


def test_dim_suggestion_kinds() -> None:
    spec = parse_spec({"study": {"name": "s", "task": "digits"}, "space": {
        "optimizer": "sgd", "lr": {"low": 0.1, "high": 0.5, "step": 0.1}, "depth": {"low": 1, "high": 8, "log": True}}})
    trial = optuna.create_study(sampler=build_sampler(spec)).ask()
    config = suggest_config(trial, spec)
    dists = trial.distributions
    assert dists["lr"] == optuna.distributions.FloatDistribution(0.1, 0.5, step=0.1)
    assert dists["depth"] == optuna.distributions.IntDistribution(1, 8, log=True)
    assert Dim.range(0.1, 0.5, step=0.1).contains(config.lr) and isinstance(config.depth, int)
