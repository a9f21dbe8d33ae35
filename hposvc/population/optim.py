"""One optimizer update for a whole population of stacked parameters.

Every tensor handed to :class:`BatchedOptimizer` has a leading member dimension ``M``;
member ``m``'s numbers (lr, momentum, β, ε, ρ, weight decay) are the ``m``-th entries of
``(M,)`` tensors that are broadcast over the remaining dimensions, and its state (step
count, moment buffers) is the ``m``-th slice of the state tensors. The update rules are
torch.optim's own formulas (``_single_tensor_*`` in ``torch/optim/*.py``) with the options
hposvc uses: SGD with dampening 0 and coupled weight decay, Adagrad with lr_decay 0 and a
zero initial accumulator, RMSprop uncentred without momentum, Adam/NAdam with coupled and
AdamW with decoupled weight decay, NAdam with momentum_decay 4e-3. The test suite checks
each one against torch.optim member by member.

Per-member scalars (bias corrections, schedule-scaled learning rates) are computed in
float64, as torch.optim does with Python floats, and only then cast to the parameter
dtype, so long runs do not drift from the sequential numbers.

Members leave a population by being *dropped*, not masked: :meth:`BatchedOptimizer.keep`
index-selects the state, so a pruned or diverged member costs nothing afterwards. (A mask
would keep paying for dead members and would need NaN-safe arithmetic for diverged ones.)

>>> import torch
>>> from hposvc.config import TrialConfig
>>> p = torch.zeros(2, 3)                       # two members, three numbers each
>>> opt = BatchedOptimizer([p], [TrialConfig(optimizer="sgd", lr=0.1),
...                              TrialConfig(optimizer="sgd", lr=1.0)])
>>> opt.step([p], [torch.ones(2, 3)])
>>> p[:, 0].tolist()
[-0.10000000149011612, -1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hposvc.config import ONE_SHOT_DEFAULTS, TrialConfig
from hposvc.errors import invalid

__all__ = ["BatchedOptimizer", "NADAM_MOMENTUM_DECAY", "STATE_BUFFERS"]

# torch.optim.NAdam's default ψ, which hposvc's sequential optimizer uses as well.
NADAM_MOMENTUM_DECAY = 4e-3

# The per-element state each rule keeps (one tensor per parameter tensor, same shape).
STATE_BUFFERS: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "momentum": ("momentum_buffer",),
    "nesterov": ("momentum_buffer",),
    "adagrad": ("sum",),
    "adadelta": ("square_avg", "acc_delta"),
    "rmsprop": ("square_avg",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
    "nadam": ("exp_avg", "exp_avg_sq"),
}


class BatchedOptimizer:
    """torch.optim's update rule for ``M`` members at once, each with its own numbers.

    ``params`` are the stacked parameter tensors (leading dimension ``M``) and
    ``configs`` the members' trial configs, in the same order; all configs must name the
    same optimizer (its state has a different shape per rule). :meth:`step` updates the
    parameters in place, so views of them (e.g. per-layer views of one flat buffer) stay
    valid.

    >>> import torch
    >>> from hposvc.config import TrialConfig
    >>> w = torch.ones(3, 4)
    >>> cfgs = [TrialConfig(optimizer="adam", lr=lr) for lr in (1e-3, 1e-2, 1e-1)]
    >>> opt = BatchedOptimizer([w], cfgs)
    >>> opt.step([w], [torch.ones(3, 4)])
    >>> [round(v, 4) for v in w[:, 0].tolist()]      # Adam's first step is lr * sign(g)
    [0.999, 0.99, 0.9]
    """

    def __init__(self, params: Sequence[Tensor], configs: Sequence[TrialConfig]) -> None:
        if not configs:
            raise invalid("configs", list(configs), "a non-empty list of TrialConfig")
        kinds = sorted({c.optimizer for c in configs})
        if len(kinds) != 1:
            raise invalid(
                "configs",
                kinds,
                "configs that all use the same optimizer",
                hint="Group trials by optimizer (hposvc.population.population_key) first.",
            )
        self.kind: str = kinds[0]
        m = len(configs)
        for p in params:
            if p.shape[:1] != (m,):
                raise invalid("params", tuple(p.shape), f"tensors whose first dimension is the {m} members")
        device = params[0].device if params else torch.device("cpu")
        # Hyper-parameters as float64 (M,) tensors: torch.optim computes with Python floats.
        self.hparams: dict[str, Tensor] = {
            name: torch.tensor([getattr(c, name) for c in configs], dtype=torch.float64, device=device)
            for name in ONE_SHOT_DEFAULTS[self.kind]
        }
        # Zero-initialised buffers reproduce torch's first step exactly: a momentum buffer
        # that starts as ``0 * μ + g`` is the clone of g that SGD makes on step 1.
        self.state: list[dict[str, Tensor]] = [
            {name: torch.zeros_like(p, memory_format=torch.preserve_format) for name in STATE_BUFFERS[self.kind]}
            for p in params
        ]
        self.steps = torch.zeros(m, dtype=torch.float64, device=device)  # updates applied so far
        self.mu_product = torch.ones(m, dtype=torch.float64, device=device)  # NAdam's Π μ_t
        # Weight decay 0 for everyone: skip the pass (adding 0·p is exact but not free).
        self._any_decay = bool((self.hparams["weight_decay"] != 0).any())
        self._work: list[tuple[Tensor, Tensor]] | None = None

    @property
    def n_members(self) -> int:
        return int(self.steps.shape[0])

    def lr(self, lr_scale: Tensor | None = None) -> Tensor:
        """Each member's effective learning rate (float64, shape (M,)) under ``lr_scale``."""
        base = self.hparams["lr"]
        return base if lr_scale is None else base * lr_scale.to(device=base.device, dtype=torch.float64)

    def keep(self, index: Tensor | Sequence[int]) -> None:
        """Keep only the members at ``index`` (in that order); drop the others' state."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.steps.device)
        self.hparams = {k: v.index_select(0, index) for k, v in self.hparams.items()}
        self.state = [{k: v.index_select(0, index) for k, v in s.items()} for s in self.state]
        self.steps = self.steps.index_select(0, index)
        self.mu_product = self.mu_product.index_select(0, index)
        self._any_decay = bool((self.hparams["weight_decay"] != 0).any())
        self._work = None

    @torch.no_grad()
    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], *, lr_scale: Tensor | None = None) -> None:
        """Apply one update to every member in place.

        ``lr_scale`` is each member's schedule multiplier for this step (shape (M,), the
        :func:`hposvc.optim.lr_factor` value); ``None`` means 1. ``grads`` are used as
        scratch space and hold garbage afterwards: no step allocates a parameter-sized
        tensor, which on the CPU is what keeps a large population fast (fresh big
        allocations are page-faulted in on every step).
        """
        if len(params) != len(self.state) or len(grads) != len(self.state):
            raise invalid("params", len(params), f"{len(self.state)} tensors, as given to the constructor")
        self.steps += 1
        coef = self._coefficients(self.lr(lr_scale))
        names = list(coef)
        # One stack and one cast for all per-member scalars, then cheap views per tensor.
        table = torch.stack([coef[k] for k in names])
        casts: dict[tuple[torch.dtype, int], dict[str, Tensor]] = {}
        for p, g, state, scratch in zip(params, grads, self.state, self._scratch(params)):
            key = (p.dtype, p.dim())
            if key not in casts:
                cast = table.to(p.dtype)
                shape = (cast.shape[1],) + (1,) * (p.dim() - 1)
                casts[key] = {k: cast[j].view(shape) for j, k in enumerate(names)}
            self._update(p, g, state, casts[key], scratch)

    def _scratch(self, params: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Two parameter-sized work buffers per tensor, allocated once (and after keep)."""
        if self._work is None or any(
            w[0].shape != p.shape or w[0].dtype != p.dtype or w[0].device != p.device
            for w, p in zip(self._work, params)
        ):
            self._work = [(torch.empty_like(p), torch.empty_like(p)) for p in params]
        return self._work

    # -- per-member scalars ----------------------------------------------------------

    def _coefficients(self, lr: Tensor) -> dict[str, Tensor]:
        """The (M,) float64 scalars this step's rule needs, named for the formulas below."""
        h, step = self.hparams, self.steps
        c: dict[str, Tensor] = {"neg_lr": -lr, "wd": h["weight_decay"]}
        if "momentum" in h:
            c["mu"] = h["momentum"]
        if "eps" in h:
            c["eps"] = h["eps"]
        if "rho" in h:
            c["one_minus_rho"] = 1.0 - h["rho"]
        if "beta1" in h:
            c["one_minus_b1"], c["one_minus_b2"] = 1.0 - h["beta1"], 1.0 - h["beta2"]
        if self.kind in ("adam", "adamw"):
            c["neg_step_size"] = -lr / (1.0 - h["beta1"] ** step)
            c["bc2_sqrt"] = (1.0 - h["beta2"] ** step).sqrt()
            c["decay"] = 1.0 - lr * h["weight_decay"]  # AdamW's decoupled shrink
        if self.kind == "nadam":
            b1 = h["beta1"]
            mu = b1 * (1.0 - 0.5 * 0.96 ** (step * NADAM_MOMENTUM_DECAY))
            mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * NADAM_MOMENTUM_DECAY))
            self.mu_product *= mu
            c["bc2"] = 1.0 - h["beta2"] ** step
            c["grad_coef"] = -lr * (1.0 - mu) / (1.0 - self.mu_product)
            c["avg_coef"] = -lr * mu_next / (1.0 - self.mu_product * mu_next)
        return c

    # -- the rules (torch/optim/<name>.py, _single_tensor_<name>), written in place ------
    #
    # ``a.lerp_(b, w)`` stands for torch's ``a.mul_(1 - w).add_(b, alpha=w)`` (EMA
    # updates); it is one pass instead of two and differs only in the last bit.

    def _update(
        self, p: Tensor, g: Tensor, s: dict[str, Tensor], c: dict[str, Tensor], work: tuple[Tensor, Tensor]
    ) -> None:
        kind, tmp, tmp2 = self.kind, work[0], work[1]
        if kind == "adamw":
            if self._any_decay:
                p.mul_(c["decay"])  # decoupled: shrink the weights, leave the gradient alone
        elif self._any_decay:
            g.addcmul_(p, c["wd"])  # L2 folded into the gradient (coupled)

        if kind in ("sgd", "momentum", "nesterov"):
            if kind != "sgd":
                buf = s["momentum_buffer"]
                buf.mul_(c["mu"]).add_(g)  # μ·buf + g (dampening 0), in torch's order: exact
                if kind == "nesterov":
                    g.addcmul_(buf, c["mu"])  # look ahead: g + μ·buf
                else:
                    g = buf
            p.addcmul_(g, c["neg_lr"])
        elif kind == "adagrad":
            s["sum"].addcmul_(g, g)
            torch.sqrt(s["sum"], out=tmp).add_(c["eps"])
            p.addcmul_(g.div_(tmp), c["neg_lr"])
        elif kind == "adadelta":
            sq, acc = s["square_avg"], s["acc_delta"]
            sq.lerp_(torch.mul(g, g, out=tmp), c["one_minus_rho"])
            std = torch.add(sq, c["eps"], out=tmp).sqrt_()
            delta = torch.add(acc, c["eps"], out=tmp2).sqrt_().div_(std).mul_(g)
            acc.lerp_(torch.mul(delta, delta, out=tmp), c["one_minus_rho"])
            p.addcmul_(delta, c["neg_lr"])
        elif kind == "rmsprop":
            sq = s["square_avg"]
            sq.lerp_(torch.mul(g, g, out=tmp), c["one_minus_rho"])
            torch.sqrt(sq, out=tmp).add_(c["eps"])
            p.addcmul_(g.div_(tmp), c["neg_lr"])
        elif kind in ("adam", "adamw"):
            m, v = s["exp_avg"], s["exp_avg_sq"]
            m.lerp_(g, c["one_minus_b1"])
            v.lerp_(torch.mul(g, g, out=tmp), c["one_minus_b2"])
            torch.sqrt(v, out=tmp)
            torch.addcdiv(c["eps"], tmp, c["bc2_sqrt"], out=tmp)  # √v / √(1-β2^t) + ε
            p.addcmul_(torch.div(m, tmp, out=tmp), c["neg_step_size"])
        elif kind == "nadam":
            m, v = s["exp_avg"], s["exp_avg_sq"]
            m.lerp_(g, c["one_minus_b1"])
            v.lerp_(torch.mul(g, g, out=tmp), c["one_minus_b2"])
            torch.div(v, c["bc2"], out=tmp).sqrt_().add_(c["eps"])
            p.addcmul_(g.div_(tmp), c["grad_coef"])
            p.addcmul_(torch.div(m, tmp, out=tmp2), c["avg_coef"])
        else:  # STATE_BUFFERS lists every rule; reaching here means a new one without code
            raise NotImplementedError(f"no batched update for optimizer {kind!r}")
