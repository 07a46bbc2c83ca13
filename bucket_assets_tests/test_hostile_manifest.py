"""`verify` on hostile manifests: malformed structure, paths that leave the export, non-regular
files, and JPEG members that Pillow cannot decode. Exports are built by hand (no Dagster run)."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import random
import threading
from pathlib import Path

import pytest
import simplejpeg
from PIL import Image

from bucket_assets import cli
from bucket_assets.core import manifest as manifest_mod
from bucket_assets.core.manifest import VerifyError, jpeg_decodes, verify_export
from bucket_assets.core.shards import SAMPLE_JSON_KEYS, Sample, caption_txt, sample_json, write_shard

BUCKET = "p1024x1024"
W, H = 32, 24

# jpegtran -arithmetic of a 16x8 gradient.
ARITH_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4nICIsIxwcKDcpLDAxNDQ0Hyc5"
    "PTgyPC4zNDL/2wBDAQkJCQwLDBgNDRgyIRwhMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjL/yQAR"
    "CAAIABADASIAAhEBAxEB/8wACgAQEAUBEBEF/9oADAMBAAIRAxEAPwD/ACX576QS+MH7PlR5bJBDG+KN2Ns5U8ALPViMEP/Z"
)


def _arith_across_buffer() -> bytes:
    """ARITH_JPEG with a comment segment that moves its scan across Pillow's 64 KiB read buffer:
    libjpeg's arithmetic decoder cannot suspend mid-scan, so Pillow fails where libjpeg-turbo
    reading the whole buffer (simplejpeg) succeeds."""
    sos = ARITH_JPEG.index(b"\xff\xda")
    com = 65516 - sos - 2
    return ARITH_JPEG[:2] + b"\xff\xfe" + com.to_bytes(2, "big") + b"\0" * (com - 2) + ARITH_JPEG[2:]


def _jpeg(w: int = W, h: int = H, seed: int = 0, **save) -> bytes:
    rng = random.Random(seed)
    im = Image.new("RGB", (w, h))
    im.putdata([(rng.randrange(256), (x * 7) % 256, (y * 11) % 256) for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _sample(key: str, jpg: bytes) -> Sample:
    meta = {k: None for k in SAMPLE_JSON_KEYS}
    meta.update(bucket_id=BUCKET, image_id=key, source="s", src_w=W, src_h=H, target_w=W, target_h=H,
                caption_variant="alt_text", caption_selector_index=0, caption_source_id=1)
    return Sample(key=key, jpg=jpg, txt=caption_txt(f"caption {key}"), json=sample_json(meta))


def _write_export(root: Path, jpgs: list[bytes] | None = None, mode: str = "reencode_jpeg") -> dict:
    jpgs = jpgs if jpgs is not None else [_jpeg(seed=0), _jpeg(seed=1)]
    rel = f"buckets/{BUCKET}/shard-000000.tar"
    (root / "buckets" / BUCKET).mkdir(parents=True, exist_ok=True)
    sf = write_shard(root / rel, [_sample(f"k{i}", j) for i, j in enumerate(jpgs)])
    m = {
        "format": "bucketed_shards_v1",
        "name": "t",
        "image_mode": mode,
        "buckets": {
            BUCKET: {
                "proto": {"w": 1024, "h": 1024},
                "scaled": {"w": W, "h": H},
                "base_resolution": 32,
                "count": sf.samples,
                "shards": [{"path": rel, "samples": sf.samples, "bytes": sf.bytes, "sha256": sf.sha256}],
            }
        },
        "summary": {"samples_exported": sf.samples},
    }
    _put(root, m)
    return m


def _put(root: Path, m) -> None:
    (root / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


@pytest.fixture
def export(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "export"
    root.mkdir()
    return root, _write_export(root)


def _one_line_error(root: Path, match: str) -> str:
    with pytest.raises(VerifyError) as ei:
        verify_export(root)
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert match in msg, msg
    return msg


def test_hand_built_export_verifies(export):
    root, _ = export
    rep = verify_export(root)
    assert (rep.buckets, rep.shards, rep.samples) == (1, 1, 2)


# Malformed manifest structure -----------------------------------------------------------------------


def _shard0(m):
    return m["buckets"][BUCKET]["shards"][0]


def _set(path, value):
    def edit(m):
        node = m
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        return m
    return edit


def _del(path):
    def edit(m):
        node = m
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
        return m
    return edit


SHARD = ("buckets", BUCKET, "shards", 0)
MALFORMED = {
    "list": (lambda m: [m], "top level"),
    "string": (lambda m: "manifest", "top level"),
    "null": (lambda m: None, "top level"),
    "no_buckets": (_del(("buckets",)), "has no buckets"),
    "buckets_list": (_set(("buckets",), [1, 2]), "buckets"),
    "buckets_null": (_set(("buckets",), None), "buckets"),
    "bucket_not_object": (_set(("buckets", BUCKET), "x"), f"buckets.{BUCKET}"),
    "no_shards": (_del(("buckets", BUCKET, "shards")), f"buckets.{BUCKET} has no shards"),
    "no_count": (_del(("buckets", BUCKET, "count")), f"buckets.{BUCKET} has no count"),
    "no_scaled": (_del(("buckets", BUCKET, "scaled")), f"buckets.{BUCKET} has no scaled"),
    "scaled_w_string": (_set(("buckets", BUCKET, "scaled", "w"), "32"), f"buckets.{BUCKET}.scaled.w"),
    "shards_object": (_set(("buckets", BUCKET, "shards"), {"a": 1}), f"buckets.{BUCKET}.shards"),
    "shard_not_object": (_set(SHARD, "buckets/x.tar"), f"buckets.{BUCKET}.shards[0]"),
    "no_sha256": (_del(SHARD + ("sha256",)), f"buckets.{BUCKET}.shards[0] has no sha256"),
    "no_bytes": (_del(SHARD + ("bytes",)), f"buckets.{BUCKET}.shards[0] has no bytes"),
    "no_samples": (_del(SHARD + ("samples",)), f"buckets.{BUCKET}.shards[0] has no samples"),
    "no_path": (_del(SHARD + ("path",)), f"buckets.{BUCKET}.shards[0] has no path"),
    "bytes_string": (_set(SHARD + ("bytes",), "10240"), f"buckets.{BUCKET}.shards[0].bytes"),
    "bytes_bool": (_set(SHARD + ("bytes",), True), f"buckets.{BUCKET}.shards[0].bytes"),
    "bytes_negative": (_set(SHARD + ("bytes",), -1), f"buckets.{BUCKET}.shards[0].bytes"),
    "bytes_float": (_set(SHARD + ("bytes",), 1.5), f"buckets.{BUCKET}.shards[0].bytes"),
    "samples_null": (_set(SHARD + ("samples",), None), f"buckets.{BUCKET}.shards[0].samples"),
    "sha256_number": (_set(SHARD + ("sha256",), 5), f"buckets.{BUCKET}.shards[0].sha256"),
    "sha256_not_hex": (_set(SHARD + ("sha256",), "zz"), f"buckets.{BUCKET}.shards[0].sha256"),
    "path_number": (_set(SHARD + ("path",), 7), f"buckets.{BUCKET}.shards[0].path"),
    "path_null": (_set(SHARD + ("path",), None), f"buckets.{BUCKET}.shards[0].path"),
    "count_string": (_set(("buckets", BUCKET, "count"), "2"), f"buckets.{BUCKET}.count"),
    "summary_list": (_set(("summary",), [1]), "summary"),
    "samples_exported_string": (_set(("summary", "samples_exported"), "2"), "summary.samples_exported"),
    "image_mode_unknown": (_set(("image_mode",), "webp"), "image_mode"),
    "image_mode_missing": (_del(("image_mode",)), "has no image_mode"),
    "format_wrong": (_set(("format",), "other"), "format is 'other', expected 'bucketed_shards_v1'"),
    "format_number": (_set(("format",), 1), "format is 1, expected 'bucketed_shards_v1'"),
    "hostile_bucket_id": (
        lambda m: {**m, "buckets": {"a\nb": {**m["buckets"][BUCKET], "count": "x"}}}, "count",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_is_one_line_verify_error_before_any_shard_is_read(export, monkeypatch, case):
    root, m = export
    edit, match = MALFORMED[case]
    _put(root, edit(copy.deepcopy(m)))

    def touched(*a, **k):
        raise AssertionError("a shard was read before the manifest was validated")

    monkeypatch.setattr(manifest_mod, "_sha256_of", touched)
    monkeypatch.setattr(manifest_mod, "read_shard", touched)
    msg = _one_line_error(root, match)
    assert "manifest.json" in msg


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),
        (b'{"format": "bucketed_shards_v1", "buckets": {}', "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (b'{"format": "bucketed_shards_v1", "n": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
    ids=["not_utf8", "truncated", "deeply_nested", "huge_int", "empty"],
)
def test_unparseable_manifest_is_one_line_verify_error(export, raw, match):
    root, _ = export
    (root / "manifest.json").write_bytes(raw)
    _one_line_error(root, match)


def test_manifest_that_is_a_directory(export):
    root, _ = export
    (root / "manifest.json").unlink()
    (root / "manifest.json").mkdir()
    _one_line_error(root, "not a regular file")


def _never_blocks(fn, fifo: Path, timeout: float = 10.0):
    """Run fn in a thread; if it hangs (opened the FIFO), unblock it and fail."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a writer appearing and leaving unblocks the reader
        os.close(fd)
        t.join(5)
        pytest.fail(f"verify opened the FIFO {fifo}")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_manifest_that_is_a_fifo_is_not_opened(export):
    root, _ = export
    (root / "manifest.json").unlink()
    os.mkfifo(root / "manifest.json")
    with pytest.raises(VerifyError, match="not a regular file"):
        _never_blocks(lambda: verify_export(root), root / "manifest.json")


