"""The recommendation's statistics on constructed trial sets (issue 14): "no detectable
difference" when that is the truth, a real gap found, only complete comparisons ranked,
budgets never beyond the trials that ran, defaults as their own point, profiles on
epochs to target, numbers from a shared grid.

Real computation, seeded, no mocks; fewer bootstrap resamples than the default (400: the
step-down's p-values have a resolution of 1/401, far finer than α = 0.05)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hposvc.config import TrialConfig
from hposvc.recommendation import recommend_from_frame

OPTIMIZERS = ["sgd", "momentum", "nesterov", "adagrad", "adadelta", "rmsprop", "adam", "adamw"]
N_BOOT = 400
REPEATS = 30


def _frame(means: dict[str, float], *, n_tasks: int, n_trials: int, sd: float = 0.03, seed: int = 0) -> pd.DataFrame:
    """Random-search-like trials: lr log-uniform over 2 decades around the default, the
    accuracy the optimizer's mean + the task's difficulty + noise (lr does not matter)."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(n_tasks):
        base = rng.uniform(-0.05, 0.05)
        for opt, mu in means.items():
            cfg = TrialConfig(optimizer=opt).to_dict()
            for _ in range(n_trials):
                rows.append(
                    {
                        **cfg,
                        "lr": float(cfg["lr"] * 10 ** rng.uniform(-1, 1)),
                        "task": f"task{t}",
                        "metric": "val_accuracy",
                        "direction": "maximize",
                        "value": float(np.clip(mu + base + rng.normal(0, sd), 0, 1)),
                    }
                )
    return pd.DataFrame(rows)


def test_balanced_null_frames_say_no_detectable_difference() -> None:
    no_best = tied_all = 0
    for seed in range(REPEATS):
        df = _frame(dict.fromkeys(OPTIMIZERS, 0.85), n_tasks=4, n_trials=8, seed=seed)
        rec = recommend_from_frame(df, n_bootstrap=N_BOOT, seed=seed)
        no_best += rec.best is None
        tied_all += sorted(rec.tied) == sorted(OPTIMIZERS)
        if rec.best is None:
            assert rec.summary.startswith("No detectable difference among ") and rec.config is None
            assert f"at a budget of {rec.budget} trials over 4 tasks" in rec.summary
            assert rec.tied[0] == rec.table.iloc[0]["optimizer"]  # the top first
    assert no_best >= 28, f"a best optimizer was named in {REPEATS - no_best} of {REPEATS} null frames"
    assert tied_all >= 28, f"tied listed all 8 in only {tied_all} of {REPEATS} null frames"


def test_a_real_gap_is_found_every_time() -> None:
    for seed in range(REPEATS):
        means = dict.fromkeys(OPTIMIZERS, 0.85) | {"adam": 0.93}
        rec = recommend_from_frame(_frame(means, n_tasks=4, n_trials=8, seed=seed), n_bootstrap=N_BOOT, seed=seed)
        assert rec.best == "adam", f"seed {seed}: {rec.summary}"
        assert rec.tied == [] and rec.summary.startswith("Use adam by default (lr=")
        d = rec.decision
        assert d["top"] == "adam" and d["low"] > 0 and d["difference"] > 0
        assert rec.config is not None and rec.config.optimizer == "adam"


@pytest.mark.parametrize("seed", range(6))
def test_an_optimizer_measured_on_one_task_is_never_ranked_above_one_measured_on_all(seed: int) -> None:
    df = _frame({"sgd": 0.80, "momentum": 0.84, "adam": 0.86}, n_tasks=4, n_trials=8, seed=seed)
    lucky = _frame({"nadam": 0.99}, n_tasks=1, n_trials=8, seed=seed)  # one task, far ahead there
    rec = recommend_from_frame(pd.concat([df, lucky], ignore_index=True), n_bootstrap=N_BOOT, seed=seed)
    table = rec.table.set_index("optimizer")
    assert table.at["nadam", "status"] == "incomplete"
    assert np.isnan(table.at["nadam", "score"]) and np.isnan(table.at["nadam", "rank"])
    assert table.at["nadam", "partial_score"] > 0.9 and table.at["nadam", "n_tasks"] == 1  # reported, apart
    ranked = rec.table["optimizer"].tolist()
    assert ranked.index("nadam") > max(ranked.index(o) for o in ("sgd", "momentum", "adam"))
    assert rec.best != "nadam" and "nadam" not in rec.tied
    assert set(rec.decision["tasks"]) == {f"task{t}" for t in range(4)}  # no task dropped for it
    assert "Not ranked, measured on only some of the 4 tasks: nadam (1 of 4)" in rec.summary


