"""hposvc as a user installs it: the wheel, in a fresh virtual environment outside the
repository, run from an empty folder. Nothing may be read from the source tree.

The fresh environment reuses this one's dependencies (torch, optuna, mlflow, ...) through a
``.pth`` line naming this environment's site-packages: a plain path line, so this
environment's own ``.pth`` files, among them the editable install's finder that would
import hposvc from the source tree, are not run there. An audit hook in the fresh
environment records every file opened or listed under the repository (its ``.venv`` with
the dependencies aside), in every process started there; the test fails if it records any.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"

# Installed into the fresh environment's site-packages as a module and a .pth that imports
# it at every interpreter start. HPOSVC_TEST_SOURCE_READS names the log file.
AUDIT_MODULE = """\
import os, sys

_repo = {repo!r}
_allowed = {allowed!r}
_log = os.environ.get("HPOSVC_TEST_SOURCE_READS")
if _log:
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # before the hook: not audited

    def _hook(event, args):
        if event not in ("open", "os.listdir", "os.scandir") or not args or args[0] is None:
            return
        path = args[0]
        if isinstance(path, int):  # a file descriptor
            return
        path = os.path.abspath(os.fsdecode(path))
        if path == _repo or (path.startswith(_repo + os.sep) and not path.startswith(_allowed + os.sep)):
            os.write(_fd, f"{{event}} {{path}}\\n".encode())

    sys.addaudithook(_hook)
"""


def _shipped_names() -> list[str]:
    return sorted(str(p.relative_to(STUDIES).with_suffix("")) for p in STUDIES.rglob("*.toml"))


def test_every_package_is_in_pyproject() -> None:
    """pyproject.toml lists hposvc's packages by hand (a mapped studies/ package cannot be
    added to packages.find): a new subpackage must be listed, or the wheel lacks it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    listed = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "hposvc").rglob("__init__.py")}
    assert on_disk - set(listed) == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert "hposvc._studies" in listed


def test_builtin_specs_are_the_repository_studies() -> None:
    """This environment (an editable install in a clone) finds the built-in specs through
    the same package mapping as the wheel: studies/ itself, not a copy."""
    from hposvc.builtin import builtin_spec, builtin_specs

    assert [s.name for s in builtin_specs()] == _shipped_names()
    assert builtin_spec("quickstart").resolve() == STUDIES / "quickstart.toml"
    assert [s.name for s in builtin_specs("survey")] == ["survey/digits", "survey/mnist1d", "survey/moons"]


