"""The Dagster UI in a real browser (Debian's chromium driven by playwright): the asset graph
shows every asset inside its group, and one bucket partition materializes from the UI.

Screenshots go to `<tmp_path>/screenshots` (and to $BUCKET_ASSETS_SCREENSHOTS when set).
Without chromium or playwright the test is skipped, unless BUCKET_ASSETS_REQUIRE_BROWSER=1
(which `.ci/run` sets, after installing both): then their absence is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from bucket_assets.core.buckets import bucket_table
from bucket_assets.definitions import build_definitions
from bucket_assets.spec import load_spec
from bucket_assets_tests.conftest import dagster_dev, free_port, run_cli, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _require_browser():
    required = os.environ.get("BUCKET_ASSETS_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed")
    if not os.path.exists(CHROMIUM):
        if required:
            raise AssertionError(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    return sync_playwright


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["data"]


def _runs(port: int) -> list[dict]:
    data = _graphql(port, "{ runsOrError(limit: 20) { ... on Runs { results { runId status "
                          "tags { key value } } } } }")
    return data["runsOrError"]["results"]


def test_asset_graph_and_a_partition_run_from_the_ui(make_spec, tmp_path):
    sync_playwright = _require_browser()
    spec_path = make_spec("ui")
    spec = load_spec(spec_path)
    home = tmp_path / "dagster_home"
    env = {"DAGSTER_HOME": str(home), "BUCKET_ASSETS_SPEC": str(spec_path)}
    res = run_cli("build", "--spec", str(spec_path), env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    shots = tmp_path / "screenshots"
    shots.mkdir()

    defs = build_definitions(str(spec_path))
    groups = {}
    for a in defs.resolve_all_asset_specs():
        groups[a.key.to_user_string()] = a.group_name
    assert len(groups) == 10 and len(set(groups.values())) == 5
    partition = sorted(b.id for b in bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible)
                       if (Path(spec.output_dir) / "buckets" / b.id).is_dir())[0]

    port = free_port()
    with dagster_dev(tmp_path, env, port) as proc, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
        page.set_default_timeout(60_000)
        base = f"http://127.0.0.1:{port}"

        def dismiss_welcome() -> None:
            skip = page.get_by_role("button", name="Skip")
            if skip.count():
                skip.first.click()

        # The asset graph: everything upstream of the card, grouped.
        page.goto(f"{base}/assets/dataset_card?view=lineage&lineageScope=upstream&lineageDepth=10",
                  wait_until="networkidle")
        dismiss_welcome()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "01-asset-graph.png"))
        toolbar = page.get_by_text("Graph depth").first.bounding_box()

        def in_graph(text: str) -> dict:
            """The bounding box of `text` drawn in the graph (not in the page header)."""
            for el in page.get_by_text(text, exact=True).filter(visible=True).all():
                box = el.bounding_box()
                if box and box["y"] > toolbar["y"] + toolbar["height"]:
                    return box
            raise AssertionError(f"{text!r} is not drawn in the asset graph")

        for name in groups:
            page.get_by_text(name, exact=True).filter(visible=True).first.wait_for(state="visible")
        for name, group in groups.items():
            node, title = in_graph(name), in_graph(group)
            # inside its group's box: below the group's title bar and within its width
            assert title["x"] - 1 <= node["x"] and node["x"] + node["width"] <= title["x"] + title["width"] + 1, name
            assert node["y"] > title["y"], name

        # One bucket partition of bucket_shards, launched from the asset page.
        before = {r["runId"] for r in _runs(port)}
        page.goto(f"{base}/assets/bucket_shards", wait_until="networkidle")
        dismiss_welcome()
        page.get_by_role("button", name="Materialize…").first.click()
        dismiss_welcome()  # in case a dialog appeared late
        page.get_by_text("Select a partition or create one").first.click()
        page.keyboard.type(partition)
        page.get_by_text(partition, exact=True).filter(visible=True).last.click()
        page.get_by_text("1 partition", exact=True).first.wait_for(state="visible")
        page.get_by_text("Launch runs to materialize bucket_shards").click()  # closes the partition list
        page.screenshot(path=str(shots / "02-launch-dialog.png"))
        page.get_by_role("button", name="Launch 1 run").click()

        def new_run_done() -> bool:
            runs = [r for r in _runs(port) if r["runId"] not in before]
            assert not [r for r in runs if r["status"] in ("FAILURE", "CANCELED")], runs
            return any(r["status"] == "SUCCESS" for r in runs)

        wait_for(new_run_done, 240, "the partition run to succeed", proc)
        run = next(r for r in _runs(port) if r["runId"] not in before)
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert partition in (tags.get("dagster/partition"), tags.get("dagster/asset_partition_range_start")), tags
        page.goto(f"{base}/runs/{run['runId']}", wait_until="networkidle")
        page.get_by_text("Success", exact=False).first.wait_for(state="visible")
        page.screenshot(path=str(shots / "03-run-succeeded.png"))
        page.goto(f"{base}/assets/bucket_shards?view=partitions&partition={partition}", wait_until="networkidle")
        page.screenshot(path=str(shots / "04-partitions.png"))
        browser.close()

    saved = sorted(p.name for p in shots.iterdir())
    assert saved == ["01-asset-graph.png", "02-launch-dialog.png", "03-run-succeeded.png", "04-partitions.png"]
    assert all((shots / n).stat().st_size > 10_000 for n in saved)
    if os.environ.get("BUCKET_ASSETS_SCREENSHOTS"):
        dest = Path(os.environ["BUCKET_ASSETS_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        for n in saved:
            shutil.copy(shots / n, dest / n)
