"""Populations of the user's own model: any vmappable nn.Module trained as one, each member
as its trial alone would train; models that cannot be vectorised are named and train alone.

Tolerance (float32): a member's per-epoch metrics equal its trial alone within
``rel 1e-4, abs 1e-5`` (losses) and one validation sample (accuracies). Batched kernels sum
in another order, which moves losses by ~1e-7 per step; over two epochs the observed gap is
~1e-7. The models avoid one known amplifier (hposvc/population/train.py): a bias right
before batch norm under Adam, so the CNN's convs have no bias. No dropout here: a member's
dropout masks are drawn in the population (``population_seed``), not as alone.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from hposvc.config import TrialConfig
from hposvc.plugins import build_user_model
from hposvc.population import PopulationModel, group_configs, population_seed, structure_key, train_population, vmap_reason
from hposvc.tasks import Task, load_task
from hposvc.train import seed_everything, train

RTOL, ATOL = 1e-4, 1e-5


# -- the user's models -------------------------------------------------------------------


class ImageCNN(nn.Module):
    """digits' 64 pixels as one 8×8 image, two conv + batch-norm blocks."""

    def __init__(self, n_outputs: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(len(x), 1, 8, 8)).mean(dim=(2, 3)))


class UserMLP(nn.Module):
    def __init__(self, n_inputs: int, n_outputs: int, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_inputs, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.out = nn.Linear(hidden, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """A ResNet-style model: stem, two residual blocks, pooled head."""

    def __init__(self, n_outputs: int, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.fc = nn.Linear(channels, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x.reshape(len(x), 1, 8, 8))).mean(dim=(2, 3)))


FACTORIES = {
    "cnn-batchnorm": lambda task, config: ImageCNN(task.n_outputs),
    "mlp": lambda task, config: UserMLP(task.input_shape[0], task.n_outputs),
    "resnet-converted": lambda task, config: SmallResNet(task.n_outputs),
}
APPLIED = {  # what the spec applies (build_user_model's `apply`): resnet's norm and activation are swapped
    "cnn-batchnorm": ["init"],
    "mlp": ["init"],
    "resnet-converted": ["norm", "activation", "init"],
}
CONFIGS = {
    # own seeds (own batch orders), momentum numbers, schedules and inits; batch norm kept
    "cnn-batchnorm": [
        TrialConfig(optimizer="momentum", lr=0.05, momentum=0.9, seed=0, init="he_normal"),
        TrialConfig(optimizer="momentum", lr=0.02, momentum=0.5, seed=1, init="xavier_uniform", schedule="cosine"),
        TrialConfig(optimizer="momentum", lr=0.1, momentum=0.8, seed=2, init="he_normal", weight_decay=1e-3),
    ],
    # one seed: the shared-batch path; Adam's β per member
    "mlp": [
        TrialConfig(optimizer="adam", lr=1e-3, beta1=0.9, beta2=0.999, seed=3, init="default"),
        TrialConfig(optimizer="adam", lr=3e-3, beta1=0.8, beta2=0.99, seed=3, init="xavier_normal"),
        TrialConfig(optimizer="adam", lr=1e-2, beta1=0.95, beta2=0.9999, seed=3, init="he_uniform", schedule="cosine"),
    ],
    # batch norm converted to group norm, ReLU to GELU, ZerO init on one member
    "resnet-converted": [
        TrialConfig(optimizer="nesterov", lr=0.05, momentum=0.9, seed=0, norm="group", norm_groups=2, activation="gelu", init="he_normal"),
        TrialConfig(optimizer="nesterov", lr=0.02, momentum=0.7, seed=1, norm="group", norm_groups=2, activation="gelu", init="zero"),
    ],
}


@pytest.fixture(scope="module")
def digits() -> Task:
    return load_task("digits")


def build(name: str, task: Task, config: TrialConfig) -> nn.Module:
    """The trial's model as its TrialContext builds it: seeded, then factory + conversion."""
    seed_everything(config.seed)
    model, _ = build_user_model(FACTORIES[name], task, config, apply=APPLIED[name])
    return model


def assert_same(pop, alone) -> None:
    assert (pop.status, pop.reason, pop.n_params) == (alone.status, alone.reason, alone.n_params)
    assert len(pop.history) == len(alone.history)
    for a, b in zip(pop.history, alone.history):
        assert a.lr == pytest.approx(b.lr, rel=1e-12)
        assert a.train_loss == pytest.approx(b.train_loss, rel=RTOL, abs=ATOL)
        assert a.val_loss == pytest.approx(b.val_loss, rel=RTOL, abs=ATOL)  # eval mode: running statistics
        assert abs(a.val_accuracy - b.val_accuracy) <= 1 / 360
    for key, value in alone.final.items():
        assert pop.final[key] == pytest.approx(value, rel=RTOL, abs=1 / 360 if key.endswith("accuracy") else ATOL), key


# -- 1) equivalence: each member is its trial alone ---------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_member_matches_its_trial_alone(digits: Task, name: str) -> None:
    configs = [c.replace(epochs=2, batch_size=64) for c in CONFIGS[name]]
    models = [build(name, digits, c) for c in configs]
    assert vmap_reason(models[0], digits.x_val) is None
    assert len({structure_key(m) for m in models}) == 1  # one structure, own inits
    results = train_population(configs, digits, device="cpu", models=models, keep_model=True)
    for config, result in zip(configs, results):
        alone = train(config, digits, device="cpu", model=build(name, digits, config), keep_model=True)
        assert_same(result, alone)
        # every parameter and buffer, batch norm's running statistics included
        own = alone.model.state_dict()
        for key, value in result.model.state_dict().items():
            torch.testing.assert_close(value, own[key], rtol=RTOL, atol=ATOL, msg=key)
    assert len({round(r.final["val_loss"], 6) for r in results}) == len(configs)  # members differ


def test_batch_norm_members_keep_their_own_running_statistics(digits: Task) -> None:
    configs = [c.replace(epochs=1) for c in CONFIGS["cnn-batchnorm"]]
    pop = PopulationModel([build("cnn-batchnorm", digits, c) for c in configs])
    pop.train()
    pop(digits.x_train[:32])
    means = pop.buffers["features.1.running_mean"]
    assert means.shape[0] == 3 and not torch.allclose(means[0], means[1])  # own weights: own statistics
    assert pop.buffers["features.1.num_batches_tracked"].tolist() == [1, 1, 1]


def test_dropout_is_independent_per_member_and_repeats_with_the_population_seed(digits: Task) -> None:
    def dropout_mlp(task: Task, config: TrialConfig) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))

    config = TrialConfig(optimizer="sgd", lr=0.1, epochs=1, seed=0)

    def members() -> list[nn.Module]:  # the same weights twice: only the masks can differ
        seed_everything(0)
        model = dropout_mlp(digits, config)
        return [model, copy.deepcopy(model)]

    pop = PopulationModel(members())
    pop.train()
    torch.manual_seed(population_seed([config, config]))
    out = pop(digits.x_train[:16])
    assert not torch.allclose(out[0], out[1])  # randomness="different"
    runs = [train_population([config, config], digits, device="cpu", models=members()) for _ in range(2)]
    curves = [[(m.train_loss, m.val_loss) for r in run for m in r.history] for run in runs]
    assert curves[0] == curves[1]  # the same population again: the same draws
    assert curves[0][0] != curves[0][1]  # two members, the same weights: their own masks
    assert "population of 2 seeded with" in runs[0][0].notes[-1]


