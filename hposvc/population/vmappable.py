"""Can a model train in a population? Its structure key, and one cheap check.

A population runs one module structure for every member with ``torch.func.vmap`` over
``torch.func.functional_call`` (:class:`~hposvc.population.PopulationModel`). That is
exact for any module whose ``forward`` is a function of its parameters, buffers and
input. :func:`vmap_reason` checks one built model for what breaks that, and names the
layer and the line at fault:

- data-dependent control flow: a Python ``if`` / ``while`` on a tensor's value;
- ``.item()`` (or ``float(t)``, ``int(t)``) on a tensor in ``forward``;
- an in-place update of unbatched state: a tensor kept as a plain attribute (not a
  registered buffer) and updated in ``forward``;
- state that ``forward`` *replaces* rather than updates in place (``self.count =
  self.count + 1`` on a buffer, ``self.cache = h``): the population would lose it;
- a forward that returns something other than one tensor, or trainable parameters of
  more than one floating dtype;
- anything else under which the vectorised outputs or updated buffers differ from the
  module's own, in train mode (same random draws; where a random model's draws come in
  another order when vectorised, as in fused attention dropout, compared again with
  dropout off) and in eval mode.

The check runs the model twice, vectorised over two copies and on its own, on two
samples, once per mode: well under a second for a ResNet-18-sized model on small inputs
(``bench/bench_population.py --model`` measures it).

:func:`structure_key` says which built models can share a population: the same module
tree (classes and qualified names), the same plain attributes (a dropout ``p``, an
``eps``, a tensor kept as an attribute, by value) and the same parameter and buffer
names, shapes and dtypes. Members differ only in the values of their parameters and
buffers, which are what the population stacks.

>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
>>> vmap_reason(net, torch.randn(5, 4)) is None
True
>>> structure_key(net) == structure_key(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)))
True
>>> structure_key(net) == structure_key(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 2)))
False
"""

from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = ["CHECK_ATOL", "structure_key", "vmap_reason"]

CHECK_SAMPLES = 2  # samples per check batch: batch norm needs two in train mode
CHECK_ATOL, CHECK_RTOL = 1e-4, 1e-3  # vectorised vs own outputs: float rounding only
CHECK_SEED = 20  # the check's random draws (its own generator state; the caller's is kept)
_MODULE_ATTRS = frozenset(vars(nn.Module()))  # what every nn.Module has: not structure
_TORCH_DIR = os.path.dirname(torch.__file__)


# -- which models can share a population --------------------------------------------------


def structure_key(model: nn.Module) -> tuple[Any, ...]:
    """What must be equal for two built models to train as one population (module docstring)."""
    modules = []
    for name, module in model.named_modules(remove_duplicate=False):
        attrs = tuple((k, _describe(v)) for k, v in sorted(vars(module).items()) if k not in _MODULE_ATTRS)
        modules.append((name, type(module).__module__, type(module).__qualname__, attrs))
    params = tuple(
        (n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)
    )
    buffers = tuple((n, tuple(b.shape), str(b.dtype)) for n, b in model.named_buffers(remove_duplicate=False))
    return tuple(modules), params, buffers


def _describe(value: Any) -> Any:
    """A comparable stand-in for a module's plain attribute: tensors by shape, dtype and
    a digest of their values; containers element-wise; anything else by its repr (an
    object without a repr of its own differs per instance: such members train apart)."""
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
        return ("tensor", tuple(value.shape), str(value.dtype), digest)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_describe(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((repr(k), _describe(v)) for k, v in value.items()))
    return repr(value)


# -- can it be vectorised -----------------------------------------------------------------


def vmap_reason(model: nn.Module, x: Tensor) -> str | None:
    """None when ``model`` trains correctly in a population; otherwise one line saying
    why not, naming the layer (and the source line) at fault. ``x``: a batch of the
    model's input (two samples are used). The model's parameters, buffers and mode are
    left as they were.

    >>> class Gate(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(3, 3)
    ...     def forward(self, x):
    ...         return self.fc(x) if self.fc(x).mean() > 0 else x
    >>> print(vmap_reason(nn.Sequential(nn.Linear(3, 3), Gate()), torch.randn(4, 3)))  # doctest: +ELLIPSIS
    data-dependent control flow (a Python if/while on a tensor's value) in layer '1' (Gate) at ...: `return self.fc(x) if self.fc(x).mean() > 0 else x`
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtypes = sorted({str(p.dtype) for p in trainable})
    if not trainable:
        return "it has no trainable parameters"
    if len(dtypes) > 1 or not trainable[0].is_floating_point():
        return f"its trainable parameters are {', '.join(dtypes)}; a population keeps them in one floating-point tensor"
    x = x[:CHECK_SAMPLES].to(trainable[0].device)
    modes = {m: m.training for m in model.modules()}
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    try:
        with _Watch(model) as watch:
            for training in (True, False):
                model.train(training)
                reason = _compare(model, params, buffers, x, watch, "train" if training else "eval")
                if reason is not None:
                    return reason
    finally:
        for module, training in modes.items():
            module.training = training
    return None


def _compare(
    model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, watch: "_Watch", mode: str, *, retry: bool = True
) -> str | None:
    """Two members (copies of the model) vectorised vs the model on its own, same draws."""
    stacked_params = {n: p.expand(2, *p.shape) for n, p in params.items()}  # read only: no copy
    stacked_buffers = {n: b.unsqueeze(0).repeat(2, *[1] * b.dim()) for n, b in buffers.items()}
    own_buffers = {n: b.clone() for n, b in buffers.items()}
    call = lambda p, b, x: functional_call(model, (p, b), (x,))  # noqa: E731
    # Gradients on in train mode, off in eval mode, as in training and evaluation (some
    # layers take another path without them); the parameters are detached, so no graph.
    # fork_rng: the check's draws leave the caller's generators (CPU and CUDA) as they were.
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.set_grad_enabled(mode == "train"):
        _seed(x.device, CHECK_SEED)
        try:
            # randomness="same": members draw what the model draws alone (training uses "different")
            out = vmap(call, randomness="same")(stacked_params, stacked_buffers, x.expand(2, *x.shape))
        except Exception as e:  # noqa: BLE001 (what fails here is the reason)
            return _explain(e, watch)
        if watch.replaced:
            return watch.replaced[0]
        if not isinstance(out, Tensor):
            return f"its forward returns {type(out).__name__}, not one tensor of outputs"
        _seed(x.device, CHECK_SEED)
        own = functional_call(model, (params, own_buffers), (x,))
        mismatch = _mismatch(out, own, stacked_buffers, own_buffers, mode)
        if mismatch is None or mode != "train" or not retry:
            return mismatch
        # Random draws in forward may be batched in another order (dropout inside fused
        # attention, say). If the model alone is random, compare again without dropout.
        _seed(x.device, CHECK_SEED + 1)
        other = functional_call(model, (params, {n: b.clone() for n, b in buffers.items()}), (x,))
    if torch.equal(other, own):
        return mismatch  # deterministic: the difference is real
    with _dropout_off(model):
        again = _compare(model, params, buffers, x, watch, mode, retry=False)
    return None if again is None else f"{again} (with dropout off)"


def _seed(device: torch.device, seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device: the check's own


def _mismatch(out: Tensor, own: Tensor, stacked_buffers: dict[str, Tensor], own_buffers: dict[str, Tensor], mode: str) -> str | None:
    for i in range(2):
        if not torch.allclose(out[i].float(), own.float(), atol=CHECK_ATOL, rtol=CHECK_RTOL):
            diff = float((out[i].float() - own.float()).abs().max())
            return f"in {mode} mode, a vectorised member's output differs from the model's own by up to {diff:.3g}"
    for name, value in own_buffers.items():
        if value.is_floating_point() and not torch.allclose(stacked_buffers[name][0], value, atol=CHECK_ATOL, rtol=CHECK_RTOL):
            return f"in {mode} mode, buffer {name!r} is updated differently when vectorised (not in place on the buffer?)"
    return None


@contextlib.contextmanager
def _dropout_off(model: nn.Module) -> Iterator[None]:
    """Dropout modules' ``p`` and attention's ``dropout`` at 0 for a while."""
    saved: list[tuple[nn.Module, str, float]] = []
    for module in model.modules():
        for attr in ("p",) if isinstance(module, nn.modules.dropout._DropoutNd) else ("dropout",) if isinstance(module, nn.MultiheadAttention) else ():
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, 0.0)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


_KNOWN = (  # vmap's messages, as one short phrase each
    ("data-dependent control flow", "data-dependent control flow (a Python if/while on a tensor's value)"),
    (".item()", "`.item()` (or float()/int()/bool() of a tensor)"),
    ("broadcast shape", "an in-place update of unbatched state (a tensor attribute that is not a registered buffer)"),
    ("inplace", "an in-place update of unbatched state (a tensor attribute that is not a registered buffer)"),
)


def _explain(e: Exception, watch: "_Watch") -> str:
    message = str(e)
    what = next((phrase for needle, phrase in _KNOWN if needle in message), None)
    if what is None:
        what = f"{type(e).__name__}: {(message.strip().splitlines() or [''])[0]}"
    return f"{what}{watch.where()}{_user_line(e)}"


def _user_line(e: Exception) -> str:
    """`` at file:line: `code` `` of the innermost frame outside torch (the user's code)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.path.abspath(f.filename) != os.path.abspath(__file__)] or frames
    if not frames:
        return ""
    frame = frames[-1]
    code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    return f" at {os.path.basename(frame.filename)}:{frame.lineno}: `{code}`"


class _Watch:
    """Forward hooks on every layer: which layers are running (the innermost one is the
    one at fault when forward raises), and whether a layer replaced a buffer or stored a
    tensor attribute during its forward (state the population would lose)."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {module: name for name, module in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.before: dict[nn.Module, dict[str, int]] = {}
        self.replaced: list[str] = []
        self.handles: list[Any] = []

    def __enter__(self) -> "_Watch":
        for module in self.names:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))  # not called when forward raises
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def where(self) -> str:
        if not self.stack:
            return ""
        module = self.stack[-1]
        return f" in layer {self.names[module] or '(the model)'!r} ({type(module).__name__})"

    @staticmethod
    def _state(module: nn.Module) -> dict[str, int]:
        state = {f"buffer {k!r}": id(v) for k, v in module._buffers.items()}
        state.update({f"attribute {k!r}": id(v) for k, v in vars(module).items() if isinstance(v, Tensor)})
        return state

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)
        self.before[module] = self._state(module)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.stack.pop()
        before, after = self.before.pop(module, {}), self._state(module)
        changed = [k for k, v in after.items() if before.get(k) != v]
        if changed and not self.replaced:
            layer = f"layer {self.names[module] or '(the model)'!r} ({type(module).__name__})"
            kind, name = changed[0].split(" ", 1)
            if kind == "buffer":
                self.replaced.append(
                    f"{layer} replaces its buffer {name} in forward, which a population loses; "
                    f"update it in place instead (e.g. `self.{name.strip(chr(39))}.add_(1)`)"
                )
            else:
                self.replaced.append(
                    f"{layer} stores a tensor in attribute {name} in forward: state outside its parameters "
                    f"and buffers, which a population cannot keep per member (register a buffer, update it in place)"
                )

