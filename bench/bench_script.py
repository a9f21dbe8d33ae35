"""Time a script trial's overhead: hposvc.script.run against the same command run by hand.

Per trial, hposvc renders the command, starts it in its own process group, reads stdout a
line at a time, parses each metric line, calls ``on_metrics`` (here a no-op: the cost of
Optuna and MLflow writes is the trainer's, measured by bench_study.py), saves stdout and
stderr to files, and checks that no process of the group is left. "By hand" is
``subprocess.run(command, capture_output=True)``: the least a caller could do.

Scripts (no training, so the overhead is all there is to see):

- python: ``from hposvc.script import report``, then ``--epochs`` reports;
- python print: the same script printing the same lines with ``print`` (what importing
  ``hposvc.script`` in a user's script costs, by hand both);
- awk: ``--lines`` metric lines and nothing else (the per-line parsing cost).

Runs are interleaved (hposvc, by hand, hposvc, ...) after one warm-up each, so drifts in
machine load hit both; the best of the repeats is reported.

    python bench/bench_script.py [--repeats 15] [--epochs 20] [--lines 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hposvc.config import TrialConfig  # noqa: E402
from hposvc.script import render, run  # noqa: E402

REPORT_SCRIPT = """\
import sys
from hposvc.script import report
epochs = int(sys.argv[1].split("=")[1])
for epoch in range(1, epochs + 1):
    report(epoch, val_accuracy=0.5 + epoch / 1000, val_loss=1 / epoch)
"""
PRINT_SCRIPT = """\
import json, sys
epochs = int(sys.argv[1].split("=")[1])
for epoch in range(1, epochs + 1):
    print("hposvc: " + json.dumps({"epoch": epoch, "val_accuracy": 0.5 + epoch / 1000, "val_loss": 1 / epoch}), flush=True)
"""
AWK = 'BEGIN { for (e = 1; e <= %d; e++) printf "hposvc: {\\"epoch\\": %%d, \\"val_accuracy\\": %%.4f, \\"val_loss\\": %%.4f}\\n", e, e / 1e4, 1 / e }'


def by_hand(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, capture_output=True, check=True)
    return time.perf_counter() - t0


def with_hposvc(template: list[str], config: TrialConfig, cwd: Path, env: dict[str, str], log_dir: Path, expect: int) -> float:
    t0 = time.perf_counter()
    result = run(render(template, config), cwd=cwd, env=env, on_metrics=lambda epoch, metrics: False, log_dir=log_dir)
    elapsed = time.perf_counter() - t0
    assert result.status == "completed" and len(result.epochs) == expect, result
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=20, help="reports by the Python script")
    parser.add_argument("--lines", type=int, default=2000, help="metric lines printed by the awk script")
    args = parser.parse_args()

    env = dict(os.environ)
    config = TrialConfig(optimizer="adam", epochs=args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "report.py").write_text(REPORT_SCRIPT)
        (cwd / "print.py").write_text(PRINT_SCRIPT)
        cases = [  # name, command template, by-hand command, metric lines
            ("python report()", [sys.executable, "report.py", "--epochs={epochs}"], [sys.executable, "report.py", f"--epochs={args.epochs}"], args.epochs),
            ("python print", [sys.executable, "print.py", "--epochs={epochs}"], [sys.executable, "print.py", f"--epochs={args.epochs}"], args.epochs),
            # a command template doubles awk's braces: {name} there is a TrialConfig field
            ("awk", ["awk", (AWK % args.lines).replace("{", "{{").replace("}", "}}")], ["awk", AWK % args.lines], args.lines),
        ]
        print(f"{args.repeats} interleaved repeats, best of each; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}")
        print(f"{'script':<18} {'lines':>6} {'by hand ms':>11} {'hposvc ms':>10} {'overhead ms':>12} {'ratio':>6} {'us/line':>8}")
        hand_report = hand_print = 0.0
        for name, template, command, lines in cases:
            log_dir = cwd / "log"
            by_hand(command, cwd, env)  # warm-up: page cache, .pyc files
            with_hposvc(template, config, cwd, env, log_dir, lines)
            hand, ours = [], []
            for _ in range(args.repeats):
                ours.append(with_hposvc(template, config, cwd, env, log_dir, lines))
                hand.append(by_hand(command, cwd, env))
            h, o = min(hand) * 1e3, min(ours) * 1e3
            hand_report = h if name == "python report()" else hand_report
            hand_print = h if name == "python print" else hand_print
            print(f"{name:<18} {lines:>6} {h:>11.1f} {o:>10.1f} {o - h:>12.1f} {o / h:>6.2f} {(o - h) * 1e3 / lines:>8.1f}")
        print(f"`from hposvc.script import report` in the script: +{hand_report - hand_print:.1f} ms by hand (report() vs print)")


if __name__ == "__main__":
    main()