def test_a_dataset_task_through_the_dataloader_feeds_the_population(digits: Task) -> None:
    ds = {s: torch.utils.data.TensorDataset(getattr(digits, f"x_{s}")[:300], getattr(digits, f"y_{s}")[:300]) for s in ("train", "val", "test")}
    task = Task.from_datasets("digits-ds", "multiclass", 10, ds["train"], ds["val"], ds["test"])
    configs = [TrialConfig(optimizer="momentum", lr=lr, momentum=0.9, epochs=2, batch_size=64, data="loader", seed=4) for lr in (0.01, 0.1)]
    # one batch stream: through a DataLoader the seed joins the key
    assert len(group_configs(configs, task=task)) == 1
    assert len(group_configs([configs[0], configs[1].replace(seed=5)], task=task)) == 2
    results = train_population(configs, task, device="cpu", models=[build("cnn-batchnorm", task, c) for c in configs])
    for config, result in zip(configs, results):
        assert result.data == "loader"
        assert_same(result, train(config, task, device="cpu", model=build("cnn-batchnorm", task, config)))


# -- 2) refusals: the layer and the call at fault ------------------------------------------


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.mean() > 0:  # data-dependent control flow
            return h
        return -h


class ItemScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h / h.abs().max().item()  # .item() in forward


class RunningSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.total = torch.zeros(10)  # a plain attribute, not a registered buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        self.total.add_(h.detach().mean(0))  # in-place update of unbatched state
        return h


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1  # replaces the buffer: a population would lose it
        return self.fc(x)


REFUSALS = {
    "data-dependent control flow": (Gate, "data-dependent control flow", "if h.mean() > 0:"),
    ".item()": (ItemScale, "`.item()`", "return h / h.abs().max().item()"),
    "in-place unbatched state": (RunningSum, "in-place update of unbatched state", "self.total.add_(h.detach().mean(0))"),
    "replaced buffer": (Counter, "replaces its buffer 'calls'", None),
}


@pytest.mark.parametrize("pattern", list(REFUSALS))
def test_a_model_that_cannot_be_vectorised_is_refused_with_the_layer_and_call(digits: Task, pattern: str) -> None:
    cls, what, line = REFUSALS[pattern]
    model = nn.Sequential(nn.Identity(), cls())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reason = vmap_reason(model, digits.x_val)
    assert reason is not None and "\n" not in reason
    assert what in reason and f"layer '1' ({cls.__name__})" in reason, reason
    if line is not None:
        assert f"test_population_models.py:" in reason and f"`{line}" in reason, reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the check changed nothing


def test_a_forward_that_returns_no_tensor_is_refused(digits: Task) -> None:
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> dict:
            return {"logits": self.fc(x)}

    assert vmap_reason(Dict(), digits.x_val) == "its forward returns dict, not one tensor of outputs"


def test_members_of_different_structure_cannot_be_stacked() -> None:
    a = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    b = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3))  # same shapes, another p: another structure
    assert structure_key(a) != structure_key(b)
    with pytest.raises(Exception, match="2 different structures"):
        PopulationModel([a, b])


def test_the_check_is_cheap_on_a_resnet_sized_model() -> None:
    # ~11M parameters (ResNet-18's size), 3×32×32 inputs; the goal is < 1 s
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    for c_in, c_out in ((64, 64), (64, 128), (128, 256), (256, 512)):
        for i in range(2):
            layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, stride=2 if i == 0 and c_in != c_out else 1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))
    assert 10e6 < sum(p.numel() for p in model.parameters()) < 12e6
    x = torch.randn(2, 3, 32, 32)
    t0 = time.perf_counter()
    assert vmap_reason(model, x) is None
    assert time.perf_counter() - t0 < 5.0  # generous on a shared CI machine; the bench reports the number
