"""The study in the MLflow UI, in a real browser: a real ``hposvc ui STUDY`` (MLflow's own
server on loopback) opened in headless Chromium at the page it prints.

- the page is the study's training runs (MLflow 3's "Model training" mode, not its GenAI
  overview), best first, and lists every trial;
- the parent run's ``best_value`` chart has one point per finished trial;
- ``plots/dashboard.html`` renders in MLflow's artifact viewer, and every plot in it draws
  something (screenshot pixel check per plot).

Chromium is found and skipped (or, under ``HPOSVC_REQUIRE_BROWSER=1``, required) as in
tests/test_report_browser.py. It is driven through tests/devtools.py, which waits in
real time for what each page must show: MLflow draws its charts and its HTML viewer after
the load event, where ``--dump-dom``'s virtual time caught a blank viewer. The
screenshots land in ``$HPOSVC_TEST_ARTIFACTS/dashboard/`` when that is set (the README's
come from there).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port
from devtools import Browser
from hposvc import dashboard
from test_dashboard import N_TRIALS, STUDY, DashRun, dash_outputs
from test_report_browser import CHROMIUM, CHROMIUM_FLAGS, REQUIRE_BROWSER_ENV, _NO_CHROMIUM

pytestmark = [
    pytest.mark.slow,  # a study, an MLflow server and a browser
    pytest.mark.skipif(CHROMIUM is None and os.environ.get(REQUIRE_BROWSER_ENV, "") in ("", "0"), reason=_NO_CHROMIUM),
]
WINDOW = (1400, 900)
WAIT = 90  # seconds a page may take to show what it must (a cold MLflow UI on a busy 2-core box)


@pytest.fixture(scope="module")
def chromium() -> str:
    if CHROMIUM is None:
        pytest.fail(f"{REQUIRE_BROWSER_ENV} is set and there is {_NO_CHROMIUM}", pytrace=False)
    return CHROMIUM


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> DashRun:
    return dash_outputs(tmp_path_factory)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: a CI artifact folder when $HPOSVC_TEST_ARTIFACTS is set."""
    artifacts = os.environ.get("HPOSVC_TEST_ARTIFACTS")
    folder = Path(artifacts) / "dashboard" if artifacts else tmp_path_factory.mktemp("shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class Ui:
    base: str  # http://127.0.0.1:PORT
    url: str  # the page `hposvc ui STUDY` printed


@pytest.fixture(scope="module")
def ui(dash: DashRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    """``hposvc ui STUDY`` as a user starts it, until the module ends."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hposvc.cli", "ui", STUDY, "--data-dir", str(dash.data), "--port", str(port)],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        url = proc.stdout.readline().decode().strip()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"hposvc ui exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"hposvc ui did not answer /health in 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.25)
        yield Ui(base, url)
    finally:
        os.killpg(proc.pid, 15)  # the UI and the server workers it started: its own session
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with Browser(chromium, CHROMIUM_FLAGS, tmp_path_factory.mktemp("chromium") / "profile", size=WINDOW) as b:
        yield b


def _colourful(image) -> int:  # noqa: ANN001 (a PIL image)
    """Pixels with clear colour: plot marks and heatmaps, not white, grey text or grid."""
    saturation = image.convert("RGB").convert("HSV").getchannel("S")
    return sum(saturation.histogram()[80:])


def test_hposvc_ui_opens_on_the_studys_training_runs(browser: Browser, dash: DashRun, ui: Ui, shots: Path) -> None:
    assert ui.url == dashboard.runs_url(ui.base, dash.experiment_id, maximize=True)
    browser.open(ui.url)
    names = [f"trial-{n}" for n in range(N_TRIALS)]
    text = browser.wait_for(f"{json.dumps(names)}.every(n => document.body.innerText.includes(n)) && document.body.innerText", timeout=WAIT, what="every trial in the runs table")
    browser.screenshot(shots / "runs.png")
    assert browser.evaluate("document.title") == f"Runs - Experiment {dash.experiment_id} - MLflow"
    assert "Sort: value" in text  # best first
    listed = re.findall(r"\btrial-(\d+)\b", text)
    assert sorted(map(int, listed)) == list(range(N_TRIALS))  # each trial once, not folded under the parent
    best = max(t.value for t in dash.study.trials)
    assert dash.study.trials[int(listed[0])].value == best
    assert "Usage" not in text and "Tool calls" not in text  # not the GenAI overview


def test_the_parent_runs_best_value_chart_has_a_point_per_finished_trial(browser: Browser, dash: DashRun, ui: Ui, shots: Path) -> None:
    browser.open(f"{ui.base}/#/experiments/{dash.experiment_id}/runs/{dash.parent_id}/model-metrics?workflowType={dashboard.WORKFLOW_TYPE}")
    points = """(() => {
        const cards = [...document.querySelectorAll('[data-testid="experiment-view-compare-runs-card"]')]
            .filter(c => c.querySelector('[title="best_value"]'));
        return cards.length === 1 ? cards[0].querySelectorAll('path.point').length : 0;
    })()"""
    drawn = browser.wait_for(points, timeout=WAIT, what="the best_value chart's points")
    time.sleep(0.5)  # plotly draws a trace at once; a later redraw would change the count
    browser.screenshot(shots / "best_value.png")
    finished = [t for t in dash.study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert drawn == browser.evaluate(points) == len(finished) == N_TRIALS


def test_every_plot_renders_in_the_browser(browser: Browser, dash: DashRun, ui: Ui, shots: Path, tmp_path: Path) -> None:
    from PIL import Image

    # 1) MLflow's artifact viewer renders plots/dashboard.html (plotly in its sandboxed frame)
    browser.open(f"{ui.base}/#/experiments/{dash.experiment_id}/runs/{dash.parent_id}/artifacts/plots/dashboard.html?workflowType={dashboard.WORKFLOW_TYPE}")
    viewer = shots / "plots_in_mlflow.png"
    deadline = time.monotonic() + WAIT
    while True:  # the frame is cross-origin (sandboxed): its pixels say when plotly drew
        with Image.open(browser.screenshot(viewer)) as image:
            colour = _colourful(image.crop((WINDOW[0] // 3, 300, WINDOW[0] * 3 // 4, WINDOW[1])))
        if colour > 1000 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert colour > 1000, f"MLflow's viewer shows no plot in {WAIT}s (see {viewer})"
    # 2) the page on its own, tall enough for every plot: each plot's band draws something
    page = Path(dash.client.download_artifacts(dash.parent_id, "plots/dashboard.html", str(tmp_path)))
    browser.open(page.as_uri())
    drawn = f"[...document.querySelectorAll('section.plot .js-plotly-plot')].filter(d => d._fullLayout).length >= {len(dashboard.PLOTS)}"
    browser.wait_for(drawn, timeout=WAIT, what="every plot drawn")
    height = dashboard.HEADER_PX + len(dashboard.PLOTS) * (dashboard.PLOT_PX + dashboard.GAP_PX)
    with Image.open(browser.screenshot(shots / "dashboard.png", height=height)) as image:
        assert image.size == (WINDOW[0], height)
        for i, name in enumerate(dashboard.PLOTS):
            top = dashboard.HEADER_PX + i * (dashboard.PLOT_PX + dashboard.GAP_PX)
            assert _colourful(image.crop((0, top, WINDOW[0], top + dashboard.PLOT_PX))) > 500, f"plot {name} (band {i}) is blank"
