"""Hostile source tars: unsafe members are skipped and counted, odd keys survive, nothing is
written outside work_dir / output_dir, and every record is accounted for."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import yaml
from PIL import Image

from bucket_assets.core.accounting import OUTCOMES_SQL
from bucket_assets.core.manifest import verify_export
from bucket_assets.core.shards import read_shard
from bucket_assets.spec import load_spec
from bucket_assets_tests.conftest import materialize_all


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_hostile_tar_members(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, "good.jpg", _jpeg(1))
        _add(tf, "good.txt", b"a good caption")
        _add(tf, "good.json", json.dumps({"url": "u", "similarity": "not a number", "NSFW": "UNLIKELY"}).encode())
        _add(tf, "../escape.jpg", _jpeg(2))
        _add(tf, "/abs.jpg", _jpeg(3))
        _add(tf, "sym.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tf, "hard.jpg", kind=tarfile.LNKTYPE, link="good.jpg")
        _add(tf, "dev.jpg", kind=tarfile.CHRTYPE)
        _add(tf, "dirkey.jpg", kind=tarfile.DIRTYPE)
        _add(tf, "we ird.key.jpg", _jpeg(4))  # webdataset key: "we ird", extension "key.jpg"
        _add(tf, "spaced name.jpg", _jpeg(5))
        _add(tf, "twice.jpg", _jpeg(6))
        _add(tf, "twice.jpg", _jpeg(7))
        _add(tf, "notext.jpg", _jpeg(8))  # no .txt / .json
        _add(tf, "onlytext.txt", b"caption without an image")
        _add(tf, "badjson.jpg", _jpeg(9))
        _add(tf, "badjson.json", b"[1, 2, 3]")
    (raw / "00000.tar").write_bytes(buf.getvalue())
    # a truncated tar (cut inside a member) and a gzip tar
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        _add(tf, "intrunc.jpg", _jpeg(10))
        _add(tf, "lost.jpg", _jpeg(11))
    (raw / "00001.tar").write_bytes(good.getvalue()[: 512 + len(_jpeg(10)) + 1024])
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        _add(tf, "gzipped.jpg", _jpeg(12))
        _add(tf, "gzlst.jpg", _jpeg(13))
    (raw / "00002.tar").write_bytes(gzip.compress(gz.getvalue()))

    spec = {
        "name": "tars", "output_dir": str(tmp_path / "out" / "export"), "work_dir": str(tmp_path / "out" / "work"),
        "sources": [{"name": "laion", "kind": "webdataset", "paths": [str(raw / "*.tar")]}],
        "filters": {"drop_duplicates": False, "drop_blank": False},
        "captions": {"landing_dir": str(tmp_path / "captions"), "selectors": ["alt_text"]},
        "image": {"workers": 1},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    assert materialize_all(spec_path).success
    s = load_spec(spec_path)

    # Nothing escaped: no file was created next to the inputs or at the root.
    assert not (tmp_path / "escape.jpg").exists() and not Path("/abs.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw", "spec.yaml"]

    con = duckdb.connect(str(s.db_path), read_only=True)
    con.execute(OUTCOMES_SQL)
    outcomes = sorted(con.execute("SELECT image_id, outcome FROM image_outcomes").fetchall())
    skips = dict(con.execute("SELECT reason, count FROM scan_skips").fetchall())
    notes = dict(con.execute("SELECT image_id, notes FROM raw_index WHERE notes IS NOT NULL").fetchall())
    con.close()
    assert skips == {"unsafe_tar_member": 6, "duplicate_tar_member": 1, "truncated_tar": 1}
    assert outcomes == sorted([
        ("good", "exported"), ("we ird", "exported"), ("spaced name", "exported"), ("twice", "exported"),
        ("notext", "exported"), ("onlytext", "missing_image"), ("badjson", "exported"), ("intrunc", "exported"),
        ("gzipped", "exported"), ("gzlst", "exported"),
        ("lost", "read_error"),  # its header survived the cut, its bytes did not
    ])
    assert notes == {"good": "invalid_similarity", "badjson": "json_not_object"}

    export = Path(s.output_dir)
    verify_export(export)
    keys, captions = set(), {}
    for shard in export.rglob("shard-*.tar"):
        for key, parts in read_shard(shard):
            keys.add(key)
            captions[json.loads(parts["json"])["image_id"]] = parts["txt"].decode()
    assert all("." not in k and " " not in k for k in keys) and len(keys) == 9
    assert captions["good"] == "a good caption\n" and captions["notext"] == "\n"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["summary"]["tar_members_skipped"] == skips
    assert manifest["summary"]["images_seen"] == 11