def test_cli_names_a_builtin_spec_and_a_local_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from hposvc.cli import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["study", "validate", "guide/full/zero-init", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["name"] == "guide-zero-init"
    assert r.stderr == f"using the built-in spec 'guide/full/zero-init' ({STUDIES / 'guide' / 'full' / 'zero-init.toml'})\n"

    (tmp_path / "quickstart.toml").write_text((STUDIES / "quickstart.toml").read_text(encoding="utf-8").replace('name = "quickstart"', 'name = "mine"'), encoding="utf-8")
    r = CliRunner().invoke(main, ["study", "validate", "quickstart.toml", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["name"] == "mine"
    assert r.stderr.startswith("using the local file 'quickstart.toml', not the built-in spec 'quickstart' (")

    r = CliRunner().invoke(main, ["study", "run", "quikstart", "--data-dir", str(tmp_path / "data")])
    assert r.exit_code == 2 and r.stdout == ""
    assert "the 'spec' parameter must be an existing TOML file or the name of a built-in spec. Got 'quikstart' instead." in r.stderr
    assert "hposvc study list-builtin" in r.stderr
    assert not (tmp_path / "data").exists()


def test_cli_version_and_list_builtin() -> None:
    from importlib.metadata import version

    from click.testing import CliRunner

    from hposvc.cli import main

    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[:4] == [f"{p} {version(p)}" for p in ("hposvc", "torch", "optuna", "mlflow")]
    r = CliRunner().invoke(main, ["study", "list-builtin", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == _shipped_names()
    assert {"name": "quickstart", "study": "quickstart", "task": "digits", "n_trials": 12, "path": str(STUDIES / "quickstart.toml")} in rows


@pytest.mark.slow
def test_wheel_installs_and_runs_from_any_folder(tmp_path: Path) -> None:
    # 1) Build the wheel from a copy of what the build reads, so nothing is written into the
    #    repository (pip builds in the source folder). pip may fetch setuptools for the build.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("hposvc", "studies"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(src)], cwd=tmp_path, timeout=300)
    (wheel,) = dist.glob("hposvc-*.whl")
    shutil.rmtree(src)  # the installed package must not find the copy either

    # 2) A fresh venv (created from this one's base interpreter) that sees this venv's
    #    packages, with the source-read audit hook; then the wheel, installed by pip.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_hposvc_test_deps.pth").write_text("".join(f"{p}\n" for p in deps), encoding="utf-8")
    # this venv (the dependencies) may be inside the repository, as .venv
    (site / "hposvc_test_audit.py").write_text(AUDIT_MODULE.format(repo=str(REPO), allowed=sys.prefix), encoding="utf-8")
    (site / "aa_hposvc_test_audit.pth").write_text("import hposvc_test_audit\n", encoding="utf-8")
    python, hposvc = venv / "bin" / "python", venv / "bin" / "hposvc"
    # --ignore-installed: never uninstall the hposvc this venv sees from the outer one
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed", str(wheel)], cwd=tmp_path)

    # 3) From an empty folder, as a user would.
    cwd = tmp_path / "empty"
    cwd.mkdir()
    reads = tmp_path / "source-reads.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MLFLOW_TRACKING_URI", "HPOSVC_STORAGE")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HPOSVC_DATA_DIR=str(tmp_path / "data"), HPOSVC_TEST_SOURCE_READS=str(reads))

    where = _run([str(python), "-c", "import hposvc, hposvc.builtin as b; print(hposvc.__file__); print(b.builtin_spec('quickstart'))"], cwd=cwd, env=env).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where

    version = _run([str(hposvc), "--version"], cwd=cwd, env=env).stdout
    assert [line.split()[0] for line in version.splitlines()] == ["hposvc", "torch", "optuna", "mlflow", "python"], version
    assert "hposvc 0.1.0" in version.splitlines()

    listed = json.loads(_run([str(hposvc), "study", "list-builtin", "--json"], cwd=cwd, env=env).stdout)
    assert [row["name"] for row in listed] == _shipped_names()
    assert all(Path(row["path"]).is_relative_to(site) for row in listed)

    # `hposvc study validate NAME` for every shipped spec, in one process (26 interpreter
    # starts would take longer than the rest of the test), then the guide's spec lists.
    check = (
        "import sys; from hposvc.cli import main\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        main(['study', 'validate', name, '--json'], standalone_mode=False)\n"
        "    except SystemExit as e:\n"
        "        if e.code: raise\n"
        "from hposvc.report import guide_spec_paths\n"
        "print('GUIDE', len(guide_spec_paths(scale='ci')), len(guide_spec_paths(scale='full')))\n"
    )
    validated = _run([str(python), "-c", check, *_shipped_names()], cwd=cwd, env=env)
    assert validated.stdout.count('"valid": true') == len(_shipped_names())
    assert validated.stderr.count("using the built-in spec") == len(_shipped_names())
    n_guide = len(list((STUDIES / "guide").glob("*.toml")))
    assert f"GUIDE {n_guide} {n_guide}" in validated.stdout

    ran = _run([str(hposvc), "study", "run", "quickstart", "--n-trials", "2", "--quiet", "--json", "--device", "cpu"], cwd=cwd, env=env, timeout=600)
    assert f"using the built-in spec 'quickstart' ({site / 'hposvc' / '_studies' / 'quickstart.toml'})" in ran.stderr
    result = json.loads(ran.stdout)
    assert (result["study_name"], result["n_done"], result["ran"]) == ("quickstart", 2, 2), result
    assert str(tmp_path / "data") in result["storage"] and result["best_value"] is not None, result
    assert sorted(os.listdir(cwd)) == []  # everything went to HPOSVC_DATA_DIR

    # 4) A local file of the same name wins, and the message says so.
    (cwd / "quickstart").write_text((STUDIES / "quickstart.toml").read_text(encoding="utf-8").replace('name = "quickstart"', 'name = "mine"'), encoding="utf-8")
    local = _run([str(hposvc), "study", "validate", "quickstart", "--json"], cwd=cwd, env=env)
    assert json.loads(local.stdout)["name"] == "mine"
    assert "using the local file 'quickstart', not the built-in spec 'quickstart'" in local.stderr

    assert reads.exists(), "the audit hook did not run in the fresh environment"
    assert reads.read_text(encoding="utf-8") == "", "read from the source tree:\n" + reads.read_text(encoding="utf-8")[:2000]


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc
