"""hposvc.population: batched optimizers vs torch.optim, batched models vs their modules,
population training vs sequential training, and members leaving a population alone.

Tolerances, and why they are what they are:

- Optimizers (:data:`OPT_ATOL`/:data:`OPT_RTOL`): same gradients, so the only difference
  is float32 rounding in the update (e.g. ``lerp_`` for an EMA); after 150 steps members
  agree to ~2e-7 (the tolerance is 10x that, tight enough to catch a wrong bias
  correction or a β off by one step).
- Models (:data:`MODEL_ATOL`, :data:`GRAD_ATOL`): a batched matmul/conv sums in another
  order than the member's own kernel: ~1e-6 on outputs of size ~1, a little more on
  gradients through a norm over few values. A member mixed up with another would be
  off by O(1).
- Training (:data:`TRAIN_RTOL`): the rounding above feeds back through training; over
  two epochs of digits the metrics agree to ~1e-6 relative. The configs avoid one case
  where rounding is *amplified*: a bias right before batch norm gets a gradient that is
  pure rounding noise, which Adam normalises to ±lr steps; there population and
  sequential runs agree everywhere except in those biases (documented in
  hposvc/population/train.py), so Adam runs here use no batch norm.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from hposvc.config import ACTIVATIONS, ONE_SHOT_DEFAULTS, TrialConfig
from hposvc.errors import InvalidInputError
from hposvc.optim import build_optimizer, build_scheduler, lr_factor
from hposvc.population import BatchedOptimizer, PopulationModel, group_configs, population_key, train_population
from hposvc.population.model import build_members
from hposvc.tasks import Task, load_task
from hposvc.train import train

OPT_ATOL, OPT_RTOL = 2e-6, 1e-5
MODEL_ATOL = 1e-5
GRAD_ATOL = 1e-4  # group norm over 4 values divides by a small std: rounding grows ~10x
TRAIN_RTOL, TRAIN_ATOL = 1e-4, 1e-5

SHAPES = [(6, 5), (5,), (3, 4, 2), (1,)]  # a weight, a bias, a conv kernel, a PReLU slope
SCHEDULES = [("constant", None), ("cosine", None), ("warmup_cosine", 0.2), ("constant", None)]


def _random_configs(optimizer: str, n: int, rng: random.Random) -> list[TrialConfig]:
    """``n`` configs of ``optimizer`` with different numbers and schedules."""
    uses = ONE_SHOT_DEFAULTS[optimizer]
    configs = []
    for i in range(n):
        kw: dict = {"optimizer": optimizer, "lr": uses["lr"] * 10 ** rng.uniform(-1, 0.5)}
        kw["weight_decay"] = (0.0, 1e-3, 0.05, 0.3)[i % 4]
        if "momentum" in uses:
            kw["momentum"] = rng.uniform(0.5, 0.99)
        if "beta1" in uses:
            kw["beta1"], kw["beta2"] = rng.uniform(0.6, 0.95), rng.uniform(0.9, 0.9999)
        if "rho" in uses:
            kw["rho"] = rng.uniform(0.5, 0.99)
        if "eps" in uses:
            kw["eps"] = uses["eps"] * 10 ** rng.uniform(0, 2)
        kw["schedule"], kw["warmup"] = SCHEDULES[i % len(SCHEDULES)]
        configs.append(TrialConfig(**kw))
    return configs


# -- 1) batched optimizers ---------------------------------------------------------------


@pytest.mark.parametrize("optimizer", list(ONE_SHOT_DEFAULTS))
def test_batched_optimizer_matches_torch_optim_member_by_member(optimizer: str) -> None:
    rng = random.Random(optimizer)
    configs = _random_configs(optimizer, 4, rng)
    m, steps = len(configs), 150
    torch.manual_seed(0)
    stacked = [torch.randn(m, *shape) for shape in SHAPES]
    # Each member as hposvc's sequential path trains it: build_optimizer + build_scheduler.
    singles = [[nn.Parameter(t[i].clone()) for t in stacked] for i in range(m)]
    optims = [build_optimizer(singles[i], c) for i, c in enumerate(configs)]
    scheds = [build_scheduler(o, c, steps) for o, c in zip(optims, configs)]
    batched = BatchedOptimizer(stacked, configs)
    alive = list(range(m))
    for step in range(steps):
        grads = [torch.randn(m, *shape) for shape in SHAPES]
        for i in alive:
            for p, g in zip(singles[i], grads):
                p.grad = g[i].clone()
            optims[i].step()
            scheds[i].step()
        scale = torch.tensor([lr_factor(configs[i], step, steps) for i in alive], dtype=torch.float64)
        batched.step(stacked, [g[alive].clone() for g in grads], lr_scale=scale)
        if step == steps // 2:  # drop member 1 half-way: the others must not notice
            keep = [0, 2, 3]
            batched.keep(torch.tensor(keep))
            stacked = [t[keep].clone() for t in stacked]
            alive = [alive[k] for k in keep]
    for slot, i in enumerate(alive):
        for t, p in zip(stacked, singles[i]):
            torch.testing.assert_close(t[slot], p.detach(), atol=OPT_ATOL, rtol=OPT_RTOL)
    # Members really differ (different numbers give different parameters).
    assert not torch.allclose(stacked[0][0], stacked[0][1], atol=1e-3)


def test_batched_optimizer_rejects_mixed_optimizers_and_bad_shapes() -> None:
    with pytest.raises(InvalidInputError, match="same optimizer"):
        BatchedOptimizer([torch.zeros(2, 3)], [TrialConfig(optimizer="sgd"), TrialConfig(optimizer="adam")])
    with pytest.raises(InvalidInputError, match="first dimension"):
        BatchedOptimizer([torch.zeros(3, 3)], [TrialConfig(optimizer="sgd")] * 2)


# -- 2) batched models -------------------------------------------------------------------

MLP_TASK = Task(
    "toy-mlp", "multiclass", "mlp", (7,), 3, *(torch.zeros(4, 7), torch.zeros(4, dtype=torch.long)) * 3
)
CNN_TASK = Task(
    "toy-cnn", "multiclass", "cnn1d", (2, 12), 3, *(torch.zeros(4, 2, 12), torch.zeros(4, dtype=torch.long)) * 3
)
MODEL_CASES = [
    (task, norm, act)
    for task, norms in (
        (MLP_TASK, ("none", "batch", "layer", "group", "rms")),
        (CNN_TASK, ("none", "batch", "instance", "layer", "group", "rms")),
    )
    for norm, act in itertools.product(norms, ACTIVATIONS)
]


@pytest.mark.parametrize(
    ("task", "norm", "activation"), MODEL_CASES, ids=[f"{t.family}-{n}-{a}" for t, n, a in MODEL_CASES]
)
def test_batched_model_matches_each_members_module(task: Task, norm: str, activation: str) -> None:
    inits = ("he_normal", "zero", "xavier_uniform")
    configs = [
        TrialConfig(
            depth=2,
            width=8,
            norm=norm,
            norm_groups=2 if norm == "group" else None,
            activation=activation,
            init=init,
            seed=seed,
        )
        for seed, init in enumerate(inits)
    ]
    modules = build_members(task, configs)
    pop = PopulationModel(modules, device="cpu")  # stacks copies; `modules` stay separate
    m = len(configs)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):  # train mode: outputs, gradients, then an SGD step, three times
        per_member = step != 1  # step 1 feeds one shared batch to every member
        x = torch.randn(m if per_member else 1, 6, *task.input_shape, generator=gen)
        pop.train()
        out = pop(x if per_member else x[0], per_member=per_member)
        grad = pop.backward(out.square().mean(dim=(1, 2)).sum())
        for i, module in enumerate(modules):
            module.train()
            module.zero_grad()
            own = module(x[i if per_member else 0])
            own.square().mean().backward()
            torch.testing.assert_close(out[i], own, atol=MODEL_ATOL, rtol=1e-4)
            own_grad = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
            torch.testing.assert_close(grad[i], own_grad, atol=GRAD_ATOL, rtol=1e-3)
            with torch.no_grad():
                for p in module.parameters():
                    p -= 0.1 * p.grad
        with torch.no_grad():
            pop.flat -= 0.1 * grad
    # Buffers (batch norm's running statistics) and PReLU slopes are each member's own.
    for i, module in enumerate(modules):
        state = pop.member_state_dict(i)
        for name, value in module.state_dict().items():
            torch.testing.assert_close(state[name], value, atol=MODEL_ATOL, rtol=1e-4)
    if norm == "batch":
        means = pop.buffers["hidden.0.norm.running_mean"]
        assert not torch.allclose(means[0], means[1]) and int(pop.buffers["hidden.0.norm.num_batches_tracked"][0]) == 3
    # Eval mode, one shared batch for every member.
    x = torch.randn(5, *task.input_shape, generator=gen)
    pop.eval()
    out = pop(x)
    for i, module in enumerate(modules):
        module.eval()
        torch.testing.assert_close(out[i], module(x), atol=MODEL_ATOL, rtol=1e-4)
        torch.testing.assert_close(pop.member_module(i)(x), module(x), atol=MODEL_ATOL, rtol=1e-4)
    # Dropping members keeps the others' numbers.
    pop.keep([2, 0])
    torch.testing.assert_close(pop(x)[0], modules[2](x), atol=MODEL_ATOL, rtol=1e-4)


def test_population_model_rejects_different_shapes() -> None:
    modules = build_members(MLP_TASK, [TrialConfig(width=8), TrialConfig(width=16)])
    with pytest.raises(InvalidInputError, match="different structures"):
        PopulationModel(modules)


# -- 3) population vs sequential training ------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Task:
    return load_task("digits")


def _assert_same_result(pop, seq, *, rtol: float = TRAIN_RTOL, atol: float = TRAIN_ATOL) -> None:
    assert (pop.status, pop.reason, pop.n_params, pop.device) == (seq.status, seq.reason, seq.n_params, seq.device)
    assert len(pop.history) == len(seq.history)
    for a, b in zip(pop.history, seq.history):
        assert a.epoch == b.epoch and a.lr == pytest.approx(b.lr, rel=1e-12)
        assert a.train_loss == pytest.approx(b.train_loss, rel=rtol, abs=atol, nan_ok=True)
        assert a.val_loss == pytest.approx(b.val_loss, rel=rtol, abs=atol, nan_ok=True)
        if b.val_accuracy is None:
            assert a.val_accuracy is None
        else:  # one sample either way at most
            assert abs(a.val_accuracy - b.val_accuracy) <= 1.0 / 300
    assert sorted(pop.final) == sorted(seq.final)
    for key, value in seq.final.items():
        if key.endswith("accuracy"):
            assert abs(pop.final[key] - value) <= 1.0 / 300
        else:
            assert pop.final[key] == pytest.approx(value, rel=rtol, abs=atol, nan_ok=True)


POPULATIONS = {
    # different lr, momentum, seeds (own batch orders), schedules, inits; batch norm
    "momentum-batchnorm": [
        TrialConfig(optimizer="momentum", lr=0.05, momentum=0.9, norm="batch", seed=0),
        TrialConfig(optimizer="momentum", lr=0.01, momentum=0.5, norm="batch", seed=1, schedule="cosine", init="zero"),
        TrialConfig(
            optimizer="momentum", lr=0.1, momentum=0.8, norm="batch", seed=2, schedule="warmup_cosine", weight_decay=1e-3
        ),
    ],
    # one seed for all: the shared-batch path; Adam's β per member
    "adam-shared-batches": [
        TrialConfig(optimizer="adam", lr=1e-3, beta1=0.9, beta2=0.999, activation="prelu", seed=7),
        TrialConfig(optimizer="adam", lr=3e-3, beta1=0.8, beta2=0.99, activation="prelu", seed=7, init="xavier_normal"),
        TrialConfig(optimizer="adam", lr=1e-2, beta1=0.95, beta2=0.9999, activation="prelu", seed=7, schedule="cosine"),
    ],
}


@pytest.mark.parametrize("name", list(POPULATIONS))
def test_population_matches_sequential_training(digits: Task, name: str) -> None:
    configs = [c.replace(epochs=2, width=32, batch_size=64) for c in POPULATIONS[name]]
    assert len(group_configs(configs)) == 1
    seen: list[tuple[int, int]] = []
    results = train_population(configs, digits, device="cpu", on_epoch=lambda i, m: seen.append((i, m.epoch)) and False)
    assert sorted(seen) == [(i, e) for i in range(len(configs)) for e in (1, 2)]
    for config, result in zip(configs, results):
        _assert_same_result(result, train(config, digits, device="cpu"))
    # The members did train differently (not one model copied three times).
    assert len({round(r.final["val_loss"], 6) for r in results}) == len(configs)


def test_population_matches_sequential_training_for_the_cnn() -> None:
    task = load_task("mnist1d", options={"num_samples": 1500})  # small: 900 training samples
    base = TrialConfig(optimizer="nesterov", depth=2, width=8, epochs=2, norm="batch", activation="prelu")
    configs = [
        base.replace(lr=0.05, momentum=0.9, seed=0),
        base.replace(lr=0.02, momentum=0.7, seed=1, schedule="cosine", init="zero"),
    ]
    for config, result in zip(configs, train_population(configs, task, device="cpu")):
        _assert_same_result(result, train(config, task, device="cpu"))


@pytest.mark.parametrize("kind", ["binary", "regression"])
def test_population_matches_sequential_for_binary_and_regression(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=gen)
    signal = x[:, 0] - 0.5 * x[:, 1] + 0.1 * torch.randn(300, generator=gen)
    y = (signal > 0).float() if kind == "binary" else signal
    task = Task(f"toy-{kind}", kind, "mlp", (5,), 1, x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:])
    base = TrialConfig(optimizer="rmsprop", width=16, epochs=3, batch_size=32, norm="layer")
    configs = [base.replace(lr=1e-3, rho=0.9, seed=0), base.replace(lr=3e-3, rho=0.99, seed=1)]
    for config, result in zip(configs, train_population(configs, task, device="cpu")):
        seq = train(config, task, device="cpu")
        _assert_same_result(result, seq)
        assert ("val_accuracy" in result.final) == (kind == "binary")


# -- 4) members leave alone --------------------------------------------------------------


def test_divergence_and_pruning_stop_only_their_members(digits: Task) -> None:
    base = TrialConfig(optimizer="sgd", epochs=3, width=32, batch_size=64)
    configs = [base.replace(lr=lr, seed=seed) for seed, lr in enumerate((0.1, 100.0, 0.05, 0.3))]
    prune_after = {2: 1}  # member 2 is pruned after its first epoch

    def on_epoch(i: int, metrics) -> bool:
        return prune_after.get(i) == metrics.epoch

    results = train_population(configs, digits, device="cpu", on_epoch=on_epoch)
    assert [r.status for r in results] == ["completed", "diverged", "stopped", "completed"]
    assert [len(r.history) for r in results] == [3, 1, 1, 3]
    assert results[1].reason.startswith("diverged: ") and "at epoch 1 step" in results[1].reason
    assert results[2].reason == "stopped: on_epoch asked to stop after epoch 1"
    # Every member, survivors included, ends exactly as it would alone.
    for i, (config, result) in enumerate(zip(configs, results)):
        alone = train(config, digits, device="cpu", on_epoch=lambda m, i=i: prune_after.get(i) == m.epoch)
        _assert_same_result(result, alone)
    assert results[0].final["val_accuracy"] > 0.5 and results[3].final["val_accuracy"] > 0.5  # chance is 0.1


def test_keep_model_returns_each_members_trained_module(digits: Task) -> None:
    configs = [TrialConfig(optimizer="adagrad", lr=lr, epochs=1, width=16) for lr in (0.01, 0.05)]
    results = train_population(configs, digits, device="cpu", keep_model=True)
    for config, result in zip(configs, results):
        alone = train(config, digits, device="cpu", keep_model=True)
        for (name, a), (_, b) in zip(result.model.state_dict().items(), alone.model.state_dict().items()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


# -- 5) grouping -------------------------------------------------------------------------


def test_population_key_groups_by_structure_not_by_numbers() -> None:
    a = TrialConfig(optimizer="adam", lr=1e-3, seed=0)
    same = [
        a.replace(lr=0.1, beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.1),
        a.replace(seed=5, init="zero"),
        a.replace(schedule="warmup_cosine", warmup=0.3),
        a.replace(init="normal", init_std=0.1),
    ]
    different = [
        a.replace(optimizer="adamw"),
        a.replace(width=64),
        a.replace(depth=3),
        a.replace(norm="batch"),
        a.replace(norm="group", norm_groups=4),
        a.replace(activation="tanh"),
        a.replace(batch_size=32),
        a.replace(epochs=3),
        a.replace(extra={"n": 1}),
    ]
    assert all(population_key(c) == population_key(a) for c in same)
    assert len({population_key(c) for c in [a, *different]}) == 1 + len(different)
    mixed = [a, different[0], same[0], different[1], same[1]]
    assert group_configs(mixed) == [[0, 2, 4], [1], [3]]
    assert group_configs(mixed, max_size=2) == [[0, 2], [4], [1], [3]]
    with pytest.raises(InvalidInputError, match="max_size"):
        group_configs(mixed, max_size=0)


def test_train_population_rejects_configs_that_cannot_share(digits: Task) -> None:
    with pytest.raises(InvalidInputError, match="population_key"):
        train_population([TrialConfig(width=16), TrialConfig(width=32)], digits, device="cpu")
    with pytest.raises(InvalidInputError, match="non-empty"):
        train_population([], digits, device="cpu")
