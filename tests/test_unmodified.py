"""Tune an existing script without editing it: its own flags, its own output.

The scripts here imitate third-party training scripts (PyTorch's word-language-model
example, Keras's fit log with tqdm-style \\r progress bars and ANSI colours). Each runs
unmodified as a command study on real SQLite and MLflow stores, and each trial's MLflow
history must equal what the script printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from hposvc.cli import main
from hposvc.tracking import experiment_name

# Prints what it prints into printed.json too, so the test can compare with MLflow.
WORD_LM = r'''
import argparse, json, math, sys, time
p = argparse.ArgumentParser(description="PyTorch Wikitext-2 RNN/LSTM Language Model")
p.add_argument("--lr", type=float, default=20)
p.add_argument("--dropout", type=float, default=0.2)
p.add_argument("--epochs", type=int, default=40)
p.add_argument("--tied", action="store_true")
args = p.parse_args()
printed = {"valid_loss": [], "valid_ppl": [], "loss": []}
for epoch in range(1, args.epochs + 1):
    for batch in (200, 400):
        loss = 7.0 - 0.5 * epoch - batch / 1000 + args.dropout
        printed["loss"].append((epoch, round(loss, 2)))
        print("| epoch {:3d} | {:5d}/ 2983 batches | lr {:02.2f} | ms/batch {:5.2f} | loss {:5.2f} | ppl {:8.2f}".format(
            epoch, batch, args.lr, 12.5, loss, math.exp(loss)))
    val_loss = 6.0 - 0.3 * epoch + args.dropout - (0.1 if args.tied else 0.0)
    print("-" * 89)
    print("| end of epoch {:3d} | time: {:5.2f}s | valid loss {:5.2f} | valid ppl {:8.2f}".format(
        epoch, 1.5, val_loss, math.exp(val_loss)))
    print("-" * 89)
    printed["valid_loss"].append((epoch, round(val_loss, 2)))
    printed["valid_ppl"].append((epoch, round(math.exp(val_loss), 2)))
print("=" * 89)
print("| End of training | test loss {:5.2f} | test ppl {:8.2f}".format(5.0, math.exp(5.0)))
json.dump(printed, open("printed-lm.json", "w"))
'''

# Keras's fit log: a \r-redrawn progress bar per epoch (to stderr, as tqdm does), colours,
# and values in scientific notation with signs.
KERAS = r'''
import json, sys
GREEN, RESET = "\x1b[32m", "\x1b[0m"
printed = {"val_loss": [], "loss": []}
for epoch in range(1, 4):
    print(f"Epoch {epoch}/3")
    for step in range(1, 11):
        sys.stderr.write(f"\r{step * 10:3d}%|{'#' * step}{' ' * (10 - step)}| {step}/10 [00:00<00:00, loss={1.2e-05 * step:.2e}]")
    sys.stderr.write("\n")
    loss, val_loss = -7.5e-05 * epoch, 0.8912 / epoch
    printed["loss"].append((epoch, float(f"{loss:.4g}")))
    printed["val_loss"].append((epoch, float(f"{val_loss:.4f}")))
    print(f"10/10 [==============================] - 0s 1ms/step - {GREEN}loss: {loss:.4g}{RESET} - val_loss: {val_loss:.4f}")
json.dump(printed, open("printed-keras.json", "w"))
'''

SPECS = {
    "lm": f"""
[study]
name = "lm"
command = ["{sys.executable}", "main.py", "--lr={{lr}}", "--dropout={{dropout}}", "--epochs=3", "{{tied?--tied}}"]
metric = "valid_loss"
n_trials = 2
sampler = "grid"
pruner = "none"
[space]
optimizer = "sgd"
lr = 20.0
[space.params]
dropout = [0.2, 0.5]
tied = true
[metrics]
valid_loss = 'valid loss\\s+([-+0-9.eE]+)'
valid_ppl = 'valid ppl\\s+([-+0-9.eE]+)'
loss = '\\|\\s+loss\\s+([-+0-9.eE]+)'
epoch = 'epoch\\s+(\\d+)\\s+\\|'
""",
    "keras": f"""
[study]
name = "keras"
command = ["{sys.executable}", "fit.py"]
metric = "val_loss"
n_trials = 1
pruner = "none"
[metrics]
val_loss = 'val_loss:\\s*([-+0-9.eE]+)'
loss = '(?<!val_)loss:\\s*([-+0-9.eE]+)'
epoch = '^Epoch (\\d+)/\\d+'
""",
}


def _history(uri: str, name: str) -> dict[int, dict[str, list[tuple[int, float]]]]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name(name))
    out = {}
    for run in client.search_runs([exp.experiment_id], "tags.`hposvc.role` = 'trial'"):
        keys = [k for k in run.data.metrics if not k.startswith("final_") and k != "n_params"]
        out[int(run.data.tags["hposvc.trial_number"])] = {
            k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys
        }
    return out


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir (SQLite and MLflow stores) for the module's studies: the stores are
    created and migrated once, not per test; each study has a name of its own."""
    return tmp_path_factory.mktemp("data")


@pytest.mark.slow
@pytest.mark.parametrize("style", ["lm", "keras"])
def test_an_unmodified_script_s_output_is_the_trial_s_history(tmp_path: Path, shared_data: Path, style: str) -> None:
    (tmp_path / "main.py").write_text(WORD_LM)
    (tmp_path / "fit.py").write_text(KERAS)
    spec = tmp_path / f"{style}.toml"
    spec.write_text(SPECS[style])  # no task: the script loads its own data
    data = shared_data
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet"])
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name=style, storage=f"sqlite:///{data / 'hposvc.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * len(trials)
    history = _history(f"sqlite:///{data / 'mlflow.db'}", style)
    printed_by_dropout = {}
    for t in trials:
        # the script overwrites its record each run: run order is trial order here (one worker)
        printed = {k: [tuple(p) for p in v] for k, v in json.loads((tmp_path / f"printed-{style}.json").read_text()).items()} if t == trials[-1] else None
        metric = "valid_loss" if style == "lm" else "val_loss"
        # the pruner saw each report as printed; MLflow's history holds every printed value
        assert sorted(t.intermediate_values.items()) == history[t.number][metric]
        assert t.value == history[t.number][metric][-1][1]
        if printed is not None:
            assert {k: history[t.number].get(k) for k in printed} == {k: [pytest.approx(v) for v in sorted(vs)] for k, vs in printed.items()}
        printed_by_dropout[t.params.get("dropout")] = t.value
    if style == "lm":  # the script received the trial's flags
        assert printed_by_dropout[0.5] == pytest.approx(printed_by_dropout[0.2] + 0.3)


@pytest.mark.slow
def test_a_metric_that_never_appears_fails_the_trial_with_the_last_lines(tmp_path: Path, shared_data: Path) -> None:
    (tmp_path / "fit.py").write_text(KERAS)
    spec = tmp_path / "never.toml"
    # a grid of one point: the study ends after its one trial whatever became of it
    text = SPECS["keras"].replace('name = "keras"', 'name = "never"\nsampler = "grid"').replace("val_loss:\\s*", "validation loss=\\s*")
    spec.write_text(text)
    data = shared_data
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet"])
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="never", storage=f"sqlite:///{data / 'hposvc.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL"]  # not retried: it would fail the same way
    reason = trials[0].user_attrs["hposvc.reason"]
    assert "val_loss never appeared in the output" in reason, reason
    assert "val_loss: 0.2971" in reason  # the output's last lines, colours removed
