"""hposvc as a user meets it: the whole ``hposvc study run`` process, start to exit, against
the script a user would write by hand for the same study.

The study (as in issue 13): 24 digits trials, Adam with a log-uniform lr, 8 epochs, a
median pruner, an MLP 64-128-128-10, batch 64. Per repeat, interleaved, best of
``--repeats`` (the machine may be shared: only ratios taken within one run mean much):

  (floor)   ``python -c "import torch, optuna"``: what no Python HPO service avoids;
  (dynamo)  ``python -c "import torch, optuna, torch._dynamo"`` less (floor): what the first
            ``torch.optim`` step of any PyTorch script imports (the script pays it in its
            first trial; hposvc's default plan imports it once before forking its worker
            processes, so it sits before their first trial instead);
  (fresh)   ``hposvc study run SPEC --data-dir NEW``, default flags (the plan it prints):
            the study database and the MLflow store are created by this run;
  (again)   the same spec under a new name, on the data dir (fresh) left: both exist
            (and the tracking process (fresh) started is still up, as after any study);
  (one)     (again) with ``--workers 1``: one process, as before plans existed;
  (script)  ``python plain.py``: Optuna (SQLite) + optuna-integration's ``MLflowCallback``
            (MLflow SQLite store) + a textbook ``DataLoader`` loop, one thread — what a user
            writes.

For the hposvc runs it reads the trials' start and end times from the study database:
launch → first trial starts, last trial ends → exit, and the process − the sum of its
trials; and checks that MLflow holds every trial run, ended, when the process exits. After
each hposvc run, outside the timing, it waits until the tracking process has made the
study's summary and plots (``_settle.py``), so that work does not slow the next run.

    python bench/bench_process.py [--repeats 3] [--trials 24]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _settle import stop_tracking, wait_for_tracking

SPEC = """\
[study]
name = "{name}"
task = "digits"
n_trials = {trials}
sampler = "random"
pruner = "median"
seed = 0

[train]
epochs = 8
batch_size = 64

[model]
depth = 2
width = 128

[space]
optimizer = "adam"
lr = {{ low = 1e-4, high = 1e-1, log = true }}
"""

PLAIN = '''\
import sys
import mlflow
import optuna
import torch
import torch.nn.functional as F
from optuna_integration.mlflow import MLflowCallback
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)
folder, n_trials = sys.argv[1], int(sys.argv[2])
x, y = load_digits(return_X_y=True)
x = torch.tensor(x / 16.0, dtype=torch.float32)
y = torch.tensor(y)
xt, xv, yt, yv = train_test_split(x, y, test_size=0.2, random_state=0)
callback = MLflowCallback(tracking_uri=f"sqlite:///{folder}/mlflow.db", metric_name="val_accuracy", create_experiment=True)


@callback.track_in_mlflow()
def objective(trial):
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True)
    for epoch in range(1, 9):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(xv)
            acc = (out.argmax(1) == yv).float().mean().item()
            mlflow.log_metrics({"val_loss": F.cross_entropy(out, yv).item(), "val_accuracy": acc}, step=epoch)
        trial.report(acc, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return acc


optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(storage=f"sqlite:///{folder}/optuna.db", direction="maximize", pruner=optuna.pruners.MedianPruner())
study.optimize(objective, n_trials=n_trials, callbacks=[callback])
'''


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, launch time.time(), stderr)."""
    launch, t0 = time.time(), time.perf_counter()
    p = subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - t0, launch, p.stderr


def _trials(data: Path, name: str) -> tuple[float, float, float]:
    """(sum of trial durations, first start, last end) as time.time() values."""
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{data / 'hposvc.db'}")
    done = [t for t in study.trials if t.duration is not None]
    return (
        sum(t.duration.total_seconds() for t in done),
        min(t.datetime_start.timestamp() for t in done),
        max(t.datetime_complete.timestamp() for t in done),
    )


