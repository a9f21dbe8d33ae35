"""The report page: one self-contained HTML file (inline CSS, no scripts, no network)
beside its PNG figures."""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from hposvc.report import Report, Section

__all__ = ["render"]

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2329; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { margin: 0 0 4px; } h2 { margin-top: 0; } h3 { margin: 18px 0 6px; font-size: 16px; }
section.claim { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 20px 24px; margin: 24px 0; }
p.meta, p.small { color: #5b6570; font-size: 13px; }
blockquote { margin: 8px 0 14px; padding: 6px 14px; border-left: 4px solid #8aa4c8; background: #f1f5fb; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 12px; width: 100%; }
th, td { border-bottom: 1px solid #e4e7eb; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.verdict { display: inline-block; padding: 1px 9px; border-radius: 10px; font-weight: 600; font-size: 12px; white-space: nowrap; }
.v-supported { background: #d3f2dc; color: #15602c; }
.v-not-supported { background: #fad4d4; color: #8a1c1c; }
.v-inconclusive { background: #fdf0c8; color: #7a5a00; }
.v-none { background: #e9ecef; color: #444; }
figure { margin: 12px 0 18px; } figure img { max-width: 100%; border: 1px solid #e4e7eb; border-radius: 4px; }
figcaption { font-size: 13px; color: #5b6570; }
nav a { margin-right: 10px; }
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _badge(verdict: str | None) -> str:
    label = verdict or "no claim"
    cls = "v-" + (label.replace(" ", "-") if verdict else "none")
    return f'<span class="verdict {cls}" data-verdict="{_esc(label)}">{_esc(label)}</span>'


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "" if math.isnan(value) else str(value)
        return f"{value:.4g}"
    return _esc(value)


def _frame(df: pd.DataFrame, *, max_rows: int = 60) -> str:
    if df is None or df.empty:
        return '<p class="small">(no rows)</p>'
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    rows = []
    for rec in df.head(max_rows).itertuples(index=False):
        cells = []
        for v in rec:
            if isinstance(v, (list, tuple, dict)):
                cells.append(f"<td>{_esc(v)}</td>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{_num(float(v) if isinstance(v, float) else v)}</td>')
            else:
                try:
                    missing = pd.isna(v)
                except (TypeError, ValueError):
                    missing = False
                cells.append(f"<td>{'' if missing is True else _esc(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="small">{len(df) - max_rows} more rows not shown.</p>' if len(df) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"


def _interval(v: Any) -> str:
    if v.estimate is None:
        return ""
    if v.ci_low is None or v.ci_high is None:
        return _num(v.estimate)
    return f"{_num(v.estimate)} [{_num(v.ci_low)}, {_num(v.ci_high)}]"


def _verdicts(section: "Section") -> str:
    if not section.verdicts:
        return '<p class="small">This study tests no claim of the guide: figures and numbers only.</p>'
    rows = []
    for v in section.verdicts:
        rows.append(
            "<tr>"
            f'<td data-key="{_esc(v.key)}">{_esc(v.hypothesis)}</td>'
            f"<td>{_badge(v.verdict)}</td>"
            f'<td class="num">{_interval(v)}</td>'
            f'<td class="num">{v.n}</td>'
            f"<td>{_esc(v.statistic)}<br><span class='small'>Rule: {_esc(v.rule)}</span>"
            + (f"<br><span class='small'>Note: {_esc(v.note)}</span>" if v.note else "")
            + "</td></tr>"
        )
    head = "<tr><th>hypothesis</th><th>verdict</th><th>estimate [95% CI]</th><th>n</th><th>statistic</th></tr>"
    return f'<table class="verdicts"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _section(section: "Section") -> str:
    claim = section.claim
    if claim is not None:
        title = f"Claim {claim.number}: {_esc(claim.title)}"
        quote = f"<blockquote>{_esc(claim.text)}</blockquote>"
    else:
        title = f"Study {_esc(section.studies[0])}"
        quote = ""
    studies = _frame(pd.DataFrame(section.study_info))
    figures = "".join(
        f'<figure><img src="{_esc(f.file)}" alt="{_esc(f.title)}"><figcaption><b>{_esc(f.title)}.</b> {_esc(f.caption)}</figcaption></figure>'
        for f in section.figures
    )
    return (
        f'<section class="claim" id="{_esc(section.anchor)}" data-verdict="{_esc(section.verdict or "")}">'
        f"<h2>{title} {_badge(section.verdict) if claim is not None else ''}</h2>{quote}"
        f"<h3>Verdict</h3>{_verdicts(section)}"
        f"<h3>Figures</h3>{figures}"
        f"<h3>Numbers</h3>{_frame(section.table)}"
        f"<h3>Studies</h3>{studies}"
        "</section>"
    )


def _summary(sections: Sequence["Section"]) -> str:
    rows = []
    for s in sections:
        name = f"Claim {s.claim.number}: {s.claim.title}" if s.claim else f"Study {s.studies[0]}"
        rows.append(
            f'<tr><td><a href="#{_esc(s.anchor)}">{_esc(name)}</a></td><td>{_esc(", ".join(s.studies))}</td>'
            f"<td>{_badge(s.verdict) if s.claim else ''}</td>"
            f"<td>{_esc('; '.join(f'{v.key}: {v.verdict}' for v in s.verdicts))}</td></tr>"
        )
    head = "<tr><th>claim</th><th>studies</th><th>verdict</th><th>hypotheses</th></tr>"
    return f'<table id="summary"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def render(report: "Report") -> str:
    """The report as one HTML document (figures referenced by relative file name)."""
    from hposvc.report.stats import CONFIDENCE, N_BOOTSTRAP

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (
        "Each claim of the optimisation guide is tested by studies whose trials are stored in the study database; "
        "every verdict below is computed from those stored trials when this page is built. "
        f"Intervals are {CONFIDENCE:.0%} percentile bootstrap intervals ({N_BOOTSTRAP} resamples, expanded for small "
        "samples); comparisons are paired by seed where the design allows. A claim is supported when every hypothesis is, "
        "not supported when any is contradicted, and inconclusive otherwise. Diverged trials count at chance accuracy."
    )
    body = "".join(_section(s) for s in report.sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_esc(report.title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{_esc(report.title)}</h1><p class=\"meta\">Generated {now} by hposvc from {_esc(report.storage)}.</p>"
        f"<p>{_esc(intro)}</p><h2>Summary</h2>{_summary(report.sections)}{body}"
        "</main></body></html>\n"
    )