def test_missing_manifest(tmp_path):
    _one_line_error(tmp_path, "manifest is missing")


def test_cli_prints_one_line_for_a_malformed_manifest(export, capsys):
    root, m = export
    del _shard0(m)["sha256"]
    _put(root, m)
    assert cli.main(["verify", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"manifest.json: buckets.{BUCKET}.shards[0] has no sha256" in err


# Listed paths must stay inside the export --------------------------------------------------------------


def _relist(root: Path, m: dict, rel: str) -> None:
    _shard0(m)["path"] = rel
    _put(root, m)


@pytest.fixture
def outside(export, tmp_path) -> Path:
    """A byte-identical copy of the export's shard, outside the export: same size and sha256."""
    root, m = export
    copy_ = tmp_path / "outside.tar"
    copy_.write_bytes((root / _shard0(m)["path"]).read_bytes())
    return copy_


def test_absolute_path_outside_the_export(export, outside, monkeypatch):
    root, m = export
    (root / _shard0(m)["path"]).unlink()
    _relist(root, m, str(outside))
    monkeypatch.setattr(manifest_mod, "read_shard", lambda *a: pytest.fail("read a shard outside the export"))
    _one_line_error(root, "path outside the export")


@pytest.mark.parametrize("rel", ["../outside.tar", f"buckets/{BUCKET}/../../../outside.tar", "buckets/../../outside.tar"])
def test_dotdot_path_outside_the_export(export, outside, rel):
    root, m = export
    (root / _shard0(m)["path"]).unlink()
    _relist(root, m, rel)
    _one_line_error(root, "path outside the export")


def test_path_inside_the_export_but_outside_buckets(export):
    root, m = export
    src = root / _shard0(m)["path"]
    os.replace(src, root / "shard.tar")
    _relist(root, m, "shard.tar")
    _one_line_error(root, "path outside the export")


def test_empty_and_dot_paths(export):
    root, m = export
    for rel in ("", ".", "buckets", "buckets/"):
        _relist(root, m, rel)
        with pytest.raises(VerifyError):
            verify_export(root)


def test_listed_symlink_to_a_file_outside(export, outside):
    root, m = export
    shard = root / _shard0(m)["path"]
    shard.unlink()
    shard.symlink_to(outside)
    _one_line_error(root, "outside the export")


def test_listed_symlink_to_a_file_inside(export):
    root, m = export
    shard = root / _shard0(m)["path"]
    real = shard.with_name("real.tar")
    os.replace(shard, real)
    shard.symlink_to(real.name)
    _relist(root, m, _shard0(m)["path"])
    _one_line_error(root, "symlink")


def test_symlinked_bucket_directory_pointing_outside(export, outside):
    root, m = export
    link = root / "buckets" / "elsewhere"
    link.symlink_to(outside.parent, target_is_directory=True)
    (root / _shard0(m)["path"]).unlink()
    _relist(root, m, f"buckets/elsewhere/{outside.name}")
    _one_line_error(root, "path outside the export")


def test_buckets_directory_itself_a_symlink_outside(export, tmp_path):
    root, m = export
    moved = tmp_path / "moved_buckets"
    os.replace(root / "buckets", moved)
    (root / "buckets").symlink_to(moved, target_is_directory=True)
    _one_line_error(root, "path outside the export")


def test_listed_directory(export):
    root, m = export
    (root / "buckets" / BUCKET / "dir.tar").mkdir()
    _relist(root, m, f"buckets/{BUCKET}/dir.tar")
    _one_line_error(root, "not a regular file")


def test_listed_fifo_is_never_opened(export):
    root, m = export
    fifo = root / "buckets" / BUCKET / "fifo.tar"
    os.mkfifo(fifo)
    _relist(root, m, f"buckets/{BUCKET}/fifo.tar")
    with pytest.raises(VerifyError, match="not a regular file"):
        _never_blocks(lambda: verify_export(root), fifo)


def test_same_shard_listed_twice(export):
    root, m = export
    b = m["buckets"][BUCKET]
    b["shards"].append(dict(b["shards"][0]))
    b["count"] *= 2
    m["summary"]["samples_exported"] *= 2
    _put(root, m)
    _one_line_error(root, "listed twice")


def test_unlisted_symlink_in_buckets_is_reported(export, outside):
    root, _ = export
    (root / "buckets" / BUCKET / "extra.tar").symlink_to(outside)
    _one_line_error(root, "not listed in the manifest")


def test_shard_path_with_newline_gives_one_line(export):
    root, m = export
    _relist(root, m, f"buckets/{BUCKET}/a\nb.tar")
    _one_line_error(root, "missing")


# jpeg_decodes ----------------------------------------------------------------------------------------


def test_jpeg_decodes_returns_full_size():
    assert jpeg_decodes(_jpeg(64, 40)) == (64, 40)
    assert jpeg_decodes(_jpeg(64, 40, progressive=True)) == (64, 40)
    # smaller than one DCT block: the reduced-scale request must not be 0x0
    assert jpeg_decodes(_jpeg(1, 1)) == (1, 1)
    assert jpeg_decodes(_jpeg(7, 5)) == (7, 5)
    grey = io.BytesIO()
    Image.new("L", (20, 10), 99).save(grey, "JPEG")
    assert jpeg_decodes(grey.getvalue()) == (20, 10)
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 10), (1, 2, 3, 4)).save(cmyk, "JPEG")
    assert jpeg_decodes(cmyk.getvalue()) == (20, 10)


