"""hposvc.nn: init statistics, ZerO, norm axes, pretrained loading, every model variant,
the 2-D families. Converting a user's model is tested in test_convert.py."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from hposvc.config import ACTIVATIONS, NORMS, TrialConfig
from hposvc.errors import InvalidInputError
from hposvc.tasks import Task
from hposvc.nn import (
    ACTIVATION_TYPES,
    NORM_TYPES,
    CNN1d,
    CNN2d,
    ResNet,
    activation_layer,
    build_model,
    check_family,
    count_parameters,
    group_count,
    init_weights,
    norm_layer,
    zero_init_matrix,
)

# Relative tolerance on a sampled variance. The layers below hold 1e6 (linear) and 2e5
# (conv) weights, so the standard error of the variance is 0.14% / 0.32%: 5% is > 15 σ
# away from noise yet far tighter than the factor 4 between, e.g., He and Xavier here.
VAR_RTOL = 0.05


def make_task(family: str, input_shape: tuple[int, ...], n_outputs: int = 3, n: int = 6) -> Task:
    x = torch.randn(n, *input_shape)
    y = torch.randint(0, n_outputs, (n,))
    return Task(
        name=f"tiny-{family}",
        kind="multiclass",
        family=family,
        input_shape=input_shape,
        n_outputs=n_outputs,
        x_train=x,
        y_train=y,
        x_val=x,
        y_val=y,
        x_test=x,
        y_test=y,
        default_depth=2,
        default_width=8,
    )


def cfg(**kw) -> TrialConfig:
    return TrialConfig(**kw)


# -- init statistics -------------------------------------------------------------------

# fan_in 500, fan_out 2000 for both layers below (conv: 100 channels × kernel 5 in,
# 400 channels × kernel 5 out), so one table of expected variances serves both.
FAN_IN, FAN_OUT = 500, 2000
STD = 0.05
EXPECTED_VAR = {
    "normal": STD**2,
    "uniform": STD**2 / 3,  # U(-a, a) has variance a² / 3
    "xavier_uniform": 2 / (FAN_IN + FAN_OUT),
    "xavier_normal": 2 / (FAN_IN + FAN_OUT),
    "he_uniform": 2 / FAN_IN,
    "he_normal": 2 / FAN_IN,
}


def _wide_layer(family: str, init: str) -> torch.Tensor:
    torch.manual_seed(0)
    extra = {"init_std": STD} if init in ("normal", "uniform") else {}
    if family == "mlp":
        model = build_model(make_task("mlp", (FAN_IN,)), cfg(init=init, depth=1, width=FAN_OUT, **extra))
        return model.hidden[0].linear.weight.detach()
    model = build_model(make_task("cnn1d", (100, 8)), cfg(init=init, depth=1, width=400, **extra))
    weight = model.hidden[0].conv.weight.detach()
    assert weight.shape == (400, 100, 5)
    return weight


@pytest.mark.parametrize("family", ["mlp", "cnn1d"])
@pytest.mark.parametrize("init", sorted(EXPECTED_VAR))
def test_init_variance_matches_the_scheme(init: str, family: str) -> None:
    w = _wide_layer(family, init)
    expected = EXPECTED_VAR[init]
    var = w.var().item()
    assert abs(var / expected - 1) < VAR_RTOL, f"{init} on {family}: var {var:.3e}, expected {expected:.3e}"
    assert abs(w.mean().item()) < 0.01 * math.sqrt(expected)
    # Uniform schemes fill [-a, a] up to its edge; normal ones have tails beyond it.
    bound = math.sqrt(3 * expected)
    largest = w.abs().max().item()
    if "uniform" in init:
        assert 0.99 * bound < largest <= bound * (1 + 1e-6)
    else:
        assert largest > 1.5 * bound


def test_zeros_init_is_all_zero() -> None:
    model = build_model(make_task("cnn1d", (2, 16)), cfg(init="zeros", depth=2, width=8, norm="batch"))
    for name, p in model.named_parameters():
        if ".norm." in name:
            continue
        assert torch.count_nonzero(p) == 0, name


@pytest.mark.parametrize("init", ["zeros", "normal", "uniform", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "zero"])
@pytest.mark.parametrize(("family", "shape", "norm"), [("mlp", (5,), "batch"), ("cnn1d", (2, 16), "instance"), ("cnn1d", (2, 16), "group")])
def test_biases_start_at_zero_and_norms_at_one(init: str, family: str, shape: tuple[int, ...], norm: str) -> None:
    extra = {"init_std": 0.1} if init in ("normal", "uniform") else {}
    config = cfg(init=init, depth=2, width=8, norm=norm, **extra)
    model = build_model(make_task(family, shape), config)
    with torch.no_grad():  # dirty every parameter so re-initialising has something to undo
        for p in model.parameters():
            p.fill_(0.5)
    init_weights(model, config)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif ".norm." in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert not torch.equal(p, torch.full_like(p, 0.5)), f"{name} was not initialised"


# -- ZerO ------------------------------------------------------------------------------


def _hadamard_entry(i: int, j: int) -> int:
    # Sylvester Hadamard: H[i, j] = (-1)^popcount(i & j), computed independently of hposvc.nn.
    return -1 if bin(i & j).count("1") % 2 else 1


def expected_zero(fan_out: int, fan_in: int) -> tuple[torch.Tensor, float]:
    if fan_out <= fan_in:
        return torch.eye(fan_out, fan_in), 1.0
    m = math.ceil(math.log2(fan_out))
    c = torch.tensor(2 ** (-(m - 1) / 2), dtype=torch.float32).item()  # as stored in float32
    h = torch.tensor([[_hadamard_entry(i, j) for j in range(fan_in)] for i in range(fan_out)], dtype=torch.float32)
    return c * h, c


def test_zero_matrix_small_cases_by_hand() -> None:
    c = 2**-0.5  # out = 4 → m = 2 → c = 2^(-1/2)
    assert torch.allclose(zero_init_matrix(4, 2), c * torch.tensor([[1.0, 1], [1, -1], [1, 1], [1, -1]]))
    assert torch.allclose(zero_init_matrix(3, 2), c * torch.tensor([[1.0, 1], [1, -1], [1, 1]]))
    assert torch.equal(zero_init_matrix(2, 2), torch.eye(2))
    assert torch.equal(zero_init_matrix(2, 3), torch.tensor([[1.0, 0, 0], [0, 1, 0]]))
    assert torch.equal(zero_init_matrix(2, 1), torch.tensor([[1.0], [1.0]]))  # m = 1, c = 1


def _zero_models() -> list[nn.Module]:
    # mlp: 5 → 12 (fan_out > fan_in), 12 → 12 (square), 12 → 3 (fan_out < fan_in)
    # cnn: 2 → 8 channels (Hadamard), 8 → 8 (identity), head 8·4 → 3 (partial identity)
    return [
        build_model(make_task("mlp", (5,)), cfg(init="zero", depth=2, width=12)),
        build_model(make_task("cnn1d", (2, 16)), cfg(init="zero", depth=2, width=8, norm="group", norm_groups=2)),
    ]


def test_zero_is_deterministic_regardless_of_seed() -> None:
    torch.manual_seed(0)
    first = [m.state_dict() for m in _zero_models()]
    torch.manual_seed(12345)
    second = [m.state_dict() for m in _zero_models()]
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_zero_layers_are_identity_or_scaled_hadamard() -> None:
    mlp, cnn = _zero_models()
    seen = set()
    for model in (mlp, cnn):
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv1d)):
                continue
            w = module.weight.detach()
            fan_out, fan_in = w.shape[:2]
            expected, c = expected_zero(fan_out, fan_in)
            values = set(torch.unique(w).tolist())
            assert values <= {0.0, c, -c}, f"{name}: {values}"
            if w.dim() == 3:  # conv: the matrix at the kernel centre, zeros on other taps
                centre = w.shape[2] // 2
                assert torch.allclose(w[:, :, centre], expected), name
                assert torch.count_nonzero(w[:, :, :centre]) == 0 and torch.count_nonzero(w[:, :, centre + 1 :]) == 0
            else:
                assert torch.allclose(w, expected), name
            seen.add(("conv" if w.dim() == 3 else "linear", (fan_out > fan_in) - (fan_out < fan_in)))
    # Every case is covered: wider, square and narrower, for linear and conv layers.
    assert seen == {("linear", 1), ("linear", 0), ("linear", -1), ("conv", 1), ("conv", 0)}
    assert torch.equal(mlp.hidden[1].linear.weight, torch.eye(12))


def test_zero_square_mlp_passes_nonnegative_input_through() -> None:
    model = build_model(make_task("mlp", (6,), n_outputs=6), cfg(init="zero", depth=3, width=6))
    x = torch.rand(4, 6)
    assert torch.equal(model(x), x)  # identity layers, zero biases, ReLU of x ≥ 0 is x


# -- norms -----------------------------------------------------------------------------


def _manual_norm(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def _grouped(x: torch.Tensor, groups: int, dims: tuple[int, ...]) -> torch.Tensor:
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, c // groups, *x.shape[2:])
    return _manual_norm(xg, dims).reshape(x.shape)


# (family, kind) → the manual normalisation it must equal: which axes share statistics.
NORM_CASES = {
    ("mlp", "batch"): lambda x: _manual_norm(x, (0,)),  # per feature, across samples
    ("mlp", "layer"): lambda x: _manual_norm(x, (1,)),  # per sample, across features
    ("mlp", "group"): lambda x: _grouped(x, 3, (2,)),  # per sample, per group of features
    ("cnn1d", "batch"): lambda x: _manual_norm(x, (0, 2)),  # per channel, over N and L
    ("cnn1d", "instance"): lambda x: _manual_norm(x, (2,)),  # per sample and channel, over L
    ("cnn1d", "layer"): lambda x: _manual_norm(x, (1, 2)),  # per sample, over C and L
    ("cnn1d", "group"): lambda x: _grouped(x, 3, (2, 3)),  # per sample and group, over C/G and L
    ("cnn2d", "batch"): lambda x: _manual_norm(x, (0, 2, 3)),  # per channel, over N, H and W
    ("cnn2d", "instance"): lambda x: _manual_norm(x, (2, 3)),  # per sample and channel, over H, W
    ("cnn2d", "layer"): lambda x: _manual_norm(x, (1, 2, 3)),  # per sample, over C, H and W
    ("cnn2d", "group"): lambda x: _grouped(x, 3, (2, 3, 4)),  # per sample and group, over C/G, H, W
}
DIMS = {"mlp": 0, "cnn1d": 1, "cnn2d": 2}  # spatial axes of each family's hidden activations


@pytest.mark.parametrize(("family", "kind"), sorted(NORM_CASES))
def test_norm_normalises_over_the_right_axes(family: str, kind: str) -> None:
    torch.manual_seed(0)
    shape = {"mlp": (8, 12), "cnn1d": (8, 12, 10), "cnn2d": (8, 12, 5, 6)}[family]
    # A different scale and offset along every axis, so averaging over a wrong axis shows.
    x = torch.randn(shape)
    for axis, size in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = size
        x = x * (0.5 + 2 * torch.rand(view)) + 3 * torch.randn(view)
    norm = norm_layer(kind, 12, DIMS[family], groups=3)
    norm.train()
    assert torch.allclose(norm(x), NORM_CASES[(family, kind)](x), atol=1e-4)


def test_norm_none_is_identity() -> None:
    for dims in range(4):
        assert isinstance(norm_layer("none", 4, dims), nn.Identity)


def test_instance_norm_on_mlp_explains_what_works() -> None:
    with pytest.raises(InvalidInputError) as err:
        norm_layer("instance", 8, 0)
    message = str(err.value)
    assert "the 'norm' parameter must be" in message and "Got 'instance' instead." in message
    for words in ("spatial axis", "one value per channel per sample", "'layer'", "'group'", "'batch'", "mnist1d"):
        assert words in message, words
    with pytest.raises(InvalidInputError, match="spatial axis"):
        build_model(make_task("mlp", (5,)), cfg(norm="instance", depth=1, width=8))


def test_group_norm_uses_the_largest_divisor_at_most_the_requested_groups() -> None:
    assert [group_count(c, 4) for c in (4, 6, 7, 8, 9, 10, 12, 64)] == [4, 3, 1, 4, 3, 2, 4, 4]
    assert group_count(10, 3) == 2 and group_count(3, 32) == 3
    assert norm_layer("group", 10, 1, groups=3).num_groups == 2
    with pytest.raises(InvalidInputError, match="'norm_groups' parameter must be an integer >= 1. Got 0"):
        group_count(8, 0)


# -- pretrained ------------------------------------------------------------------------


def test_pretrained_round_trips_a_state_dict(tmp_path) -> None:
    task = make_task("cnn1d", (2, 16))
    torch.manual_seed(1)
    source = build_model(task, cfg(init="he_normal", depth=2, width=8, norm="batch"))
    source(torch.randn(4, 2, 16))  # move the running statistics off their initial values
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)

    torch.manual_seed(2)
    loaded = build_model(task, cfg(init="pretrained", pretrained_path=str(path), depth=2, width=8, norm="batch"))
    want, got = source.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    x = torch.randn(3, 2, 16)
    assert torch.equal(source.eval()(x), loaded.eval()(x))


def test_pretrained_missing_file_names_the_path(tmp_path) -> None:
    path = tmp_path / "nowhere" / "weights.pt"
    with pytest.raises(InvalidInputError, match="'pretrained_path' parameter") as err:
        build_model(make_task("mlp", (4,)), cfg(init="pretrained", pretrained_path=str(path), depth=1, width=8))
    assert str(path) in str(err.value) and "No such file" in str(err.value)


def test_pretrained_wrong_shape_names_layer_and_both_shapes(tmp_path) -> None:
    task = make_task("mlp", (4,))
    path = tmp_path / "narrow.pt"
    torch.save(build_model(task, cfg(depth=1, width=16)).state_dict(), path)
    with pytest.raises(InvalidInputError) as err:
        build_model(task, cfg(init="pretrained", pretrained_path=str(path), depth=1, width=32))
    message = str(err.value)
    for part in (str(path), "'hidden.0.linear.weight'", "(16, 4) in the file", "(32, 4) in the model"):
        assert part in message, part


def test_pretrained_key_mismatch_lists_the_keys(tmp_path) -> None:
    task = make_task("mlp", (4,))
    path = tmp_path / "batchnorm.pt"
    torch.save(build_model(task, cfg(depth=1, width=8, norm="batch")).state_dict(), path)
    with pytest.raises(InvalidInputError) as err:
        build_model(task, cfg(init="pretrained", pretrained_path=str(path), depth=1, width=8, norm="layer"))
    message = str(err.value)
    assert "unexpected keys: hidden.0.norm.running_mean, hidden.0.norm.running_var" in message
    assert "missing keys" not in message  # LayerNorm's weight/bias exist in both


def test_pretrained_file_that_is_not_a_state_dict(tmp_path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(InvalidInputError, match="torch.load could not read it"):
        build_model(make_task("mlp", (4,)), cfg(init="pretrained", pretrained_path=str(path), depth=1, width=8))


# -- every variant builds and trains a step -------------------------------------------

VARIANTS = [
    (activation, norm, family)
    for activation, norm, family in itertools.product(ACTIVATIONS, NORMS, ("mlp", "cnn1d"))
    if not (family == "mlp" and norm == "instance")
]


@pytest.mark.parametrize(("activation", "norm", "family"), VARIANTS)
def test_every_activation_norm_family_runs_forward_and_backward(activation: str, norm: str, family: str) -> None:
    torch.manual_seed(0)
    shape = (5,) if family == "mlp" else (2, 12)
    task = make_task(family, shape, n_outputs=3)
    config = cfg(activation=activation, norm=norm, norm_groups=2 if norm == "group" else None, depth=2, width=8)
    model = build_model(task, config)
    out = model(task.x_train)
    assert out.shape == (task.x_train.shape[0], 3)
    nn.functional.cross_entropy(out, task.y_train).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(torch.count_nonzero(p.grad) for p in model.parameters())
    expected_norm = nn.Identity if norm == "none" else type(norm_layer(norm, 8, DIMS[family], groups=2))
    assert type(model.hidden[0].norm) is expected_norm


def test_activations_are_the_named_modules() -> None:
    assert activation_layer("leaky_relu").negative_slope == 0.01
    assert isinstance(activation_layer("prelu"), nn.PReLU)
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(activation_layer("softsign")(x), x / (1 + x.abs()))
    assert torch.allclose(activation_layer("mish")(x), x * torch.tanh(nn.functional.softplus(x)))
    with pytest.raises(InvalidInputError, match="'activation' parameter must be one of"):
        activation_layer("swish")


# -- structure -------------------------------------------------------------------------


def test_model_names_and_parameter_count() -> None:
    mlp = build_model(make_task("mlp", (4,), n_outputs=3), cfg(depth=2, width=8, norm="layer"))
    names = [name for name, _ in mlp.named_parameters()]
    assert names[:4] == ["hidden.0.linear.weight", "hidden.0.linear.bias", "hidden.0.norm.weight", "hidden.0.norm.bias"]
    assert names[-2:] == ["head.weight", "head.bias"]
    # (4·8 + 8) + 2·8 norm, (8·8 + 8) + 2·8 norm, head 8·3 + 3
    assert count_parameters(mlp) == 40 + 16 + 72 + 16 + 27
    assert count_parameters(build_model(make_task("mlp", (4,)), cfg(depth=0, width=8))) == 4 * 3 + 3


def test_cnn_downsamples_while_long_enough() -> None:
    # mnist1d's shape: 40 → 20 → 10 → 5 → 5 (a 5-long input is not halved again)
    model = build_model(make_task("cnn1d", (1, 40), n_outputs=10), cfg(depth=4, width=8))
    assert isinstance(model, CNN1d)
    assert [block.conv.stride[0] for block in model.hidden] == [2, 2, 2, 1]
    assert model.head.in_features == 8 * 5
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)


@pytest.mark.parametrize(("family", "shape", "norm", "activation"), [("mlp", (6,), "batch", "prelu"), ("cnn1d", (2, 12), "instance", "gelu")])
def test_models_batch_with_torch_func(family: str, shape: tuple[int, ...], norm: str, activation: str) -> None:
    # Population training stacks several models' parameters and vmaps one functional call.
    torch.manual_seed(0)
    task = make_task(family, shape)
    models = [build_model(task, cfg(depth=2, width=8, norm=norm, activation=activation)) for _ in range(3)]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, *shape)
    out = vmap(lambda p, b: functional_call(skeleton, (p, b), (x,)))(params, buffers)
    assert torch.allclose(out, torch.stack([m(x) for m in models]), atol=1e-5)


# -- 2-D families ----------------------------------------------------------------------


def build_2d(family: str, shape: tuple[int, ...], config: TrialConfig, **kw) -> nn.Module:
    # Task.family names a task's own family (mlp / cnn1d); build_model's family picks any.
    return build_model(make_task("mlp", shape, n_outputs=3), config, family=family, **kw)


def test_cnn2d_downsamples_while_large_enough_and_flattens() -> None:
    model = build_2d("cnn2d", (3, 32, 32), cfg(depth=4, width=8))  # 32 → 16 → 8 → 4 → 4
    assert isinstance(model, CNN2d)
    assert [block.conv.stride for block in model.hidden] == [(2, 2)] * 3 + [(1, 1)]
    assert [block.conv.kernel_size for block in model.hidden] == [(3, 3)] * 4
    assert model.head.in_features == 8 * 4 * 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_resnet_has_three_stages_of_depth_blocks(norm: str) -> None:
    model = build_2d("resnet", (3, 32, 32), cfg(depth=2, width=8, norm=norm))
    assert isinstance(model, ResNet)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    shortcuts = [m for m in convs if m.kernel_size == (1, 1)]
    assert len(convs) - len(shortcuts) == 6 * 2 + 1 and len(shortcuts) == 2  # stages 2 and 3 change shape
    assert [stage[0].conv1.out_channels for stage in model.stages] == [8, 16, 32]
    assert [stage[0].conv1.stride for stage in model.stages] == [(1, 1), (2, 2), (2, 2)]
    assert all((c.bias is not None) == (norm == "none") for c in convs)  # a norm's shift replaces the bias
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 3)
    h = model.stages[:2](model.stem(x))
    assert h.shape == (2, 16, 16, 16)


def test_zero_init_residual_starts_each_block_as_its_shortcut() -> None:
    torch.manual_seed(0)
    for norm, last in (("batch", "norm2"), ("none", "conv2")):
        model = build_2d("resnet", (3, 16, 16), cfg(depth=2, width=8, norm=norm), zero_init_residual=True)
        blocks = [b for stage in model.stages for b in stage]
        assert all(torch.count_nonzero(getattr(b, last).weight) == 0 for b in blocks)
        block = model.stages[1][1].eval()  # an identity-shortcut block: output = act(x)
        x = torch.randn(2, 16, 8, 8)
        assert torch.equal(block(x), torch.relu(x))
    plain = build_2d("resnet", (3, 16, 16), cfg(depth=1, width=8, norm="batch"))
    assert torch.all(plain.stages[0][0].norm2.weight == 1)
    with pytest.raises(InvalidInputError, match="'zero_init_residual' parameter must be False for the 'cnn2d' family"):
        build_2d("cnn2d", (3, 16, 16), cfg(depth=1, width=8), zero_init_residual=True)


def test_2d_families_take_digits_as_one_channel_images() -> None:
    from hposvc.tasks import load_task

    digits = load_task("digits")
    assert check_family("resnet", digits.input_shape) == (1, 8, 8)
    for family in ("cnn2d", "resnet"):
        model = build_model(digits, cfg(depth=1, width=8, norm="batch"), family=family)
        assert model.in_shape == (1, 8, 8)
        images = digits.x_val[:4].reshape(4, 1, 8, 8)
        assert torch.equal(model.eval()(digits.x_val[:4]), model(images))


def test_a_family_that_does_not_fit_the_input_shape_names_both() -> None:
    with pytest.raises(InvalidInputError) as err:
        check_family("cnn2d", (5,))
    assert str(err.value) == (
        "the 'family' parameter must be a family that fits the task's input shape (5,). Got 'cnn2d' instead. "
        "'cnn2d' needs per-sample inputs (channels, height, width), or a flat square vector (64 → 1×8×8); "
        "this task fits 'mlp'."
    )
    with pytest.raises(InvalidInputError, match=r"'resnet' needs .*this task fits 'mlp', 'cnn1d'"):
        build_model(make_task("cnn1d", (2, 12)), cfg(depth=1, width=8), family="resnet")
    with pytest.raises(InvalidInputError, match="'family' parameter must be one of 'mlp', 'cnn1d', 'cnn2d', 'resnet'"):
        check_family("vit", (3, 32, 32))


def test_he_gain_follows_the_activation() -> None:
    # fan_in 500: ReLU 2/500, PReLU (slope 0.25) 2/(1.0625·500); Xavier keeps gain 1 for both.
    for activation, slope in (("relu", 0.0), ("prelu", 0.25), ("tanh", 0.0)):
        torch.manual_seed(0)
        model = build_model(make_task("mlp", (FAN_IN,)), cfg(init="he_normal", activation=activation, depth=1, width=FAN_OUT))
        var = model.hidden[0].linear.weight.var().item()
        assert abs(var * (1 + slope**2) * FAN_IN / 2 - 1) < VAR_RTOL, activation
    torch.manual_seed(0)
    model = build_model(make_task("mlp", (FAN_IN,)), cfg(init="xavier_normal", activation="prelu", depth=1, width=FAN_OUT))
    assert abs(model.hidden[0].linear.weight.var().item() / EXPECTED_VAR["xavier_normal"] - 1) < VAR_RTOL


def test_zero_on_a_resnet_makes_square_convs_identities() -> None:
    model = build_2d("resnet", (3, 16, 16), cfg(depth=1, width=8, init="zero"))
    w = model.stages[0][0].conv2.weight.detach()
    assert torch.equal(w[:, :, 1, 1], torch.eye(8)) and torch.count_nonzero(w) == 8
    stem = model.stem.conv.weight.detach()  # 3 → 8 channels: the scaled Hadamard corner
    assert torch.allclose(stem[:, :, 1, 1], zero_init_matrix(8, 3))


VARIANTS_2D = list(itertools.product(ACTIVATIONS, NORMS, ("cnn2d", "resnet")))


@pytest.mark.parametrize(("activation", "norm", "family"), VARIANTS_2D)
def test_every_activation_norm_runs_on_the_2d_families(activation: str, norm: str, family: str) -> None:
    torch.manual_seed(0)
    config = cfg(activation=activation, norm=norm, norm_groups=2 if norm == "group" else None, depth=1, width=4)
    model = build_2d(family, (2, 8, 8), config)
    x, y = torch.randn(6, 2, 8, 8), torch.randint(0, 3, (6,))
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    want = set() if norm == "none" else {type(norm_layer(norm, 4, 2, groups=2))}
    assert {type(m) for m in model.modules() if isinstance(m, NORM_TYPES)} == want
    assert {type(m) for m in model.modules() if isinstance(m, ACTIVATION_TYPES)} == {type(activation_layer(activation))}


@pytest.mark.parametrize(("family", "norm", "activation"), [("cnn2d", "batch", "prelu"), ("resnet", "group", "gelu"), ("resnet", "batch", "relu")])
def test_2d_models_batch_with_torch_func(family: str, norm: str, activation: str) -> None:
    torch.manual_seed(0)
    models = [build_2d(family, (2, 8, 8), cfg(depth=1, width=4, norm=norm, activation=activation)) for _ in range(3)]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, 2, 8, 8)
    out = vmap(lambda p, b: functional_call(skeleton, (p, b), (x,)))(params, buffers)
    assert torch.allclose(out, torch.stack([m(x) for m in models]), atol=1e-5)
