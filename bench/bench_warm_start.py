"""Benchmark: does ``--warm-start`` pay off on tasks the recommendation never saw?

Measured on the survey's held-out tasks (``studies/survey/held-out/``), from a finished
survey run (``hposvc survey run``), expected over orderings of the trials rather than over a
handful of seeds:

1. Warm configurations: ``warm_start_configs(spec, storage=<survey db>)`` for the held-out
   task's spec — what ``hposvc study run --warm-start`` would queue. It reads the protocol
   studies only (held-out studies never feed a recommendation or a warm start).
2. The search without warm start: a random search over the held-out task's lr-sweep
   trials (every optimizer × 16 lr points; each trial ran once in the survey), so each
   ordering of those trials is one equally likely run of the search.
3. Target: 95 % of the best value any of those trials reached (accuracy; for a loss, the
   best value divided by 0.95).
4. Cold: expected trials to the first one at the target over uniformly random orderings
   of the P trials, M of which reach it: (P + 1) / (M + 1).
   Warm: the warm configurations first, each scored by its own run on the task (a sweep
   point at seed 0; the one-shot default lr is the mean over its default seeds); if the
   i-th reaches the target, i trials; else w + (P' + 1) / (M' + 1) over the rest.
5. The ratio cold / warm per task and overall; the goal is >= 2x. Printed honestly,
   whatever it is.

    PYTHONPATH=. python bench/bench_warm_start.py --data-dir /work/survey-data [--scale full] [--top 3]
    PYTHONPATH=. python bench/bench_warm_start.py --run-ci     # runs the CI-scale survey first (minutes)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

FRACTION = 0.95  # "good enough": 95 % of the best value found


def expected_first_hit(n_pool: int, n_hits: int) -> float:
    """Expected 1-based position of the first hit in a random ordering of ``n_pool`` items
    of which ``n_hits`` are hits (without replacement); n_pool + 1 when there is none."""
    return (n_pool + 1) / (n_hits + 1)


def _value_of(pool: Any, defaults: Any, optimizer: str, lr: float) -> tuple[float, str]:
    """The task's value of a warm configuration: its sweep run, or the mean of its
    default-seed runs; else the nearest sweep point in log lr (said in the second item)."""
    import numpy as np

    mine = pool[pool["optimizer"] == optimizer]
    hit = mine[np.isclose(mine["lr"], lr, rtol=1e-6)]
    if len(hit):
        return float(hit["value"].iloc[0]), "sweep run"
    d = defaults[(defaults["optimizer"] == optimizer) & np.isclose(defaults["lr"], lr, rtol=1e-6)]
    if len(d):
        return float(d["value"].mean()), f"default runs (mean of {len(d)} seeds)"
    nearest = mine.iloc[int(np.argmin(np.abs(np.log(mine["lr"].to_numpy()) - math.log(lr))))]
    return float(nearest["value"]), f"nearest sweep point lr={nearest['lr']:.3g}"


def bench(storage: str, *, scale: str = "full", top: int = 3) -> list[dict[str, Any]]:
    import pandas as pd

    from hposvc.recommendation import survey_frame, warm_start_configs
    from hposvc.recommendation._survey import _selected, protocol, SCALES

    df = survey_frame(storage, scale=scale)
    rows = []
    for task in [t for t in _selected(protocol(), SCALES[scale]) if t.held_out]:
        g = df[df["task"] == task.name]
        pool, defaults = g[~g["at_defaults"]], g[g["at_defaults"]]
        maximize = g["direction"].iloc[0] == "maximize"
        values = pool["value"].astype(float).fillna(-math.inf if maximize else math.inf)
        best = values.max() if maximize else values.min()
        target = FRACTION * best if maximize else best / FRACTION
        reached = values >= target if maximize else values <= target
        cold = expected_first_hit(len(pool), int(reached.sum()))

        configs = warm_start_configs(task.spec, storage=storage, top=top)
        warm, used, queue = None, set(), []
        for i, c in enumerate(configs, start=1):
            value, how = _value_of(pool, defaults, c.optimizer, float(c.lr))
            queue.append(f"{c.optimizer} lr={c.lr:.3g} -> {value:.4f} ({how})")
            mask = (pool["optimizer"] == c.optimizer) & (abs(pool["lr"] - c.lr) <= 1e-6 * c.lr)
            used |= set(pool.index[mask])
            if warm is None and (value >= target if maximize else value <= target):
                warm = float(i)
        if warm is None:
            rest = reached.drop(index=list(used))
            warm = len(configs) + expected_first_hit(len(rest), int(rest.sum()))
        rows.append(
            {
                "task": task.name,
                "metric": g["metric"].iloc[0],
                "best": float(best),
                "target": float(target),
                "pool": len(pool),
                "reaching": int(reached.sum()),
                "cold": cold,
                "warm": warm,
                "ratio": cold / warm,
                "queue": queue,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, help="data dir of a finished survey run")
    ap.add_argument("--scale", default="full", choices=["ci", "full"])
    ap.add_argument("--top", type=int, default=3, help="warm configurations queued (the CLI queues 3)")
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
        rows = bench(f"sqlite:///{data / 'hposvc.db'}", scale=args.scale, top=args.top)

    for r in rows:
        print(
            f"{r['task']} ({r['metric']}): best {r['best']:.4f}, target {r['target']:.4f}; {r['reaching']} of {r['pool']} "
            f"sweep trials reach it. Expected trials to the target: without warm start {r['cold']:.2f}, "
            f"with warm start {r['warm']:.2f} -> {r['ratio']:.2f}x"
        )
        for q in r["queue"]:
            print(f"    warm: {q}")
    cold = sum(r["cold"] for r in rows) / len(rows)
    warm = sum(r["warm"] for r in rows) / len(rows)
    ratio = cold / warm
    geo = math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
    print(
        f"held-out mean: without warm start {cold:.2f} trials, with warm start {warm:.2f}; "
        f"{ratio:.2f}x fewer (geometric mean of the per-task ratios {geo:.2f}x; goal >= 2x: "
        f"{'met' if ratio >= 2 else 'NOT met'}; per task: {', '.join(f'{r['task']} {r['ratio']:.2f}x' for r in rows)})"
    )


if __name__ == "__main__":
    main()
