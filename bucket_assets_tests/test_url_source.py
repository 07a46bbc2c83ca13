"""A `urls` source end to end: a parquet of URLs served by a loopback HTTP server (with faults)
becomes exported samples or counted reasons, and a rebuild fetches nothing again."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from bucket_assets.core.manifest import verify_export
from bucket_assets.spec import SpecError, load_spec
from bucket_assets_tests.conftest import materialize_all, spec_dict
from bucket_assets_tests.core.test_download import FaultServer


@pytest.fixture
def url_spec(sample_root, tmp_path):
    photos = sorted((sample_root / "raw" / "pcb" / "train").glob("*.jpg"))[:6]
    assert len(photos) == 6
    with FaultServer() as server:
        # The server's /img/<n> are tiny noise JPEGs (too small for any bucket); serve real
        # photos by pointing `file` ids at a second, plain static server instead.
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        class Static(SimpleHTTPRequestHandler):
            hits: dict[str, int] = {}

            def log_message(self, *a):
                pass

            def do_GET(self):
                Static.hits[self.path] = Static.hits.get(self.path, 0) + 1
                super().do_GET()

        static = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Static, directory=str(photos[0].parent)))
        static.hits = Static.hits
        threading.Thread(target=static.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{static.server_address[1]}"
        rows = [{"key": f"u{i}", "url": f"{base}/{p.name}", "caption": f"photo {i}", "similarity": 0.35, "NSFW": "UNLIKELY"}
                for i, p in enumerate(photos)]
        rows += [
            {"key": "gone", "url": server.base + "/404", "caption": "missing", "similarity": 0.4, "NSFW": "UNLIKELY"},
            {"key": "page", "url": server.base + "/html", "caption": "a web page", "similarity": 0.4, "NSFW": "UNLIKELY"},
            {"key": "bad", "url": "mailto:someone", "caption": "no url", "similarity": 0.4, "NSFW": "UNLIKELY"},
        ]
        meta = tmp_path / "meta"
        meta.mkdir()
        pq.write_table(pa.Table.from_pylist(rows[:5]), meta / "part-0.parquet")
        pq.write_table(pa.Table.from_pylist(rows[5:]), meta / "part-1.parquet")
        out = tmp_path / "build"
        spec = spec_dict(sample_root, out)
        spec["sources"] = [{
            "name": "web", "kind": "urls", "path": str(meta / "*.parquet"),
            "columns": {"id": "key", "url": "url", "caption": "caption", "similarity": "similarity", "nsfw": "NSFW"},
            "caption_variant": "alt_text",
            "download": {"concurrency": 4, "per_host": 2, "timeout_s": 5, "retries": 1, "backoff_s": 0.01},
        }]
        out.mkdir()
        path = out / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        yield path, server, static
        static.shutdown()
        static.server_close()


def test_url_source_builds_and_accounts_for_every_url(url_spec):
    path, server, _static = url_spec
    res = materialize_all(path)
    assert res.success
    spec = load_spec(path)
    manifest = json.loads((Path(spec.output_dir) / "manifest.json").read_text())
    s = manifest["summary"]
    assert s["images_seen"] == 9
    assert s["skipped_http_404"] == 1 and s["skipped_not_an_image"] == 1 and s["skipped_invalid_url"] == 1
    assert s["images_exported"] == 6 == s["images_seen"] - 3
    verify_export(spec.output_dir)
    exported = {}
    buckets = manifest["buckets"]
    for b in buckets.values() if isinstance(buckets, dict) else buckets:
        for sh in b["shards"]:
            import tarfile

            with tarfile.open(Path(spec.output_dir) / sh["path"]) as tf:
                for m in tf:
                    if m.name.endswith(".json"):
                        meta = json.loads(tf.extractfile(m).read())
                        exported[meta["image_id"]] = meta
    assert sorted(exported) == [f"u{i}" for i in range(6)]
    assert all(m["url"].startswith("http://127.0.0.1:") and m["source"] == "web" for m in exported.values())

    # A rebuild fetches nothing: stored images and final failures are reused.
    hits, photo_hits = dict(server.hits), dict(_static.hits)
    assert sum(photo_hits.values()) == 6
    res = materialize_all(path)
    assert res.success
    assert server.hits == hits and _static.hits == photo_hits
    mat = res.asset_materializations_for_node("url_downloads")[0]
    assert mat.metadata["fetched"].value == 0 and mat.metadata["reused"].value == 9


def test_url_source_spec_errors(sample_root, tmp_path):
    spec = spec_dict(sample_root, tmp_path)
    spec["sources"] = [{"name": "web", "kind": "urls", "path": str(tmp_path / "none" / "*.parquet"),
                        "download": {"per_host": 0}}]
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match=r"sources\[0\]\.download\.per_host"):
        load_spec(p)
    spec["sources"][0]["download"] = {}
    p.write_text(yaml.safe_dump(spec))
    from bucket_assets.spec import check_paths

    with pytest.raises(SpecError, match=r"sources\[0\]\.path: no file matches"):
        check_paths(load_spec(p))


def test_a_killed_download_resumes_without_fetching_again(url_spec):
    """SIGKILL after the 4th URL is journaled; the rerun fetches only what was not journaled."""
    import os
    import signal
    import subprocess
    import sys

    from bucket_assets.core.download import journal_path, read_journal

    path, server, static = url_spec
    spec = yaml.safe_load(path.read_text())
    spec["sources"][0]["download"]["concurrency"] = 1
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "DAGSTER_HOME": str(path.parent / "home"), "BUCKET_ASSETS_FAILPOINT": "kill:fetched@4"}
    (path.parent / "home").mkdir()
    cmd = [sys.executable, "-m", "bucket_assets.cli", "build", "--spec", str(path)]
    proc = subprocess.run(cmd, env=env, start_new_session=True, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    journal = journal_path(load_spec(path).downloads_dir, "web")
    done = {url for (_id, url) in read_journal(journal)}
    assert len(done) == 4
    before = dict(static.hits)
    assert len(before) >= 4
    env.pop("BUCKET_ASSETS_FAILPOINT")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not journal.exists()
    # The photos journaled before the kill were not requested again; the rest were, once.
    for url in done:
        rel = "/" + url.rsplit("/", 1)[1]
        assert static.hits[rel] == before[rel] == 1
    assert len(static.hits) == 6 and all(n <= 2 for n in static.hits.values())
    manifest = json.loads((Path(load_spec(path).output_dir) / "manifest.json").read_text())
    assert manifest["summary"]["images_exported"] == 6 and manifest["summary"]["skipped_http_404"] == 1