def _mlflow_ended_trial_runs(data: Path, name: str) -> int:
    """Trial runs of study ``name`` MLflow holds, ended (read with sqlite3: no MLflow import)."""
    import sqlite3

    with sqlite3.connect(data / "mlflow.db") as con:
        return con.execute(
            "select count(*) from runs r join experiments e on r.experiment_id = e.experiment_id "
            "join tags t on t.run_uuid = r.run_uuid and t.key = 'hposvc.role' and t.value = 'trial' "
            "where e.name = ? and r.status != 'RUNNING'",
            (f"hposvc/{name}",),
        ).fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=24)
    args = parser.parse_args()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    hposvc = [sys.executable, "-m", "hposvc.cli"]
    best: dict[str, float] = {}
    stats: dict[str, dict[str, float]] = {}
    plan = ""
    complete: list[bool] = []

    def keep(kind: str, **values: float) -> None:
        for key, v in values.items():
            stats.setdefault(kind, {})[key] = min(stats.get(kind, {}).get(key, v), v)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "plain.py").write_text(PLAIN)
        try:
            for r in range(args.repeats):
                floor, _, _ = _timed([sys.executable, "-c", "import torch, optuna"], env)
                best["floor"] = min(best.get("floor", floor), floor)
                dynamo, _, _ = _timed([sys.executable, "-c", "import torch, optuna, torch._dynamo"], env)
                best["floor+dynamo"] = min(best.get("floor+dynamo", dynamo), dynamo)
                data = root / f"data{r}"
                for kind, name, extra in (("fresh", f"fresh{r}", []), ("again", f"again{r}", []), ("one", f"one{r}", ["--workers", "1"])):
                    spec = root / f"{name}.toml"
                    spec.write_text(SPEC.format(name=name, trials=args.trials))
                    wall, launch, err = _timed([*hposvc, "study", "run", str(spec), "--data-dir", str(data), "--quiet", *extra], env)
                    wait_for_tracking(root)  # the study's summary and plots, before the next timed run
                    exited = launch + wall
                    if kind == "again":
                        plan = next((line for line in err.splitlines() if line.startswith("plan:")), "")
                    complete.append(_mlflow_ended_trial_runs(data, name) == args.trials)
                    in_trials, first, last = _trials(data, name)
                    best[kind] = min(best.get(kind, wall), wall)
                    keep(kind, first=first - launch - floor, tail=exited - last, outside=wall - in_trials - floor, span=last - first)
                plain_dir = root / f"plain{r}"
                plain_dir.mkdir()
                env1 = {**env, "OMP_NUM_THREADS": "1"}
                wall, _, _ = _timed([sys.executable, str(root / "plain.py"), str(plain_dir), str(args.trials)], env1)
                best["script"] = min(best.get("script", wall), wall)
        finally:
            stop_tracking(root)
    f = best["floor"]
    d = best["floor+dynamo"] - f
    print(textwrap.dedent(f"""\
        {args.trials} digits trials, Adam, 8 epochs, median pruner; best of {args.repeats} interleaved repeats, {os.cpu_count()} CPUs (shared: ratios in one run)
        default {plan}
        floor: python -c "import torch, optuna"             {f:6.2f} s
        dynamo: what the first torch.optim step imports       {d:6.2f} s
        hand-written Optuna + MLflowCallback script          {best['script']:6.2f} s
        hposvc study run, existing data dir                  {best['again']:6.2f} s   script / hposvc {best['script'] / best['again']:5.2f}x  (goal >= 1.5x)
        hposvc study run, fresh data dir                     {best['fresh']:6.2f} s   script / hposvc {best['script'] / best['fresh']:5.2f}x  (goal >= 1.3x)
        hposvc study run --workers 1, existing data dir      {best['one']:6.2f} s   script / hposvc {best['script'] / best['one']:5.2f}x
        launch -> first trial starts - floor (existing; --workers 1)   {stats['again']['first']:5.2f} s; {stats['one']['first']:5.2f} s  (goal <= 0.3 s)
          the same, default plan, less the dynamo import it does before forking   {stats['again']['first'] - d:5.2f} s
        process - sum of trials - floor (--workers 1, existing; fresh)  {stats['one']['outside']:5.2f} s; {stats['fresh']['outside']:5.2f} s  (goal <= 0.5 s)
        last trial ends -> exit (existing; --workers 1; fresh)          {stats['again']['tail']:5.2f} s; {stats['one']['tail']:5.2f} s; {stats['fresh']['tail']:5.2f} s  (MLflow tail goal <= 1 s)
        span of the trials, first start -> last end (existing; --workers 1)  {stats['again']['span']:5.2f} s; {stats['one']['span']:5.2f} s
        MLflow held every trial run, ended, when study run exited: {'yes' if all(complete) else 'NO'} ({sum(complete)} of {len(complete)} runs of hposvc)"""))


if __name__ == "__main__":
    main()
