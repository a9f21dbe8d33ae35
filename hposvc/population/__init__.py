"""Population execution: train many same-shaped trials at once as one vectorised model.

Trials whose configs share a :func:`population_key` (same optimizer, batch size and
epochs, and one model structure: hposvc's family, depth, width, norm and activation, or
the :func:`structure_key` of the user's built model) are stacked into one
:class:`PopulationModel`, run with ``torch.func.vmap`` over ``functional_call``, and
updated by one :class:`BatchedOptimizer` whose hyper-parameters are per-member tensors.
:func:`train_population` is the batched twin of :func:`hposvc.train.train`; both run
one loop (:func:`hposvc.train.run_loop`). :func:`vmap_reason` says, naming the layer
and line, why a model cannot be vectorised (such trials train one at a time).

>>> from hposvc.config import TrialConfig
>>> from hposvc.tasks import load_task
>>> cfgs = [TrialConfig(optimizer="adam", lr=lr, epochs=1, width=16) for lr in (1e-3, 1e-2)]
>>> groups = group_configs(cfgs)
>>> groups
[[0, 1]]
>>> results = train_population([cfgs[i] for i in groups[0]], load_task("moons"), device="cpu")
>>> [r.status for r in results]
['completed', 'completed']
"""

from __future__ import annotations

from hposvc.population.model import PopulationModel, build_members
from hposvc.population.optim import BatchedOptimizer
from hposvc.population.train import group_configs, population_key, population_ready, population_seed, train_population
from hposvc.population.vmappable import structure_key, vmap_reason

__all__ = [
    "BatchedOptimizer",
    "PopulationModel",
    "build_members",
    "group_configs",
    "population_key",
    "population_ready",
    "population_seed",
    "structure_key",
    "train_population",
    "vmap_reason",
]
