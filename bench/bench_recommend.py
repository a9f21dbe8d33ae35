"""Benchmark: recommend() over 50 studies × 200 trials with 1,000 bootstrap resamples,
and (``--calibration R``) how often the statistics name a best optimizer when there is
none, and find one when there is.

Generates synthetic finished studies into an SQLite file with plain Optuna (the trial
attrs follow the study service's storage contract), then times loading the trials and
computing the recommendation separately. Target: < 10 s in total.

Calibration: R balanced null frames (8 optimizers from one distribution, 8 trials each
on 4 tasks) and R frames with a real gap (adam +0.08 on every task, noise sd 0.03),
in memory. Targets: a best named in ≤ 5 % of null frames, the gap found in ≥ 95 %.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_recommend.py [--studies 50] [--trials 200] [--keep DIR]
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_recommend.py --calibration 200
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import sqlalchemy

from hposvc.config import ONE_SHOT_DEFAULTS, OPTIMIZERS, TrialConfig
from hposvc.recommendation import collect_trials, recommend, recommend_from_frame

# How much each optimizer adds to a task's base accuracy, on average (synthetic truth).
EFFECT = {"sgd": -0.06, "momentum": -0.01, "nesterov": 0.0, "adagrad": -0.04, "adadelta": -0.05,
          "rmsprop": -0.005, "adam": 0.01, "adamw": 0.012, "nadam": 0.008}  # fmt: skip
NORMS = ("none", "batch", "layer")
ACTIVATIONS = ("relu", "gelu", "tanh")
EPOCHS = 5


def _trial(rng: np.random.Generator, base: float) -> optuna.trial.FrozenTrial:
    opt = str(rng.choice(OPTIMIZERS))
    numbers = {}
    for p, default in ONE_SHOT_DEFAULTS[opt].items():
        if p == "lr":
            numbers[p] = float(default * 10 ** rng.uniform(-1.5, 1.0))
        elif p == "weight_decay":
            numbers[p] = float(rng.choice([0.0, 1e-4, 1e-2]))
        elif p == "eps":
            numbers[p] = default
        else:
            numbers[p] = float(min(0.999, default + rng.normal(0, 0.01)))
    config = TrialConfig(
        optimizer=opt,
        **numbers,
        schedule=str(rng.choice(["constant", "cosine"])),
        norm=str(rng.choice(NORMS)),
        activation=str(rng.choice(ACTIVATIONS)),
        epochs=EPOCHS,
    )
    # Accuracy peaks at the optimizer's default lr and falls off in log distance from it.
    miss = abs(math.log10(config.lr / ONE_SHOT_DEFAULTS[opt]["lr"]))
    final = float(np.clip(base + EFFECT[opt] - 0.05 * miss**2 + rng.normal(0, 0.02), 0.05, 0.999))
    curve = {e: float(final - 0.1 * (EPOCHS - e) / EPOCHS) for e in range(1, EPOCHS + 1)}
    pruned = rng.random() < 0.2
    state = optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE
    if pruned:
        curve = {e: v for e, v in curve.items() if e <= 2}
    return optuna.trial.create_trial(
        state=state,
        value=None if pruned else final,
        user_attrs={
            "hposvc.config": config.to_dict(),
            "hposvc.reason": "pruned at epoch 2" if pruned else None,
            "hposvc.device": "cpu",
        },
        intermediate_values=curve,
    )


def _fast_sqlite(dbapi_connection, _record) -> None:
    # Generation only: no fsync per trial (it is throw-away data), else it takes minutes.
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        dbapi_connection.execute("PRAGMA synchronous=OFF")
        dbapi_connection.execute("PRAGMA journal_mode=MEMORY")


def generate(url: str, *, n_studies: int, n_trials: int, seed: int = 0) -> None:
    """n_studies studies over n_studies // 2 tasks (two studies per task pool together)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = np.random.default_rng(seed)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "connect", _fast_sqlite)
    try:
        _generate(url, rng, n_studies=n_studies, n_trials=n_trials)
    finally:
        # The timed reads run with SQLite's default settings.
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "connect", _fast_sqlite)


