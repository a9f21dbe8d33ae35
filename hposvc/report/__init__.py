"""``hposvc report``: the optimisation guide's claims, tested on stored trials, as an HTML
page a person opens in a browser.

For each requested study (or every guide study), the report shows the claim it tests,
the figures that answer it, a verdict per hypothesis (*supported*, *not supported* or
*inconclusive*) computed from the stored trials with the statistic behind it, and the
numbers in a table. It is written as ``index.html`` plus PNG figures (and
``report.json``, the same content as data) into one folder, and logged to each study's
MLflow parent run as artifacts under ``report/``.

>>> from hposvc.report import GUIDE_STUDIES, build_report
>>> report = build_report(GUIDE_STUDIES, storage="sqlite:///hposvc-data/hposvc.db", out_dir="report")  # doctest: +SKIP
>>> report.verdicts["zero-init"]                                                                       # doctest: +SKIP
'supported'

Pieces: :mod:`hposvc.report.claims` (claims, hypotheses, decision rules),
:mod:`hposvc.report.stats` (bootstrap, best-of-k), :mod:`hposvc.report.data` (trials as
frames), :mod:`hposvc.report.figures` and :mod:`hposvc.report.html`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hposvc.errors import InvalidInputError, TrackingError
from hposvc.storage import redact
from hposvc.report.claims import CLAIMS, GUIDE_STUDIES, Claim, ClaimResult, Verdict, claim_for_study
from hposvc.report.data import StudyData, load_study_data
from hposvc.report.figures import Figure
from hposvc.report.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, VERDICTS

__all__ = [
    "CLAIMS",
    "GUIDE_STUDIES",
    "INCONCLUSIVE",
    "NOT_SUPPORTED",
    "Report",
    "SCALES",
    "SUPPORTED",
    "Section",
    "VERDICTS",
    "Verdict",
    "build_report",
    "guide_spec_paths",
    "run_guide",
]

log = logging.getLogger(__name__)

SCALES = ("ci", "full")  # studies/guide/*.toml (CI budget) and studies/guide/full/*.toml
GUIDE_GROUP = "guide"  # the guide's built-in specs: studies/guide/ in the repository (hposvc.builtin)
ARTIFACT_PATH = "report"  # folder of the report inside each study's MLflow parent run
REPORT_TITLE = "hposvc: the optimisation guide, tested"


@dataclass(frozen=True)
class Section:
    """One claim (or one study without a claim) of the report."""

    claim: Claim | None  # None: a study that tests no guide claim
    studies: tuple[str, ...]  # the studies behind it, as present in storage
    verdict: str | None  # overall verdict; None without a claim
    verdicts: tuple[Verdict, ...]
    table: pd.DataFrame = field(repr=False)
    figures: tuple[Figure, ...]
    study_info: tuple[dict[str, Any], ...]  # name, task, metric, trials per state

    @property
    def anchor(self) -> str:
        return f"claim-{self.claim.key}" if self.claim else "study-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.studies[0])

    def to_dict(self) -> dict[str, Any]:
        table = json.loads(self.table.to_json(orient="records")) if not self.table.empty else []
        return {
            "claim": None if self.claim is None else {"key": self.claim.key, "number": self.claim.number, "title": self.claim.title, "text": self.claim.text},
            "studies": list(self.studies),
            "verdict": self.verdict,
            "verdicts": [v.to_dict() for v in self.verdicts],
            "figures": [f.to_dict() for f in self.figures],
            "table": table,
            "study_info": list(self.study_info),
        }


@dataclass(frozen=True)
class Report:
    """A written report: where it is and what it concluded."""

    title: str
    out_dir: Path  # folder holding index.html, report.json and the figures
    storage: str  # study database it was computed from (password hidden)
    sections: tuple[Section, ...]
    mlflow_runs: Mapping[str, str | None]  # study -> parent run the report was logged to (None: not logged)

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"

    @property
    def verdicts(self) -> dict[str, str]:
        """Overall verdict per claim key, e.g. ``{"zero-init": "supported", ...}``."""
        return {s.claim.key: s.verdict for s in self.sections if s.claim is not None and s.verdict is not None}

    def verdict(self, key: str) -> Verdict:
        """The hypothesis verdict with ``key`` (e.g. ``"relu-he-beats-xavier"``)."""
        for s in self.sections:
            for v in s.verdicts:
                if v.key == key:
                    return v
        raise KeyError(key)

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "out_dir": str(self.out_dir),
            "index": str(self.index),
            "storage": self.storage,
            "verdicts": self.verdicts,
            "sections": [s.to_dict() for s in self.sections],
            "mlflow_runs": dict(self.mlflow_runs),
        }


# -- building --------------------------------------------------------------------------------


def build_report(
    studies: Sequence[str],
    *,
    storage: str | None = None,
    out_dir: str | os.PathLike[str],
    tracking_uri: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    log_to_mlflow: bool = True,
    title: str = REPORT_TITLE,
) -> Report:
    """Compute the verdicts of ``studies`` from ``storage`` and write the report to ``out_dir``.

    Studies that test a guide claim are grouped under their claim (in the guide's order);
    any other study gets a section of its own with its learning curves and history. The
    report is then logged to each study's MLflow parent run (experiment ``hposvc/<study>``,
    run tagged ``hposvc.role=study``) under ``report/``, unless ``log_to_mlflow`` is False.

    >>> r = build_report(["guide-zero-init"], storage="sqlite:///hposvc-data/hposvc.db", out_dir="out")  # doctest: +SKIP
    >>> r.verdict("zero-init-identical-units").verdict                                                # doctest: +SKIP
    'supported'
    """
    from hposvc.report import figures as fig
    from hposvc.report.html import render
    from hposvc.storage import resolve_storage_url

    names = list(dict.fromkeys(studies))
    if not names:
        raise InvalidInputError("the 'studies' parameter must name at least one study. Got none instead. CLI: hposvc report NAME ... or --guide.")
    url = resolve_storage_url(storage, data_dir=data_dir)
    data = {name: _load(name, url) for name in names}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_figures(out)

    sections: list[Section] = []
    covered: set[str] = set()
    for claim in CLAIMS:
        present = {s: data[s] for s in claim.studies if s in data}
        if not present:
            continue
        covered.update(present)
        result: ClaimResult = claim.evaluate(present)
        figures = [f for kind in claim.figures for f in fig.draw(kind, present, out, prefix=f"claim{claim.number}-{claim.key}")]
        sections.append(
            Section(claim, tuple(present), result.verdict, result.verdicts, result.table, tuple(figures), tuple(_info(d) for d in present.values()))
        )
    for name in names:
        if name in covered:
            continue
        d = data[name]
        prefix = "study-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name)
        figures = fig.draw("curves", {name: d}, out, prefix=prefix) + fig.draw("history", {name: d}, out, prefix=prefix)
        sections.append(Section(None, (name,), None, (), _top_trials(d), tuple(figures), (_info(d),)))

    report = Report(title=title, out_dir=out, storage=redact(url), sections=tuple(sections), mlflow_runs={})
    (out / "index.html").write_text(render(report), encoding="utf-8")
    _write_json(report)
    if log_to_mlflow:
        from hposvc.storage import resolve_tracking_uri

        runs = log_report(report, tracking_uri=resolve_tracking_uri(tracking_uri, data_dir=data_dir), uids={n: d.uid for n, d in data.items()})
        report = Report(title=report.title, out_dir=out, storage=report.storage, sections=report.sections, mlflow_runs=runs)
        _write_json(report)  # the local copy also says where the report was logged
    return report


def _write_json(report: Report) -> None:
    (report.out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")


def _load(name: str, url: str) -> StudyData:
    try:
        return load_study_data(name, storage=url)
    except InvalidInputError as e:
        claim = claim_for_study(name)
        if claim is None:
            raise
        spec = claim.spec_files[claim.studies.index(name)]
        raise InvalidInputError(
            f"guide study {name!r} is not in {redact(url)}: run it first, e.g. `hposvc study run {GUIDE_GROUP}/{spec.removesuffix('.toml')}` "
            f"(studies/{GUIDE_GROUP}/{spec}, shipped with hposvc), or every guide study: `hposvc report --guide --run --out DIR`."
        ) from e


def _remove_old_figures(out: Path) -> None:
    """Delete the figures an earlier report wrote here (listed in its report.json), so
    none linger; nothing else in the folder is touched."""
    try:
        old = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for section in old.get("sections", []):
        for f in section.get("figures", []):
            path = out / Path(str(f.get("file", ""))).name
            if path.suffix == ".png" and path.is_file():
                path.unlink()


def _info(d: StudyData) -> dict[str, Any]:
    counts = d.trials.state.value_counts().to_dict()
    return {
        "study": d.name,
        "task": d.task_key,
        "metric": d.metric,
        "trials": int(len(d.trials)),
        **{state.lower(): int(n) for state, n in sorted(counts.items())},
    }


def _top_trials(d: StudyData, k: int = 10) -> pd.DataFrame:
    f = d.trials[d.trials.value.notna()].sort_values("value", ascending=not d.maximize).head(k)
    varying = [c for c in ("optimizer", "lr", "init", "norm", "activation", "batch_size", "depth", "width", "seed") if c in f.columns and d.trials[c].nunique(dropna=True) > 1]
    return f[["number", "state", "value", *varying]].reset_index(drop=True)



# -- MLflow --------------------------------------------------------------------------------


def log_report(report: Report, *, tracking_uri: str, uids: Mapping[str, str]) -> dict[str, str | None]:
    """Log the report's files to each of its studies' MLflow parent runs (under
    ``report/``) and tag the run with its claim's verdict; returns study -> run id (None
    where the study has no parent run in this tracking store). ``uids``: study -> its
    stored uid, so a re-created study's report never lands on its namesake's run.

    Raises :class:`~hposvc.errors.TrackingError` when the tracking store fails.
    """
    from hposvc.tracking import find_study_run, mlflow_client

    client = mlflow_client(tracking_uri)
    runs: dict[str, str | None] = {}
    # the report's own files only: the folder may hold other things (a screenshot, a user's files)
    names = ["index.html", "report.json", *(f.file for s in report.sections for f in s.figures)]
    files = [report.out_dir / n for n in names if (report.out_dir / n).is_file()]
    for section in report.sections:
        for study in section.studies:
            try:
                found = find_study_run(client, study, uid=uids.get(study, ""))
                if found is None:
                    log.warning("study %s has no MLflow parent run in %s; report not logged there", study, tracking_uri)
                    runs[study] = None
                    continue
                run_id = found.info.run_id
                for path in files:
                    client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_PATH)
                if section.verdict is not None:
                    client.set_tag(run_id, "hposvc.report.verdict", section.verdict)
                runs[study] = run_id
            except Exception as e:  # noqa: BLE001 (MLflow raises many types; all mean the store failed)
                raise TrackingError(f"could not log the report of study {study!r} to MLflow at {tracking_uri}: {e}") from e
    return runs


# -- running the guide ------------------------------------------------------------------------


def guide_spec_paths(*, scale: str = "ci", guide_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The guide's spec files for ``scale`` ("ci": ``studies/guide/*.toml``, the small
    budget; "full": ``studies/guide/full/*.toml``), in claim order: the ones that ship
    with hposvc, or those in ``guide_dir`` (a folder laid out like studies/guide/)."""
    from hposvc.builtin import builtin_spec

    if scale not in SCALES:
        raise InvalidInputError(f"the 'scale' parameter must be one of {', '.join(map(repr, SCALES))}. Got {scale!r} instead.")
    sub = "full/" if scale == "full" else ""
    paths = []
    for claim in CLAIMS:
        for spec in claim.spec_files:
            if guide_dir is None:
                paths.append(builtin_spec(f"{GUIDE_GROUP}/{sub}{spec}"))
                continue
            path = Path(guide_dir) / sub / spec
            if not path.is_file():
                raise InvalidInputError(f"the guide spec {str(path)!r} does not exist. Pass a guide_dir laid out like studies/guide/ (full/ for the full scale), or none for the specs that ship with hposvc.")
            paths.append(path)
    return paths


def run_guide(
    *,
    scale: str = "ci",
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    guide_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> list[str]:
    """Run (or resume) every guide study at ``scale``; returns the study names.

    CI and full specs share study names, so run them into different storages (e.g.
    ``--data-dir guide-full``).

    >>> run_guide(scale="full", data_dir="guide-full")  # doctest: +SKIP
    """
    from hposvc.study import run_study

    names = []
    for path in guide_spec_paths(scale=scale, guide_dir=guide_dir):
        result = run_study(path, storage=storage, tracking_uri=tracking_uri, data_dir=data_dir, progress=progress)
        names.append(result.study_name)
    return names
