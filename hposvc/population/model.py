"""A population of same-shaped networks run as one vectorised model.

Each member is built exactly as sequential training builds it (same seed, same init
scheme): by :func:`hposvc.nn.build_model` for hposvc's families, by the user's factory
and conversion for a user's model (each member separately, so each has its own init).
Then the members' parameters and buffers are stacked
(``torch.func.stack_module_state``) and one forward call runs all of them with
``torch.func.vmap`` over ``torch.func.functional_call``. Any module of one structure
(:func:`~hposvc.population.vmappable.structure_key`) can be stacked; whether its forward
vectorises correctly is :func:`~hposvc.population.vmappable.vmap_reason`'s question.

Layout, chosen for the optimizer's sake: all parameters of all members live in one flat
``(M, P)`` tensor (:attr:`PopulationModel.flat`), and the per-layer tensors handed to
``functional_call`` are views of it. :meth:`PopulationModel.backward` gathers the layers'
gradients into one flat ``(M, P)`` gradient (:attr:`PopulationModel.grad`), so an
optimizer step is a handful of kernels over one tensor however many layers the network
has.

Buffers (batch norm's running mean/var and batch counter) are stacked per member too.
Batch norm in training mode updates them in place inside ``vmap``; with the buffers
batched along the member dimension functorch's batch-norm rule updates each member's slice
from that member's own batch statistics, which is exactly what each member's own module
would do (tests check this in train and eval mode); eval mode normalises each member
with its own running statistics. PReLU's slope is an ordinary parameter, so it is per
member as well. Frozen parameters (``requires_grad=False``) are stacked with the buffers
and never trained; tied weights stay tied. Random draws inside ``forward`` (dropout) are
independent per member (``randomness="different"``).

>>> from types import SimpleNamespace
>>> import torch
>>> from hposvc.config import TrialConfig
>>> task = SimpleNamespace(family="mlp", input_shape=(4,), n_outputs=3)
>>> cfgs = [TrialConfig(depth=1, width=8, seed=s) for s in (0, 1)]
>>> pop = PopulationModel.build(task, cfgs)
>>> pop(torch.randn(5, 4)).shape          # one shared batch → (members, batch, outputs)
torch.Size([2, 5, 3])
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from hposvc.config import TrialConfig
from hposvc.errors import invalid
from hposvc.nn import build_model
from hposvc.population.vmappable import structure_key

if TYPE_CHECKING:
    from hposvc.tasks import Task

__all__ = ["PopulationModel", "build_members"]


def build_members(
    task: Task, configs: Sequence[TrialConfig], *, seed_fn: Callable[[int], None] | None = None
) -> list[nn.Module]:
    """Build every member on the CPU as sequential training does: seed, then build.

    ``seed_fn(seed)`` seeds torch before each build (default ``torch.manual_seed``); the
    population trainer passes the same seeding function that :func:`hposvc.train.train`
    uses, so member ``m`` starts from the very weights its trial would start from alone.
    """
    seed = seed_fn or torch.manual_seed
    models = []
    for config in configs:
        seed(config.seed)
        models.append(build_model(task, config))
    return models


class PopulationModel:
    """``M`` same-shaped modules as one batched model (see the module docstring).

    Call it with a shared batch ``x`` of shape ``(B, ...)`` or with per-member batches of
    shape ``(M, B, ...)`` (``per_member=True``); the output is ``(M, B, outputs)``.
    :meth:`keep` drops members; :meth:`member_module` turns one member back into an
    ordinary module.
    """

    def __init__(self, models: Sequence[nn.Module], *, device: str | torch.device = "cpu") -> None:
        if not models:
            raise invalid("models", list(models), "a non-empty list of modules")
        structures = {structure_key(m) for m in models}
        if len(structures) != 1:
            raise invalid(
                "models",
                f"{len(structures)} different structures",
                "modules of one structure (module tree, plain attributes, parameter and buffer shapes)",
                hint="Group trials with hposvc.population.group_configs first.",
            )
        device = torch.device(device)
        params, buffers = stack_module_state(list(models))
        # Frozen parameters (requires_grad=False) are not trained: they ride with the buffers.
        frozen = {n for n, p in models[0].named_parameters() if not p.requires_grad}
        buffers.update({n: params.pop(n).detach() for n in frozen})
        self.names: tuple[str, ...] = tuple(params)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape[1:] for p in params.values())
        sizes = [s.numel() for s in self.shapes]
        self.offsets = tuple(sum(sizes[:i]) for i in range(len(sizes) + 1))
        # One flat (M, P) buffer; the autograd leaves are views of it (_rebuild).
        self.flat = torch.cat([p.detach().reshape(len(models), -1) for p in params.values()], dim=1).to(device)
        self.grad = torch.zeros_like(self.flat)
        self.buffers: dict[str, Tensor] = {k: v.to(device) for k, v in buffers.items()}
        # functional_call replaces every tensor, so the structure needs no real storage;
        # the template keeps one real copy to rebuild members as ordinary modules.
        self._template = copy.deepcopy(models[0]).cpu()
        self._base = copy.deepcopy(models[0]).to("meta")
        # Weights tied in the model (one parameter under two names) stay tied; a model
        # without ties skips functional_call's untying pass on every call.
        first: dict[int, str] = {}
        self._aliases: dict[str, str] = {}  # a tied parameter's second name -> its first
        for name, p in models[0].named_parameters(remove_duplicate=False):
            if id(p) in first:
                self._aliases[name] = first[id(p)]
            first.setdefault(id(p), name)
        self._tied = bool(self._aliases)
        self.params: dict[str, Tensor] = {}
        self._grad_views: list[Tensor] = []
        self._rebuild()
        # randomness="different": each member draws its own dropout masks (seeding:
        # hposvc.population.train.population_seed)
        self._call = vmap(self._forward_one, in_dims=(0, 0, 0), randomness="different")
        self._call_shared = vmap(self._forward_one, in_dims=(0, 0, None), randomness="different")

    @classmethod
    def build(
        cls,
        task: Task,
        configs: Sequence[TrialConfig],
        *,
        device: str | torch.device = "cpu",
        seed_fn: Callable[[int], None] | None = None,
    ) -> "PopulationModel":
        """Build, seed and initialise each member by its own config, then stack them.

        >>> from types import SimpleNamespace
        >>> task = SimpleNamespace(family="mlp", input_shape=(4,), n_outputs=2)
        >>> cfgs = [TrialConfig(depth=1, width=8, init=i) for i in ("zero", "he_normal")]
        >>> PopulationModel.build(task, cfgs).n_members
        2
        """
        return cls(build_members(task, configs, seed_fn=seed_fn), device=device)

    # -- state ---------------------------------------------------------------------------

    @property
    def n_members(self) -> int:
        return int(self.flat.shape[0])

    @property
    def n_params(self) -> int:
        """Trainable parameters of one member (what ``count_parameters`` gives for it)."""
        return int(self.flat.shape[1])

    @property
    def template(self) -> nn.Module:
        """The first member as built (on the CPU): the structure every member shares."""
        return self._template

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def _rebuild(self) -> None:
        """(Re)create the per-layer autograd leaves as views of ``flat``."""
        m = self.n_members
        spans = list(zip(self.names, self.shapes, self.offsets, self.offsets[1:]))
        self.params = {
            name: self.flat[:, a:b].view(m, *shape).detach().requires_grad_(True) for name, shape, a, b in spans
        }
        self._grad_views = [self.grad[:, a:b].view(m, *shape) for _, shape, a, b in spans]

    def backward(self, loss: Tensor) -> Tensor:
        """Differentiate the scalar ``loss`` (the sum of the members' losses) and write the
        gradients into :attr:`grad`, which is returned. Members do not interact, so member
        ``m``'s slice is the gradient of its own loss alone."""
        grads = torch.autograd.grad(loss, list(self.params.values()))
        for view, g in zip(self._grad_views, grads):
            view.copy_(g)  # one strided copy, whatever layout the gradient came in
        return self.grad

    def keep(self, index: Tensor | Sequence[int]) -> None:
        """Keep only the members at ``index`` (in that order)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        self.flat = self.flat.index_select(0, index)
        self.grad = torch.zeros_like(self.flat)
        self.buffers = {k: v.index_select(0, index) for k, v in self.buffers.items()}
        self._rebuild()

    def train(self, mode: bool = True) -> "PopulationModel":
        self._base.train(mode)
        return self

    def eval(self) -> "PopulationModel":
        return self.train(False)

    # -- forward -------------------------------------------------------------------------

    def _forward_one(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self._base, (params, buffers), (x,), tie_weights=self._tied)

    def __call__(self, x: Tensor, *, per_member: bool = False) -> Tensor:
        """All members' outputs, ``(M, B, outputs)``; ``x`` is ``(M, B, ...)`` when
        ``per_member`` else one ``(B, ...)`` batch that every member sees."""
        call = self._call if per_member else self._call_shared
        return call(self.params, self.buffers, x)

    # -- members as ordinary modules -----------------------------------------------------

    def member_state_dict(self, i: int) -> dict[str, Tensor]:
        """Member ``i``'s parameters and buffers, shaped as its own module's state_dict."""
        state = {name: p.detach()[i].clone() for name, p in self.params.items()}
        state.update({name: b[i].clone() for name, b in self.buffers.items()})
        state.update({alias: state[name] for alias, name in self._aliases.items()})
        return state

    def member_module(self, i: int) -> nn.Module:
        """Member ``i`` as an ordinary module on the population's device."""
        module = copy.deepcopy(self._template).to(self.device)
        module.load_state_dict(self.member_state_dict(i))
        module.train(self._base.training)
        return module