def test_budgets_never_go_beyond_the_trials_that_ran() -> None:
    df = _frame({"sgd": 0.80, "adam": 0.86}, n_tasks=3, n_trials=6)
    rec = recommend_from_frame(df, n_bootstrap=N_BOOT)
    assert rec.budget == 3  # default: half the fewest trials of a ranked pair
    assert rec.budget_curves.groupby(["task", "optimizer"])["n"].max().eq(6).all()
    # Asking for more trials than any pair ran is said, not extrapolated.
    rec = recommend_from_frame(df, budget=7, n_bootstrap=N_BOOT)
    assert rec.best is None and rec.table["status"].eq("insufficient data").all()
    assert rec.summary.startswith("No recommendation: insufficient data (no task has at least two optimizers with >= 7")


def test_one_shot_defaults_are_their_own_point_not_part_of_the_search() -> None:
    df = _frame({"sgd": 0.80, "momentum": 0.84, "adam": 0.86}, n_tasks=3, n_trials=8)
    rng = np.random.default_rng(1)
    runs = []
    for t in range(3):
        for opt, acc in (("sgd", 0.70), ("momentum", 0.78), ("adam", 0.83)):
            for seed in range(3):  # the defaults over 3 seeds
                runs.append({**TrialConfig(optimizer=opt, seed=seed).to_dict(), "task": f"task{t}", "metric": "val_accuracy",
                             "direction": "maximize", "value": acc + rng.normal(0, 0.005), "at_defaults": True})
    rec = recommend_from_frame(pd.concat([df, pd.DataFrame(runs)], ignore_index=True), n_bootstrap=N_BOOT)
    assert rec.budget_curves.groupby(["task", "optimizer"])["n"].max().eq(8).all()  # 8 search trials, not 11
    d = rec.defaults.set_index(["task", "optimizer"])
    assert d["n_runs"].eq(3).all() and d.at[("task0", "adam"), "mean"] == pytest.approx(0.83, abs=0.01)
    assert d.at[("task0", "adam"), "sd"] < 0.02
    default_score = rec.table.set_index("optimizer")["default_score"]
    assert default_score["adam"] > default_score["momentum"] > default_score["sgd"]
    assert "At one-shot defaults the top is adam" in rec.summary
    # Replicated configurations measure the seed noise of each task.
    assert rec.anchors["noise"].between(0.001, 0.02).all()


def test_floor_column_and_reference_anchor_the_scale() -> None:
    df = _frame({"sgd": 0.80, "adam": 0.86, "rmsprop": 0.84}, n_tasks=3, n_trials=6)
    rec = recommend_from_frame(df.assign(floor=0.1), n_bootstrap=0)  # chance level of 10 classes
    assert rec.anchors["floor"].eq(0.1).all() and rec.anchors["floor_source"].eq("given").all()
    best_known = df.groupby("task")["value"].max()
    np.testing.assert_allclose(rec.anchors.set_index("task")["best"], best_known)
    ts = rec.task_scores.set_index(["task", "optimizer"])
    want = (ts.at[("task1", "adam"), "expected_best"] - 0.1) / (best_known["task1"] - 0.1)
    assert ts.at[("task1", "adam"), "score"] == pytest.approx(want)
    # n_bootstrap=0: no intervals, so nobody is named best.
    assert rec.best is None and "n_bootstrap=0" in rec.summary
    ref = recommend_from_frame(df, reference="sgd", n_bootstrap=0)
    assert ref.anchors["floor_source"].eq("sgd at budget").all()
    assert ref.table.set_index("optimizer").at["sgd", "score"] == 0.0


def test_performance_profiles_use_epochs_to_target() -> None:
    # Two optimizers on 2 tasks with per-epoch curves: fast reaches the target (0.9 of the
    # way from the floor 0.5 to the best 0.95, i.e. 0.905) at epoch 2, slow at epoch 4.
    rows = []
    for t in ("t1", "t2"):
        for opt, curve in (("adam", [0.6, 0.92, 0.94, 0.95]), ("sgd", [0.55, 0.7, 0.85, 0.93])):
            for k in range(4):
                rows.append({"task": t, "optimizer": opt, "value": curve[-1] - 0.001 * k, "direction": "maximize",
                             "metric": "val_accuracy", "floor": 0.5, "curve": curve, "lr": 1e-3 * (k + 1)})
    rec = recommend_from_frame(pd.DataFrame(rows), budget=2, n_bootstrap=N_BOOT)
    ts = rec.task_scores.set_index(["task", "optimizer"])
    assert ts.at[("t1", "adam"), "cost"] == 2 and ts.at[("t1", "sgd"), "cost"] == 4
    area = rec.table.set_index("optimizer")["profile_area"]
    assert area["adam"] == pytest.approx(1.0) and area["sgd"] == pytest.approx((4 - 2) / 3)
    prof = rec.profiles.pivot(index="tau", columns="optimizer", values="rho")
    assert prof.loc[1.0, "adam"] == 1.0 and prof.loc[1.0, "sgd"] == 0.0 and prof.loc[2.0, "sgd"] == 1.0
    # Without per-epoch data there is no ratio to take: no profile, not final-error ratios.
    plain = recommend_from_frame(pd.DataFrame(rows).drop(columns="curve"), budget=2, n_bootstrap=0)
    assert plain.profiles.empty and plain.table["profile_area"].isna().all()


