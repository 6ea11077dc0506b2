"""The Dagster UI in a real browser: headless Chromium opens the asset graph (the lineage of the
asset group that holds ``crops``; the global lineage page shows groups collapsed) of a running
``dagster-webserver`` (repository's workspace.yaml, embedded PostgreSQL) and

* takes a screenshot, which must be a real picture (not blank), and
* dumps the rendered DOM, which must name every asset of the pipeline.

docs/asset-graph.png is such a screenshot, taken after a few partitions were materialised.

Skipped only when Chromium is not installed (scripts/system-deps.sh installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deer_pipeline_tests.ops.test_ui_daemon_e2e import (
    LOCATION,
    dagster_home,
    free_port,
    graphql,
    service_env,
    start_webserver,
    wait_for_code_location,
)

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and Path(p).exists()), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (scripts/system-deps.sh installs it)")

ASSETS = ("crops", "embeddings", "deer_profiles", "similarity_scores", "threshold_report")


def chromium(profile: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
            "--window-size=1400,900", "--virtual-time-budget=25000", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    from deer_pipeline import db

    work = tmp_path_factory.mktemp("browser")
    env = service_env(dagster_home(work), db.dagster_storage_url())
    port = free_port()
    server = start_webserver(env, work, port)
    try:
        wait_for_code_location(port, [server])
        yield port
    finally:
        server.stop()


@pytest.fixture(scope="module")
def asset_graph_url(webserver) -> str:
    """The lineage page of the asset group of ``crops`` (its graph links on to the report)."""
    nodes = graphql(webserver, "query { assetNodes { assetKey { path } groupName } }")["assetNodes"]
    groups = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes}
    assert set(ASSETS) <= set(groups), f"assets missing from the code location: {set(ASSETS) - set(groups)}"
    return (f"http://127.0.0.1:{webserver}/locations/{LOCATION}/asset-groups/"
            f"{groups['crops']}/lineage")


def test_asset_graph_screenshot_is_a_real_picture(asset_graph_url, tmp_path):
    shot = tmp_path / "asset-graph.png"
    proc = chromium(tmp_path / "profile", f"--screenshot={shot}", asset_graph_url)
    assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot:\n{proc.stderr[-2000:]}"
    with Image.open(shot) as image:
        assert image.size == (1400, 900)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    gray = pixels.mean(axis=2)
    # A blank or error page is (nearly) one colour; the UI has text, a sidebar and graph nodes.
    assert gray.std() > 10, f"screenshot looks blank (std {gray.std():.1f})"
    colours = np.unique(pixels.reshape(-1, 3).astype(np.uint8), axis=0)
    assert len(colours) > 100, f"only {len(colours)} colours in the screenshot"
    dark = (gray < 100).mean()
    assert 0.001 < dark < 0.5, f"{dark:.1%} dark pixels: text is missing or the page is dark"


def test_asset_graph_page_names_every_asset(asset_graph_url, tmp_path):
    proc = chromium(tmp_path / "profile", "--dump-dom", asset_graph_url)
    dom = proc.stdout
    assert "<html" in dom.lower(), f"no DOM dumped:\n{proc.stderr[-2000:]}"
    assert "Lineage" in dom and LOCATION in dom
    missing = [name for name in ASSETS if name not in dom]
    assert not missing, f"assets not shown on the asset graph page: {missing}"
