"""hposvc.optim: the optimizer mapping matches torch.optim built by hand; schedule values."""

from __future__ import annotations

import math

import pytest
import torch

from hposvc.config import OPTIMIZERS, TrialConfig
from hposvc.optim import NADAM_MOMENTUM_DECAY, build_optimizer, build_scheduler, lr_factor

# Numbers unlike torch's defaults, so a builder that forgot to pass one (or passed it to
# the wrong argument, e.g. ρ not reaching RMSprop's α) takes different steps.
NUMBERS = {"lr": 0.03, "momentum": 0.7, "beta1": 0.8, "beta2": 0.95, "eps": 1e-3, "rho": 0.6, "weight_decay": 0.05}


def config_for(name: str) -> TrialConfig:
    uses = TrialConfig(optimizer=name).optimizer_params
    return TrialConfig(optimizer=name, **{k: NUMBERS[k] for k in uses})


def by_hand(name: str, params, c: TrialConfig) -> torch.optim.Optimizer:
    """What a user would write for each optimizer, straight from the torch docs."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=c.lr, weight_decay=c.weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=True, weight_decay=c.weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=c.lr, eps=c.eps, weight_decay=c.weight_decay)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=c.lr, rho=c.rho, eps=c.eps, weight_decay=c.weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=c.lr, alpha=c.rho, eps=c.eps, weight_decay=c.weight_decay)
    betas = (c.beta1, c.beta2)
    if name == "adam":
        return torch.optim.Adam(params, lr=c.lr, betas=betas, eps=c.eps, weight_decay=c.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=c.lr, betas=betas, eps=c.eps, weight_decay=c.weight_decay)
    if name == "nadam":
        return torch.optim.NAdam(
            params, lr=c.lr, betas=betas, eps=c.eps, weight_decay=c.weight_decay, momentum_decay=NADAM_MOMENTUM_DECAY
        )
    raise AssertionError(f"test has no hand-built {name}")


def run_steps(make_optimizer, steps: int = 5) -> list[torch.Tensor]:
    """Parameters after ``steps`` steps on a fixed little regression problem."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = make_optimizer(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_first_steps_match_hand_built_torch_optim(name):
    c = config_for(name)
    ours = run_steps(lambda params: build_optimizer(params, c))
    theirs = run_steps(lambda params: by_hand(name, params, c))
    start = run_steps(lambda params: by_hand(name, params, c), steps=0)
    for a, b, s in zip(ours, theirs, start):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, s) for a, s in zip(ours, start)), "the optimizer did not move"


def test_the_mapping_is_sensitive():
    """The comparison above can fail: a wrong flag or number changes the steps."""
    nesterov = run_steps(lambda p: build_optimizer(p, config_for("nesterov")))
    heavy_ball = run_steps(lambda p: build_optimizer(p, config_for("momentum")))
    assert not all(torch.equal(a, b) for a, b in zip(nesterov, heavy_ball))
    c = config_for("rmsprop")
    default_alpha = run_steps(lambda p: torch.optim.RMSprop(p, lr=c.lr, eps=c.eps, weight_decay=c.weight_decay))
    ours = run_steps(lambda p: build_optimizer(p, c))
    assert not all(torch.equal(a, b) for a, b in zip(default_alpha, ours))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_number_reaches_the_optimizer(name):
    c = config_for(name)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], c)
    d = opt.defaults
    assert d["lr"] == c.lr and d["weight_decay"] == c.weight_decay
    if c.momentum is not None:
        assert d["momentum"] == c.momentum
        assert d["nesterov"] is (name == "nesterov")
    elif isinstance(opt, torch.optim.SGD):
        assert d["momentum"] == 0.0 and d["nesterov"] is False
    if c.beta1 is not None:
        assert d["betas"] == (c.beta1, c.beta2)
    if c.eps is not None:
        assert d["eps"] == c.eps
    if name == "adadelta":
        assert d["rho"] == c.rho
    if name == "rmsprop":
        assert d["alpha"] == c.rho and d["momentum"] == 0.0 and d["centered"] is False


def test_constant_schedule_is_one_everywhere():
    c = TrialConfig(schedule="constant")
    assert [lr_factor(c, s, 10) for s in (0, 5, 9, 10)] == [1.0, 1.0, 1.0, 1.0]


def test_cosine_schedule_at_known_points():
    c = TrialConfig(schedule="cosine")
    assert lr_factor(c, 0, 100) == 1.0
    assert lr_factor(c, 25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(c, 50, 100) == pytest.approx(0.5)
    assert lr_factor(c, 100, 100) == pytest.approx(0.0)
    assert lr_factor(c, 150, 100) == pytest.approx(0.0)  # past the end it stays at 0


def test_warmup_cosine_schedule_at_known_points():
    c = TrialConfig(schedule="warmup_cosine", warmup=0.1)  # 10 of 100 steps warm up
    factors = [lr_factor(c, s, 100) for s in range(101)]
    assert factors[0] == pytest.approx(1 / 11)
    assert factors[9] == pytest.approx(10 / 11)
    assert factors[10] == 1.0  # the peak, where the cosine starts
    assert factors[55] == pytest.approx(0.5)  # halfway through the 90 cosine steps
    assert factors[100] == pytest.approx(0.0)
    assert all(a < b for a, b in zip(factors[:10], factors[1:11]))
    assert all(a > b for a, b in zip(factors[10:100], factors[11:101]))
    no_warmup = TrialConfig(schedule="warmup_cosine", warmup=0.0)
    assert lr_factor(no_warmup, 50, 100) == pytest.approx(lr_factor(TrialConfig(schedule="cosine"), 50, 100))


def test_scheduler_applies_lr_factor_per_step():
    c = TrialConfig(optimizer="momentum", lr=0.2, schedule="warmup_cosine", warmup=0.25)
    param = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer([param], c)
    sched = build_scheduler(opt, c, total_steps=8)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        param.sum().backward()
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.2 * lr_factor(c, s, 8) for s in range(8)])
    assert seen[0] == pytest.approx(0.2 / 3)  # 2 warm-up steps: 1/3, 2/3, then the peak
    assert seen[2] == pytest.approx(0.2)
