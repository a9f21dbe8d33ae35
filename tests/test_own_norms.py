"""The user's own normalisation classes (nanoGPT's LayerNorm, LLaMA's and Hugging Face's
RMSNorm, detectron2's and timm's LayerNorm2d: tests/own_norms.py) are found, swapped for
every norm kind and reported; ``rms`` is a norm kind of the built-in families."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from torch import nn

import hposvc
from hposvc.cli import main
from hposvc.config import NORMS, TrialConfig
from hposvc.errors import InvalidInputError
from hposvc.nn import ChannelsFirst, ChannelsLast, MapRMSNorm, convert, convert_with_report
from hposvc.plugins import model_factory
from hposvc.spec import load_spec
from hposvc.tasks import load_task
from hposvc.tracking import experiment_name

import own_norms
from own_norms import (
    GPTLayerNorm,
    LayerNorm2d,
    LlamaRMSNorm,
    OffsetRMSNorm,
    PermutedLayerNorm2d,
    RMSNorm,
    TinyConvNeXt,
    TinyGPT,
)

# What each norm slot of TinyGPT (ln_1 with bias, ln_1 without, LLaMA's, HF's) becomes per
# kind: the user's layer of the requested kind stays, with its parameters.
GPT_SLOTS = ("h.0.ln_1", "h.1.ln_1", "norm", "ln_f")
GPT_NORMS = {
    "none": [nn.Identity] * 4,
    "batch": [ChannelsLast] * 4,
    "group": [ChannelsLast] * 4,
    "instance": [ChannelsLast] * 4,
    "layer": [GPTLayerNorm, GPTLayerNorm, nn.LayerNorm, nn.LayerNorm],
    "rms": [nn.RMSNorm, nn.RMSNorm, RMSNorm, LlamaRMSNorm],
}
CONV_SLOTS = ("norm1", "norm2")
CONV_NORMS = {
    "none": [nn.Identity] * 2,
    "batch": [nn.BatchNorm2d] * 2,
    "group": [nn.GroupNorm] * 2,
    "instance": [nn.InstanceNorm2d] * 2,
    "layer": [LayerNorm2d, PermutedLayerNorm2d],
    "rms": [ChannelsFirst] * 2,  # RMSNorm(C) over the channels at each pixel, as the layers it replaces
}
INNER = {"batch": nn.BatchNorm1d, "group": nn.GroupNorm, "instance": nn.InstanceNorm1d, "rms": nn.RMSNorm}
NORM_NAMES = {
    "BatchNorm1d", "BatchNorm2d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "LayerNorm", "RMSNorm",
    "MapRMSNorm", "GPTLayerNorm", "LlamaRMSNorm", "LayerNorm2d", "PermutedLayerNorm2d",
}


def shown_norms(model: nn.Module) -> set[str]:
    """The norm classes ``str(model)`` (a trial's model.txt) shows."""
    return set(re.findall(r"\): (\w+)\(", str(model))) & NORM_NAMES


def slot(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


@pytest.mark.parametrize("kind", NORMS)
def test_every_own_norm_class_becomes_the_requested_kind(kind: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    for model, slots, expected in ((TinyGPT(), GPT_SLOTS, GPT_NORMS), (TinyConvNeXt(), CONV_SLOTS, CONV_NORMS)):
        classes = list(dict.fromkeys(type(slot(model, p)) for p in slots))
        converted, report = convert_with_report(model, norm=kind, norm_groups=4 if kind == "group" else None)
        got = [type(slot(converted, p)) for p in slots]
        assert got == expected[kind], (type(model).__name__, got)
        wrapped = {type(m.norm) for m in converted.modules() if isinstance(m, (ChannelsLast, ChannelsFirst))}
        assert wrapped <= {INNER.get(kind)}
        want = {t.__name__ for t in expected[kind] if t is not nn.Identity and t not in (ChannelsLast, ChannelsFirst)}
        want |= {t.__name__ for t in wrapped}
        assert shown_norms(converted) == want, str(converted)  # model.txt: exactly the requested types
        converted.train()
        out = converted(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all()
        out.square().mean().backward()
        assert [line.split()[2] for line in report.norm_classes] == [c.__name__ for c in classes]  # conversion.txt


def test_conversion_report_says_how_each_class_was_recognised_and_which_eps_it_carries() -> None:
    model, report = convert_with_report(TinyGPT(), norm="layer")
    assert report.norm_classes == (
        "norm class GPTLayerNorm (own_norms): 2 layers, by rule: layer norm over the last axis, eps 1e-05 (measured); kept (already layer norm)",
        "norm class RMSNorm (own_norms): 1 layer, by rule: rms norm over the last axis, eps 1e-06 (attribute eps); -> LayerNorm, eps 1e-06",
        "norm class LlamaRMSNorm (own_norms): 1 layer, by rule: rms norm over the last axis, eps 1e-06 (attribute variance_epsilon); -> LayerNorm, eps 1e-06",
    )
    assert model.norm.eps == model.ln_f.eps == 1e-6  # LLaMA's eps carried over, not torch's default
    assert report.norms == ("norm", "ln_f") and "by rule" in report.describe()
    _, report = convert_with_report(TinyConvNeXt(), norm="rms")
    assert report.norm_classes == (
        "norm class LayerNorm2d (own_norms): 1 layer, by rule: layer norm over the channels (dim 1) at each position, eps 1e-06 (attribute eps); -> ChannelsFirst(RMSNorm), eps 1e-06",
        "norm class PermutedLayerNorm2d (own_norms): 1 layer, by rule: layer norm over the channels (dim 1) at each position, eps 1e-05 (attribute eps); -> ChannelsFirst(RMSNorm), eps 1e-05",
    )
    # an eps nobody uses is read exactly, whatever the attribute's name
    odd = nn.Sequential(nn.Linear(4, 6), LlamaRMSNorm(6, eps=3e-4))
    assert "eps 0.0003 (attribute variance_epsilon)" in convert_with_report(odd, norm="batch")[1].norm_classes[0]


def test_torch_norms_carry_their_eps_and_one_of_the_requested_kind_keeps_its_own() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8, eps=1e-3), nn.Flatten(2), nn.Linear(4, 6), nn.LayerNorm(6, eps=1e-6))
    converted = convert(model, norm="rms")
    assert (type(converted[1]), converted[1].eps) == (MapRMSNorm, 1e-3)
    assert (type(converted[4]), converted[4].eps) == (nn.RMSNorm, 1e-6)
    own = nn.RMSNorm(6)  # torch's default eps (None): already an RMS norm over the last axis, so kept
    assert convert(nn.Sequential(nn.Linear(4, 6), own), norm="rms")[1] is own


def test_the_replacements_normalise_what_the_replaced_layers_did() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 5) * 3 + 1
    # LayerNorm2d as rms: over the channels at each pixel, not over the whole map
    rms = convert(nn.Sequential(LayerNorm2d(8)), norm="rms")[0]
    assert torch.allclose(rms(x), x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6), atol=1e-5)
    # the timm-style subclass of nn.LayerNorm is channels-first despite its class: batch norm
    # on it is BatchNorm2d over (N, H, W), not a channels-last norm over W
    bn = convert(nn.Sequential(PermutedLayerNorm2d(8)), norm="batch")[0]
    assert type(bn) is nn.BatchNorm2d and bn.num_features == 8
    # and under "layer" the user's layers compute what they did
    own, pixels = TinyConvNeXt(), torch.randn(3, 64)
    before = own(pixels)
    kept = convert(copy.deepcopy(own), norm="layer")
    assert torch.equal(kept(pixels), before)