def test_recommended_lr_is_the_grid_point_best_across_tasks_with_loto_regret() -> None:
    # An lr sweep on a shared grid; the anchored score peaks at 1e-3 on three tasks and at
    # 3e-3 on the fourth.
    grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    peaks = {"t0": 1e-3, "t1": 1e-3, "t2": 1e-3, "t3": 3e-3}
    rows = []
    for t, peak in peaks.items():
        for opt in ("adam", "sgd"):
            for lr in grid:
                acc = 0.9 - 0.05 * abs(np.log10(lr / peak)) - (0.02 if opt == "sgd" else 0.0)
                for seed in range(2):
                    rows.append({**TrialConfig(optimizer=opt, lr=lr, seed=seed).to_dict(), "task": t, "value": acc,
                                 "direction": "maximize", "metric": "val_accuracy", "floor": 0.5})
    rec = recommend_from_frame(pd.DataFrame(rows), budget=5, n_bootstrap=0)
    adam = rec.numbers["adam"]
    assert adam["lr"] == 1e-3 and adam["grid"] == "lr: the runs' shared grid" and adam["grid_tasks"] == 4
    # Leaving out t3 still picks 1e-3, which loses 0.05·log10(3) there (on t3's scale, whose
    # floor is 0.5 and best 0.9); leaving out any other task also picks 1e-3: no loss.
    assert adam["loto_regret"] == pytest.approx(0.05 * np.log10(3) / 0.4 / 4)
    assert adam["beta1"] == 0.9 and adam["schedule"] == "constant"  # not searched: as run
    json.dumps(rec.to_dict(), allow_nan=False)


def test_random_search_lr_is_rounded_to_half_decades_inside_what_ran() -> None:
    rec = recommend_from_frame(_frame({"sgd": 0.80, "adam": 0.86}, n_tasks=3, n_trials=12), n_bootstrap=0)
    lr = rec.numbers["adam"]["lr"]
    ran = _frame({"sgd": 0.80, "adam": 0.86}, n_tasks=3, n_trials=12).query("optimizer == 'adam'")["lr"]
    assert ran.min() <= lr <= ran.max() and rec.numbers["adam"]["grid"] == "lr: half-decades"
    half_decade = 10 ** (np.round(2 * np.log10(lr)) / 2)
    assert lr == pytest.approx(float(f"{half_decade:.3g}")) or lr in set(ran)  # a grid point, or clipped to a run


def test_friedman_and_holm_corrected_tests_against_the_top_are_reported() -> None:
    means = {"sgd": 0.80, "momentum": 0.83, "adam": 0.90}
    rec = recommend_from_frame(_frame(means, n_tasks=6, n_trials=8), n_bootstrap=N_BOOT)
    assert rec.friedman["p"] < 0.05 and rec.friedman["n_tasks"] == 6
    t = rec.table.set_index("optimizer")
    assert np.isnan(t.at["adam", "p_wilcoxon_holm"])
    # 6 tasks, adam ahead on all: the exact two-sided signed-rank p is 2/64, Holm ×2.
    assert t.at["sgd", "p_wilcoxon_holm"] == pytest.approx(2 * 2 / 64)
    assert (t.loc[["sgd", "momentum"], "p_adj"] <= 0.05).all() and rec.best == "adam"


# -- a decision per kind of model (issue 19) ---------------------------------------------------

KIND_REPEATS = 10


def _kinds_frame(means_by_kind: dict[str, dict[str, float]], *, n_tasks: int, n_trials: int = 8, seed: int = 0) -> pd.DataFrame:
    """One _frame per kind, its tasks named after the kind, with a ``kind`` column."""
    parts = []
    for i, (kind, means) in enumerate(means_by_kind.items()):
        f = _frame(means, n_tasks=n_tasks, n_trials=n_trials, seed=seed * 10 + i)
        parts.append(f.assign(task=kind + "-" + f["task"], kind=kind))
    return pd.concat(parts, ignore_index=True)


