"""Benchmark: does a warm start pay off on tasks the recommendation never saw?

Measured on the survey's held-out tasks (``studies/survey/held-out/``) from a finished
survey run (``hposvc survey run``), for every method of
:mod:`hposvc.recommendation._warm_eval` (random search; the shortlist over every protocol
task; the shortlist over the held-out task's kind; Perrone et al. 2019's narrowed search
space, over every task and over the kind; Optuna's warm-started CMA-ES): the expected
number of trials until one reaches 95 % of the best value in the task's lr-sweep pool, and
random search's trials divided by the method's, per task and as a geometric mean. The same
table is in ``studies/survey/RESULTS.md``; the goal is >= 2x. Printed honestly, whatever
it is.

    PYTHONPATH=. python bench/bench_warm_start.py --data-dir /work/survey-data [--scale full]
    PYTHONPATH=. python bench/bench_warm_start.py --run-ci     # runs the CI-scale survey first (minutes)
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any


def bench(storage: str, *, scale: str = "full") -> dict[str, Any]:
    from hposvc.recommendation import survey_frame
    from hposvc.recommendation._warm_eval import evaluate_warm_starts

    df = survey_frame(storage, scale=scale)
    return evaluate_warm_starts(df[~df["held_out"]], df[df["held_out"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, help="data dir of a finished survey run")
    ap.add_argument("--scale", default="full", choices=["ci", "full"])
    ap.add_argument("--run-ci", action="store_true", help="run the CI-scale survey into a temp dir first")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory(prefix="hposvc-bench-warm-") as tmp:
        data = args.data_dir
        if args.run_ci:
            from hposvc.recommendation import run_survey

            data, args.scale = Path(tmp) / "survey", "ci"
            run_survey(scale="ci", data_dir=data)
        if data is None:
            ap.error("give --data-dir of a finished survey run, or --run-ci")
        ev = bench(f"sqlite:///{data / 'hposvc.db'}", scale=args.scale)

    methods = ev["methods"]
    print("held-out task (kind): expected trials to the target (random / method)")
    for t in ev["tasks"]:
        cells = ", ".join(f"{m} {t['trials'][m]:.2f} ({t['ratio'][m]:.2f}x)" for m in methods)
        print(f"  {t['task']} ({t['kind']}; {t['reaching']} of {t['pool']} sweep trials reach {t['target']:.4g}): {cells}")
    geo = ", ".join(f"{m} {ev['geometric_mean'][m]:.2f}x" for m in methods)
    best = ev["best"]
    print(f"geometric mean of the ratios: {geo}")
    print(f"best: {best} ({ev['geometric_mean'][best]:.2f}x; goal >= 2x: {'met' if ev['geometric_mean'][best] >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