def test_modules_that_are_not_norms_are_left_alone_and_named_classes_are_swapped() -> None:
    # LayerScale has a norm's structure (one (C,) weight) but does not normalise: not a norm
    converted = convert(TinyGPT(), norm="rms")
    assert sum(isinstance(m, own_norms.LayerScale) for m in converted.modules()) == 2
    # Gemma's (1 + weight) norm is missed by the rule: "no normalisation layer" says how to name it
    with pytest.raises(InvalidInputError, match=r"no normalisation layer.*norm_classes"):
        convert(own_norms.Gemma(), norm="layer")
    model, report = convert_with_report(own_norms.Gemma(), norm="layer", norm_classes=[OffsetRMSNorm])
    assert type(model.norm) is nn.LayerNorm and model.norm.eps == 1e-6
    assert report.norm_classes == (
        "norm class OffsetRMSNorm (own_norms): 1 layer, by spec (norm_classes): a norm over the last axis, eps 1e-06 (attribute eps); -> LayerNorm, eps 1e-06",
    )
    with pytest.raises(InvalidInputError, match="norm_classes"):
        convert(own_norms.Gemma(), norm="layer", norm_classes=["own_norms:OffsetRMSNorm"])


def test_an_init_scheme_resets_the_users_kept_norms_and_default_keeps_them() -> None:
    for init, expected in (("he_normal", 1.0), ("default", 3.0)):
        model = TinyGPT()
        with torch.no_grad():
            model.norm.weight.fill_(3.0)
        converted = convert(model, norm="rms", init=init)
        assert converted.norm is model.norm and torch.all(converted.norm.weight == expected)