def test_per_kind_null_frames_name_no_best_and_a_real_gap_in_one_kind_is_found_there() -> None:
    null = dict.fromkeys(OPTIMIZERS, 0.85)
    gap = null | {"sgd": 0.70}  # attention-like: sgd far behind, the rest tied
    for seed in range(KIND_REPEATS):
        df = _kinds_frame({"mlp": null, "transformer": gap}, n_tasks=4, seed=seed)
        mlp = recommend_from_frame(df, kind="mlp", n_bootstrap=N_BOOT, seed=seed)
        assert mlp.best is None and mlp.kind == "mlp" and set(mlp.decision["tasks"]) == {f"mlp-task{t}" for t in range(4)}
        assert "sgd" in mlp.tied or mlp.decision["top"] != "sgd"  # nothing detectably apart in the null kind
        tr = recommend_from_frame(df, kind="transformer", n_bootstrap=N_BOOT, seed=seed)
        rows = tr.table.set_index("optimizer")
        assert not rows.at["sgd", "tied"] and rows.at["sgd", "diff_low"] > 0, f"seed {seed}: {tr.summary}"
        assert tr.summary.startswith("On transformer tasks: no detectable difference among ")
        assert tr.kinds["transformer"]["behind"] == ["sgd"] and tr.kinds["transformer"]["status"] == "decided"
        # without a kind: the same decisions per kind, and the summary says how they differ
        overall = recommend_from_frame(df, n_bootstrap=N_BOOT, seed=seed)
        assert set(overall.kinds) == {"mlp", "transformer"}
        assert overall.kinds["transformer"]["behind"] == ["sgd"]
        assert "on transformer tasks (4, budget 4): no detectable difference among " in overall.summary
        assert "ahead of sgd by " in overall.kinds["transformer"]["summary"] and overall.kinds["transformer"]["summary"].startswith("On transformer tasks (4, budget 4): ")
        # a kind that cannot tell sgd apart does not contradict one that can
        assert "The kinds of model do not contradict each other" in overall.summary


def test_kinds_that_reverse_each_other_are_said_to_disagree() -> None:
    base = dict.fromkeys(["sgd", "momentum", "adam", "adamw"], 0.85)
    df = _kinds_frame({"resnet": base | {"adam": 0.70, "adamw": 0.70}, "transformer": base | {"sgd": 0.70, "momentum": 0.70}}, n_tasks=4)
    rec = recommend_from_frame(df, n_bootstrap=N_BOOT)
    assert set(rec.kinds["resnet"]["behind"]) == {"adam", "adamw"} and set(rec.kinds["transformer"]["behind"]) == {"momentum", "sgd"}
    assert "The kinds of model disagree (momentum, sgd lead on resnet tasks but detectably behind on transformer tasks, where adam, adamw lead)" in rec.summary


def test_a_kind_with_too_few_tasks_says_so_and_budgets_beyond_its_trials_are_refused() -> None:
    df = _kinds_frame({"mlp": dict.fromkeys(OPTIMIZERS, 0.85), "linear": {"sgd": 0.5, "adam": 0.9}}, n_tasks=3)
    df = df[(df["kind"] == "mlp") | (df["task"] == "linear-task0")]  # one linear task, adam far ahead on it
    rec = recommend_from_frame(df, kind="linear", n_bootstrap=N_BOOT)
    assert rec.best is None and rec.tied == [] and rec.config is None
    assert rec.decision["status"] == "too few tasks"
    assert rec.summary.startswith("Too few linear tasks to decide: 1 task (a decision for a kind of model needs at least 2")
    assert rec.table.set_index("optimizer").at["adam", "score"] > rec.table.set_index("optimizer").at["sgd", "score"]  # still measured
    overall = recommend_from_frame(df, n_bootstrap=N_BOOT)
    assert overall.kinds["linear"]["status"] == "too few tasks" and "on linear tasks (1): too few to decide" in overall.summary
    # k > N within a kind: said, not extrapolated
    rec = recommend_from_frame(df, kind="mlp", budget=9, n_bootstrap=N_BOOT)
    assert rec.best is None and rec.table["status"].eq("insufficient data").all()
    assert rec.summary.startswith("No recommendation: insufficient data (no task has at least two optimizers with >= 9")


def test_an_unknown_kind_names_the_kinds_the_trials_record() -> None:
    from hposvc.errors import InvalidInputError

    df = _kinds_frame({"mlp": {"sgd": 0.8, "adam": 0.9}, "cnn": {"sgd": 0.8, "adam": 0.9}}, n_tasks=2, n_trials=4)
    with pytest.raises(InvalidInputError) as e:
        recommend_from_frame(df, kind="transformer", n_bootstrap=0)
    assert "'kind'" in str(e.value) and "'transformer'" in str(e.value) and "one of 'cnn', 'mlp'" in str(e.value)
    with pytest.raises(InvalidInputError, match="they record none"):
        recommend_from_frame(df.drop(columns="kind"), kind="mlp", n_bootstrap=0)