def _full_pillow_decode(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_decodes_truncated_fails(progressive):
    data = _jpeg(256, 192, progressive=progressive)
    for cut in (len(data) // 3, len(data) // 2, len(data) - 200):
        with pytest.raises(ValueError) as ei:
            jpeg_decodes(data[:cut])
        assert "\n" not in str(ei.value)


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_decodes_agrees_with_a_full_decode_on_corrupt_files(progressive):
    """The reduced-scale decode must reject exactly what a full-size decode rejects."""
    data = _jpeg(128, 96, progressive=progressive)
    rng = random.Random(7)
    rejected = 0
    for i in range(60):
        d = bytearray(data)
        if i % 3 == 0:
            d = d[: rng.randrange(400, len(d))]
        elif i % 3 == 1:
            for _ in range(8):
                d[rng.randrange(400, len(d))] = rng.randrange(256)
        else:
            p = rng.randrange(400, len(d) - 60)
            del d[p : p + rng.randrange(1, 40)]
        full = _full_pillow_decode(bytes(d))
        try:
            jpeg_decodes(bytes(d))
            fast = True
        except ValueError:
            fast = False
        assert fast == full, i
        rejected += not full
    assert rejected >= 10  # the corpus really exercises failures


def test_jpeg_decodes_rejects_non_jpeg_and_garbage():
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    for data, match in ((png.getvalue(), "not JPEG"), (b"", "Pillow cannot"), (b"\xff\xd8\xff\xe0garbage", "Pillow cannot")):
        with pytest.raises(ValueError, match=match) as ei:
            jpeg_decodes(data)
        assert "\n" not in str(ei.value)


@pytest.mark.parametrize("data", [ARITH_JPEG, _arith_across_buffer()], ids=["small", "across_buffer"])
def test_jpeg_decodes_arithmetic_coded_as_pillow_does(data):
    assert simplejpeg.decode_jpeg(data).shape == (8, 16, 3)  # what the image stage's decoder says
    if _full_pillow_decode(data):
        assert jpeg_decodes(data) == (16, 8)
    else:
        with pytest.raises(ValueError, match="arithmetic-coded") as ei:
            jpeg_decodes(data)
        assert "\n" not in str(ei.value)


def test_this_pillow_rejects_an_arithmetic_scan_across_its_buffer():
    """Documents the Pillow behaviour jpeg_decodes exists for (fails if a Pillow upgrade fixes it)."""
    assert _full_pillow_decode(ARITH_JPEG)
    assert not _full_pillow_decode(_arith_across_buffer())


def test_jpeg_decodes_accepts_mpo():
    """Camera JPEGs with an MPF block open as MPO in Pillow; they are still JPEG bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), "red").save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (24, 16))])
    assert jpeg_decodes(buf.getvalue()) == (24, 16)


def test_verify_uses_jpeg_decodes(export, monkeypatch):
    root, _ = export
    calls = []
    real = manifest_mod.jpeg_decodes

    def spy(data):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(manifest_mod, "jpeg_decodes", spy)
    verify_export(root)
    assert len(calls) == 2


def test_passthrough_export_with_mpo_verifies(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (50, 30), "red").save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (50, 30))])
    root = tmp_path / "export"
    root.mkdir()
    _write_export(root, [buf.getvalue(), _jpeg(40, 40)], mode="passthrough_jpeg")
    assert verify_export(root).samples == 2


def test_passthrough_export_with_undecodable_member_names_it(tmp_path):
    root = tmp_path / "export"
    root.mkdir()
    good = _jpeg(40, 40)
    bad = _arith_across_buffer()
    assert not _full_pillow_decode(bad)
    _write_export(root, [good, bad], mode="passthrough_jpeg")
    _one_line_error(root, "k1.jpg does not decode")
