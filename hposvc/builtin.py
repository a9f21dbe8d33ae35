"""The study specs that ship with hposvc: the quickstart, the guide's studies, the survey.

They live in the repository's ``studies/`` folder, the one copy; the build installs that
folder as the package ``hposvc._studies`` (``[tool.setuptools.package-dir]`` in
pyproject.toml, for wheels and editable installs alike; ``studies/__init__.py`` makes it a
regular package, which editable installs need), so hposvc finds them with
``importlib.resources`` from any working directory.

A built-in spec is named by its path under ``studies/`` without ``.toml``:
``quickstart``, ``guide/zero-init``, ``guide/full/zero-init``, ``survey/digits``.

>>> from hposvc.builtin import builtin_spec, builtin_specs, resolve_spec
>>> builtin_spec("quickstart").name
'quickstart.toml'
>>> [s.name for s in builtin_specs("survey")]
['survey/digits', 'survey/mnist1d', 'survey/moons']
>>> path, note = resolve_spec("quickstart")  # a local file named "quickstart" would win
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from hposvc.errors import HposvcError, SpecError, invalid

__all__ = ["BuiltinSpec", "builtin_spec", "builtin_specs", "resolve_spec"]

PACKAGE = "hposvc._studies"  # the installed studies/ folder (see the module docstring)
SUFFIX = ".toml"


@dataclass(frozen=True)
class BuiltinSpec:
    """One spec file that ships with hposvc."""

    name: str  # its path under studies/ without .toml, e.g. "guide/full/zero-init"
    path: Path  # the installed file


def builtin_specs(group: str | None = None) -> list[BuiltinSpec]:
    """Every built-in spec, sorted by name; only those directly in ``group`` (a folder
    under studies/: "guide", "guide/full", "survey") when it is given."""
    found = sorted(_walk(_root(), ""), key=lambda s: s.name)
    if group is None:
        return found
    prefix = group.strip("/") + "/"
    return [s for s in found if s.name.startswith(prefix) and "/" not in s.name[len(prefix) :]]


def builtin_spec(name: str) -> Path:
    """The installed file of the built-in spec ``name`` ("quickstart" or "quickstart.toml")."""
    key = name.removesuffix(SUFFIX)
    for spec in builtin_specs():
        if spec.name == key:
            return spec.path
    raise invalid("spec", name, "the name of a built-in spec", hint=f"Built-in specs: {', '.join(s.name for s in builtin_specs())}.", cls=SpecError)


def resolve_spec(arg: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """The spec file a user means by ``arg``, and a line saying which one it is when a
    built-in name was involved (None otherwise).

    A file at ``arg`` (relative to the working directory) wins; otherwise ``arg`` names a
    built-in spec.
    """
    local = Path(arg)
    key = str(arg).removesuffix(SUFFIX)
    shipped = {s.name: s.path for s in builtin_specs()}
    if local.is_file():
        if key in shipped:
            return local, f"using the local file {str(arg)!r}, not the built-in spec {key!r} ({shipped[key]})"
        return local, None
    if key in shipped:
        return shipped[key], f"using the built-in spec {key!r} ({shipped[key]})"
    if local.exists():  # a folder: load_spec says what is wrong with it
        return local, None
    raise invalid("spec", str(arg), "an existing TOML file or the name of a built-in spec", hint="`hposvc study list-builtin` lists the built-in specs.", cls=SpecError)


def _root() -> Traversable:
    try:
        return resources.files(PACKAGE)
    except ModuleNotFoundError as e:
        raise HposvcError(
            f"hposvc's built-in specs ({PACKAGE}) are not installed. Reinstall hposvc "
            "(`pip install .`, or `pip install -e .` in a clone: installs made before the specs shipped lack them)."
        ) from e


def _walk(folder: Traversable, prefix: str) -> list[BuiltinSpec]:
    specs = []
    for child in folder.iterdir():
        if child.is_dir():
            specs += _walk(child, f"{prefix}{child.name}/")
        elif child.name.endswith(SUFFIX):
            if not isinstance(child, os.PathLike):  # e.g. a zipped install: load_spec needs a file
                raise HposvcError(f"hposvc's built-in specs must be files on disk; {child} is not. Install hposvc unzipped (pip install).")
            specs.append(BuiltinSpec(name=prefix + child.name.removesuffix(SUFFIX), path=Path(child)))
    return specs
