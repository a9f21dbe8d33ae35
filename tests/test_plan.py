"""The plan `hposvc study run` picks, and what it may change: nothing but the batching."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from hposvc import queue
from hposvc.launcher import plan_run
from hposvc.spec import parse_spec

SPEC = {"study": {"name": "planned", "task": "moons", "n_trials": 24}}


@pytest.mark.parametrize(
    ("kwargs", "slots", "threads", "line"),
    [
        # a small model on a 2-core CPU: a core per trial, not both cores on one trial
        ({"cpu_count": 2, "cuda_count": 0}, 2, 1, "plan: 2 worker processes x 1 CPU thread each (2 usable CPU cores, 24 trials to run, no GPU; --workers 1 for one process)"),
        ({"cpu_count": 8, "cuda_count": 0, "n_left": 3}, 3, 2, "plan: 3 worker processes x 2 CPU threads each"),
        ({"cpu_count": 1, "cuda_count": 0}, 0, None, "plan: 1 process on auto (1 usable CPU core, 24 trials to run)"),
        ({"cpu_count": 2, "cuda_count": 0, "n_left": 1}, 0, None, "plan: 1 process on auto (2 usable CPU cores, 1 trial to run)"),
        ({"cpu_count": 16, "cuda_count": 1}, 0, None, "plan: 1 process on auto (1 GPU)"),
        ({"cpu_count": 16, "cuda_count": 4}, 4, None, "plan: 4 worker processes x 1 GPU each (4 GPUs, 24 trials to run"),
        ({"cpu_count": 2, "cuda_count": 0, "workers": "1"}, 0, None, "plan: 1 process on auto (--workers 1)"),
        ({"cpu_count": 4, "cuda_count": 0, "workers": "3"}, 3, 1, "plan: 3 worker processes x 1 CPU thread each (--workers 3)"),
        ({"cpu_count": 2, "cuda_count": 0, "device": "cuda:1"}, 0, None, "plan: 1 process on cuda:1 (--device cuda:1)"),
    ],
)
def test_the_plan_for_a_machine(kwargs: dict, slots: int, threads: int | None, line: str) -> None:
    kwargs = {"n_left": 24, **kwargs}
    plan = plan_run(parse_spec(SPEC), **kwargs)
    assert len(plan.slots) == slots
    if threads is not None:
        assert {s.threads for s in plan.slots} == {threads}
    assert plan.describe().startswith(line)


def test_a_population_is_the_users_plan() -> None:
    pop = parse_spec({**SPEC, "study": {**SPEC["study"], "population": 8}})
    assert plan_run(pop, n_left=24, cpu_count=2, cuda_count=0).describe().startswith("plan: 1 process on auto, populations of 8")
    one = parse_spec({**SPEC, "study": {**SPEC["study"], "population": 1}})
    plan = plan_run(one, n_left=24, cpu_count=2, cuda_count=0)
    assert not plan.slots and plan.population == 1  # --population 1: the plain plan


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_trials_config_does_not_depend_on_who_samples_it(sampler: str) -> None:
    # Two "workers" with differently seeded samplers, sampling trials in another order:
    # each trial gets the configuration one sampler alone would have given it.
    def make(seed: int) -> optuna.samplers.BaseSampler:
        if sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10)

    def sample(order: list[int], seeds: list[int]) -> dict[int, float]:
        study = optuna.create_study(sampler=make(seeds[0]))
        trials = [study.ask() for _ in range(4)]
        samplers = [make(s) for s in seeds]
        got = {}
        for i, n in enumerate(order):
            study.sampler = samplers[i % len(samplers)]
            queue.seed_sampler(study.sampler, queue.trial_seed(7, n))
            got[n] = trials[n].suggest_float("lr", 1e-4, 1.0, log=True)
        return got

    alone = sample([0, 1, 2, 3], [11])
    assert sample([3, 1, 0, 2], [12, 13]) == alone
    assert len(set(alone.values())) == 4


SPEC_TOML = """\
[study]
name = "planned"
task = "moons"
n_trials = 6
sampler = "random"
pruner = "none"
seed = 2

[train]
epochs = 3

[model]
depth = 1
width = 8

[space]
optimizer = ["adam", "sgd"]
lr = { low = 1e-3, high = 1e-1, log = true }
"""


@pytest.mark.slow
def test_results_are_the_same_in_one_process_and_in_two(tmp_path: Path) -> None:
    spec = tmp_path / "planned.toml"
    spec.write_text(SPEC_TOML)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outcomes = []
    for workers in ("1", "2"):
        data = tmp_path / f"data{workers}"
        run = subprocess.run(
            [sys.executable, "-m", "hposvc.cli", "study", "run", str(spec), "--workers", workers, "--data-dir", str(data), "--quiet"],
            capture_output=True, text=True, timeout=300, env=env,
        )
        assert run.returncode == 0, run.stderr
        assert f"plan: {'1 process' if workers == '1' else '2 worker processes'}" in run.stderr
        study = optuna.load_study(study_name="planned", storage=f"sqlite:///{data / 'hposvc.db'}")
        ran = [t for t in study.trials if t.state.name != "WAITING"]  # two workers topping up at once may leave one queued
        assert len(ran) == 6
        outcomes.append({t.number: (t.params, t.value) for t in ran})
        if workers == "2":
            assert len({t.user_attrs["hposvc.worker"] for t in ran}) == 2
    assert outcomes[0] == outcomes[1]
