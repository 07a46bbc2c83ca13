"""The Dagster UI in a real browser (Debian's chromium driven by playwright), served by `dg dev`
over the instance a `bucket-assets build` recorded in: the asset graph shows every asset inside its
group, each bucket partition's page shows that bucket's own numbers (an empty bucket says so), and
one bucket partition materializes from the UI.

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


def _partition_metadata(port: int, asset: str, partitions: list[str]) -> dict[str, dict]:
    """The latest materialization's metadata (label -> int or text) of each partition of `asset`."""
    data = _graphql(port, '{ assetNodes(assetKeys: [{path: [%s]}]) { assetMaterializations(partitions: %s, limit: %d) '
                          '{ partition timestamp metadataEntries { label ... on IntMetadataEntry { intValue } '
                          '... on TextMetadataEntry { text } } } } }'
                    % (json.dumps(asset), json.dumps(partitions), 10 * len(partitions)))
    out: dict[str, dict] = {}
    for mat in sorted(data["assetNodes"][0]["assetMaterializations"], key=lambda m: -float(m["timestamp"])):
        out.setdefault(mat["partition"], {e["label"]: e.get("intValue", e.get("text")) for e in mat["metadataEntries"]})
    return out


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
    ids = [b.id for b in bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible)]
    partition = sorted(b for b in ids if (Path(spec.output_dir) / "buckets" / b).is_dir())[0]
    # What each bucket holds, from the export itself: the UI must show these numbers per partition.
    manifest = json.loads((Path(spec.output_dir) / "manifest.json").read_text())
    count = {b: manifest["buckets"][b]["count"] if b in manifest["buckets"] else 0 for b in ids}
    many = max(sorted(manifest["buckets"]), key=lambda b: count[b])
    few = min(sorted(manifest["buckets"]), key=lambda b: count[b])
    empty = next(b for b in ids if b not in manifest["buckets"])
    assert count[many] != count[few] and count[few] > 0, count

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

        # Per-partition truth, through the API: every partition of bucket_shards carries its own
        # bucket's samples/shards/bytes/status; processed_images its own samples.
        shards_md = _partition_metadata(port, "bucket_shards", ids)
        images_md = _partition_metadata(port, "processed_images", ids)
        assert set(shards_md) == set(ids) == set(images_md)
        for b in ids:
            listed = manifest["buckets"].get(b)
            md = shards_md[b]
            assert md["samples"] == count[b], (b, md)
            assert md["shards"] == (len(listed["shards"]) if listed else 0), (b, md)
            assert md["bytes"] == (sum(s["bytes"] for s in listed["shards"]) if listed else 0), (b, md)
            assert md["status"].startswith("empty") == (listed is None), (b, md)
            # processed_images counts every rendered sample of the bucket (blank ones too)
            assert images_md[b]["samples"] >= count[b] and (images_md[b]["samples"] == 0) == (listed is None), (b, images_md[b])
        assert len({md["samples"] for md in shards_md.values()}) > 2

        def partition_page(asset: str, key: str, shot: str) -> dict[str, str]:
            """The metadata table (label -> shown value) of `key`'s page under the asset's Partitions tab."""
            page.goto(f"{base}/assets/{asset}?view=partitions&partition={key}", wait_until="networkidle")
            dismiss_welcome()
            page.get_by_text("Latest materialization").first.wait_for(state="visible")
            page.get_by_text("status", exact=True).first.wait_for(state="visible")
            page.screenshot(path=str(shots / shot))
            rows = {}
            for tr in page.locator("tr").filter(has=page.locator("td")).all():
                cells = [c.inner_text().strip() for c in tr.locator("td").all()]
                if len(cells) >= 2:
                    rows[cells[0]] = cells[1]
            return rows

        # ... and as a user sees it: a full bucket, a small one, an empty one.
        shown = {}
        for key, shot in ((many, "05-partition-many.png"), (few, "06-partition-few.png"),
                          (empty, "07-partition-empty.png")):
            shown[key] = rows = partition_page("bucket_shards", key, shot)
            assert rows.get("samples") == str(count[key]), (key, count[key], rows)
            assert rows.get("status") == shards_md[key]["status"], (key, rows)
        assert shown[many]["samples"] != shown[few]["samples"]
        assert shown[many]["status"].startswith(f"{count[many]:,} samples"), shown[many]
        assert shown[empty]["status"].startswith("empty"), shown[empty]
        assert shown[empty]["shards"] == "0" and shown[empty]["bytes"] == "0", shown[empty]

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
        # The one-partition run's materialization also carries that bucket's own numbers.
        latest = _partition_metadata(port, "bucket_shards", [partition])[partition]
        assert latest["samples"] == count[partition], latest
        rows = partition_page("bucket_shards", partition, "04-partitions.png")
        assert rows.get("samples") == str(count[partition]) and rows.get("status") == latest["status"], rows
        browser.close()

    saved = sorted(p.name for p in shots.iterdir())
    assert saved == ["01-asset-graph.png", "02-launch-dialog.png", "03-run-succeeded.png", "04-partitions.png",
                     "05-partition-many.png", "06-partition-few.png", "07-partition-empty.png"]
    assert all((shots / n).stat().st_size > 10_000 for n in saved)
    if os.environ.get("BUCKET_ASSETS_SCREENSHOTS"):
        dest = Path(os.environ["BUCKET_ASSETS_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        for n in saved:
            shutil.copy(shots / n, dest / n)