SPEC = """\
[study]
name = "{name}"
task = "digits"
{study}n_trials = {n_trials}
sampler = "grid"
pruner = "none"

[train]
epochs = 1
batch_size = 256

[model]
depth = 1
width = 4

[space]
{space}
"""


def test_a_model_with_its_own_norm_classes_validates_for_a_norm_search(tmp_path: Path) -> None:
    # The refusal this replaces: "TinyGPT has no normalisation layer" (it has four).
    spec = tmp_path / "gpt.toml"
    code_dir = Path(own_norms.__file__).parent
    spec.write_text(
        SPEC.format(name="gpt", study=f'model = "own_norms:tiny_gpt"\ncode_dir = "{code_dir}"\n', n_trials=3, space='norm = ["layer", "rms", "batch"]\n').replace(
            "[model]\ndepth = 1\nwidth = 4\n", ""
        )
    )
    result = CliRunner().invoke(main, ["study", "validate", str(spec)])
    assert result.exit_code == 0, result.output


OWN = """\
[study]
name = "own"
task = "digits"
model = "own_norms:{factory}"
code_dir = "{code_dir}"
n_trials = 2
[model]
{model}
[space]
norm = ["layer", "rms"]
"""


@pytest.mark.parametrize(
    ("factory", "model", "code", "needles"),
    [
        ("gemma", "", 2, ["[space] norm cannot act on the model of own_norms:gemma", "no normalisation layer", "norm_classes"]),
        ("gemma", 'norm_classes = ["own_norms:OffsetRMSNorm"]', 0, []),
        ("tiny_gpt", 'norm_classes = ["own_norms:OffsetRMSNorm"]', 2, ["'model.norm_classes'", "has no OffsetRMSNorm layer"]),
        ("gemma", 'norm_classes = ["own_norms:gemma"]', 2, ["'model.norm_classes'", "not a torch.nn.Module class"]),
        ("gemma", 'norm_classes = ["own_norms:Missing"]', 2, ["'model.norm_classes'", "has no function 'Missing'"]),
        ("gemma", 'norm_classes = "own_norms:OffsetRMSNorm"', 2, ["'model.norm_classes'", "a list of classes"]),
    ],
    ids=["missed-by-rule", "named", "named-but-absent", "not-a-class", "missing", "not-a-list"],
)
def test_a_spec_names_the_norm_classes_the_rule_misses(tmp_path: Path, factory: str, model: str, code: int, needles: list[str]) -> None:
    spec = tmp_path / "own.toml"
    spec.write_text(OWN.format(factory=factory, code_dir=Path(own_norms.__file__).parent, model=model))
    result = CliRunner().invoke(main, ["study", "validate", str(spec)])
    assert result.exit_code == code, result.output
    for needle in needles:
        assert needle in " ".join(result.output.split()), result.output
    if code == 0:  # what a trial builds and writes to conversion.txt
        reports = []
        built = model_factory(load_spec(spec), load_task("digits"), TrialConfig(norm="rms"), on_built=lambda m, r: reports.append(r))()
        assert type(built.norm) is nn.RMSNorm and built.norm.eps == 1e-6
        assert "by spec (norm_classes)" in reports[0].describe()
        # and best_config's rebuild takes the same names
        again = hposvc.build_training(
            TrialConfig(norm="rms"), "digits", device="cpu", model="own_norms:gemma", apply=["norm"],
            code_dir=str(Path(own_norms.__file__).parent), norm_classes=["own_norms:OffsetRMSNorm"],
        )
        assert type(again.model.norm) is nn.RMSNorm


@pytest.mark.slow
def test_rms_norm_trains_in_every_2d_and_mlp_family_end_to_end(tmp_path: Path) -> None:
    spec = tmp_path / "rms.toml"
    spec.write_text(SPEC.format(name="rms", study="", n_trials=3, space='norm = "rms"\nfamily = ["mlp", "cnn2d", "resnet"]\n'))
    data = tmp_path / "data"
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet"])
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="rms", storage=f"sqlite:///{data / 'hposvc.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    client = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment_name("rms"))
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'trial'")
    shown = {}
    for run in runs:
        family = run.data.params["family"]
        text = Path(client.download_artifacts(run.info.run_id, "model.txt")).read_text()
        shown[family] = set(re.findall(r"\): (\w+)\(", text)) & NORM_NAMES
        if family == "mlp":
            assert "RMSNorm((4,), eps=1e-05" in text
        else:
            assert "MapRMSNorm(4, eps=1e-05)" in text
    assert shown == {"mlp": {"RMSNorm"}, "cnn2d": {"MapRMSNorm"}, "resnet": {"MapRMSNorm"}}
