"""hposvc as a user meets it: the whole ``hposvc study run`` process, start to exit, against
the script a user would write by hand for the same study.

The study (as in issue 13): 24 digits trials, Adam with a log-uniform lr, 8 epochs, a
median pruner, an MLP 64-128-128-10, batch 64, one CPU thread. Three runs per repeat,
interleaved, best of ``--repeats``:

  (fresh)   ``hposvc study run SPEC --data-dir NEW`` — a new data dir: the study database
            and the MLflow store are created by this run;
  (again)   the same spec under a new name, on the data dir (fresh) left: both exist;
  (script)  ``python plain.py``: Optuna (SQLite) + optuna-integration's ``MLflowCallback``
            (MLflow SQLite store) + a textbook ``DataLoader`` loop, what a user writes.

For the hposvc runs it also prints the sum of the trials' durations (claim to result, from
the study database) and how much longer than that the whole process took.

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


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _in_trials(data: Path, name: str) -> float:
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{data / 'hposvc.db'}")
    return sum(t.duration.total_seconds() for t in study.trials if t.duration is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=24)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    hposvc = [sys.executable, "-m", "hposvc.cli"]
    best: dict[str, float] = {}
    over: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "plain.py").write_text(PLAIN)
        for r in range(args.repeats):
            data = root / f"data{r}"
            for kind, name in (("fresh", f"fresh{r}"), ("again", f"again{r}")):
                spec = root / f"{name}.toml"
                spec.write_text(SPEC.format(name=name, trials=args.trials))
                wall = _timed([*hposvc, "study", "run", str(spec), "--data-dir", str(data), "--quiet"], env)
                trials = _in_trials(data, name)
                best[kind] = min(best.get(kind, wall), wall)
                over[kind] = min(over.get(kind, wall - trials), wall - trials)
            plain_dir = root / f"plain{r}"
            plain_dir.mkdir()
            wall = _timed([sys.executable, str(root / "plain.py"), str(plain_dir), str(args.trials)], env)
            best["script"] = min(best.get("script", wall), wall)
    print(textwrap.dedent(f"""\
        {args.trials} digits trials, Adam, 8 epochs, median pruner; best of {args.repeats} interleaved repeats, {os.cpu_count()} CPUs
        hposvc study run, fresh data dir      {best['fresh']:6.2f} s   process - sum of trials: {over['fresh']:5.2f} s  (goal <= 3 s)
        hposvc study run, existing data dir   {best['again']:6.2f} s   process - sum of trials: {over['again']:5.2f} s  (goal <= 1.5 s)
        hand-written Optuna + MLflowCallback  {best['script']:6.2f} s
        script / hposvc (existing data dir)   {best['script'] / best['again']:5.2f}x  (goal >= 1.5x)
        script / hposvc (fresh data dir)      {best['script'] / best['fresh']:5.2f}x"""))


if __name__ == "__main__":
    main()