def _generate(url: str, rng: np.random.Generator, *, n_studies: int, n_trials: int) -> None:
    storage = optuna.storages.RDBStorage(url)
    n_tasks = max(1, n_studies // 2)
    bases = rng.uniform(0.7, 0.92, size=n_tasks)
    for s in range(n_studies):
        task = s % n_tasks
        study = optuna.create_study(study_name=f"bench-{s:03d}", storage=storage, direction="maximize")
        study.set_user_attr("hposvc.task", f"task{task:02d}[epochs={EPOCHS}]")
        study.set_user_attr("hposvc.metric", "val_accuracy")
        study.set_user_attr("hposvc.n_trials", n_trials)
        study.add_trials([_trial(rng, bases[task]) for _ in range(n_trials)])
    storage.engine.dispose()


def calibration_frame(gap: float, *, seed: int, n_tasks: int = 4, n_trials: int = 8, sd: float = 0.03) -> pd.DataFrame:
    """8 optimizers with one accuracy distribution (adam shifted by ``gap``) on n_tasks
    tasks of different difficulty; lr random over 2 decades and irrelevant."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(n_tasks):
        base = 0.85 + rng.uniform(-0.05, 0.05)
        for opt in OPTIMIZERS[:8]:
            cfg = TrialConfig(optimizer=opt).to_dict()
            for _ in range(n_trials):
                acc = base + (gap if opt == "adam" else 0.0) + rng.normal(0, sd)
                rows.append({**cfg, "lr": float(cfg["lr"] * 10 ** rng.uniform(-1, 1)), "task": f"task{t}",
                             "value": float(np.clip(acc, 0, 1)), "direction": "maximize", "metric": "val_accuracy"})
    return pd.DataFrame(rows)


def calibration(repeats: int, n_bootstrap: int) -> None:
    t0 = time.perf_counter()
    named = tied_all = found = 0
    for seed in range(repeats):
        rec = recommend_from_frame(calibration_frame(0.0, seed=seed), n_bootstrap=n_bootstrap, seed=seed)
        named += rec.best is not None
        tied_all += len(rec.tied) == 8
        found += recommend_from_frame(calibration_frame(0.08, seed=seed), n_bootstrap=n_bootstrap, seed=seed).best == "adam"
    per = (time.perf_counter() - t0) / (2 * repeats)
    print(f"null frames: a best named in {named}/{repeats} ({named / repeats:.1%}), tied listed all 8 in {tied_all}/{repeats}")
    print(f"gap frames (adam +0.08): found in {found}/{repeats} ({found / repeats:.1%}); {per:.2f} s per recommendation")
    ok = named <= 0.05 * repeats and found >= 0.95 * repeats
    print(f"targets (null <= 5 %, gap >= 95 %): {'OK' if ok else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=10)
    ap.add_argument("--keep", type=Path, default=None, help="write the database here instead of a temp dir")
    ap.add_argument("--calibration", type=int, default=0, metavar="R", help="run R null and R gap frames instead")
    args = ap.parse_args()
    if args.calibration:
        calibration(args.calibration, args.bootstrap)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{folder / 'bench.db'}"
        t0 = time.perf_counter()
        generate(url, n_studies=args.studies, n_trials=args.trials)
        gen_s = time.perf_counter() - t0
        print(f"generated {args.studies} studies x {args.trials} trials in {gen_s:.1f} s")

        # The end-to-end call the user makes (store=False: time the computation itself).
        t0 = time.perf_counter()
        rec = recommend(storage=url, budget=args.budget, n_bootstrap=args.bootstrap, store=False)
        total = time.perf_counter() - t0
        print(f"recommend(): total {total:.2f} s = load {rec.timings['load_s']:.2f} s + compute {rec.timings['compute_s']:.2f} s")

        # The same two stages separately, and the context split on top.
        t0 = time.perf_counter()
        df = collect_trials(url)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        recommend_from_frame(df, budget=args.budget, n_bootstrap=args.bootstrap)
        compute_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        recommend_from_frame(df, budget=args.budget, n_bootstrap=args.bootstrap, by="norm")
        by_s = time.perf_counter() - t0
        print(f"collect_trials: {load_s:.2f} s for {len(df)} trials; recommend_from_frame: {compute_s:.2f} s; with by='norm': {by_s:.2f} s")
        print(rec.summary)
        status = "OK" if total < 10 else "OVER TARGET"
        print(f"target < 10 s: {status} ({total:.2f} s)")


if __name__ == "__main__":
    main()
