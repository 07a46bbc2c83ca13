"""The processed-image store: append-only packs, records read back, compaction, rendering."""

import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image

from bucket_assets.core.processing import (
    RenderParams,
    RenderTask,
    StoreReader,
    append_to_store,
    close_store_packs,
    compact,
    is_pack,
    needs_compaction,
    render,
)


@pytest.fixture(autouse=True)
def _close_packs():
    yield
    close_store_packs()


def test_records_append_to_one_pack_per_directory_and_read_back(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    datas = [os.urandom(n) for n in (10, 0, 4097, 3)]
    locs = [append_to_store(a, d, f"{i}.jpg") for i, d in enumerate(datas)]
    other = append_to_store(b, b"xyz", "x.jpg")
    assert len({p for p, _ in locs}) == 1 and other[0] != locs[0][0]
    assert [o for _, o in locs] == [0, 10, 10, 4107]
    assert all(is_pack(os.path.basename(p)) for p, _ in locs + [other])
    with StoreReader() as r:
        assert [r.read(p, o, len(d)) for (p, o), d in zip(locs, datas)] == datas
        assert r.read(*other, 3) == b"xyz"


def test_a_closed_pack_is_never_appended_to_again(tmp_path):
    d = str(tmp_path / "a")
    first, _ = append_to_store(d, b"one", "1.jpg")
    close_store_packs()
    second, off = append_to_store(d, b"two", "2.jpg")
    assert second != first and off == 0
    assert open(first, "rb").read() == b"one"


def test_a_truncated_record_does_not_read_back(tmp_path):
    p, o = append_to_store(str(tmp_path), b"0123456789", "k.jpg")
    close_store_packs()
    with open(p, "r+b") as f:
        f.truncate(5)
    with pytest.raises(OSError, match="truncated"):
        StoreReader().read(p, o, 10)


def test_compaction_keeps_live_records_in_row_order_in_one_new_pack(tmp_path):
    d = str(tmp_path)
    rows = []
    for i in range(6):
        data = bytes([i]) * (100 + i)
        p, o = append_to_store(d, data, f"{i}.jpg")
        rows.append({"key": str(i), "status": "ok", "path": p, "pack_offset": o, "bytes": len(data)})
    close_store_packs()
    for i in range(3):  # replaced: their new records go to a second pack
        data = bytes([10 + i]) * 50
        p, o = append_to_store(d, data, f"{i}.jpg")
        rows[i] = {**rows[i], "path": p, "pack_offset": o, "bytes": 50}
    close_store_packs()
    rows.append({"key": "bad", "status": "decode_error", "path": None, "pack_offset": None, "bytes": None})
    sizes = {os.path.join(d, n): os.path.getsize(os.path.join(d, n)) for n in os.listdir(d)}
    live = sum(r["bytes"] for r in rows if r["status"] == "ok")
    assert not needs_compaction(live, sum(sizes.values()), len(sizes))  # 615 bytes hold 459 live ones
    assert needs_compaction(live, sum(sizes.values()) + 10_000, len(sizes) + 1)
    assert needs_compaction(live, 257, 257)
    assert not needs_compaction(0, sum(sizes.values()), len(sizes))  # nothing live: pruning removes it all

    moved = compact(d, iter(rows))
    out = [next(moved)]
    # The new pack appears under its name only once every row is through.
    assert not [n for n in os.listdir(d) if is_pack(n) and os.path.join(d, n) not in sizes]
    out += list(moved)
    assert out[-1] == rows[-1]
    assert len({r["path"] for r in out[:-1]}) == 1 and out[0]["path"] not in sizes
    assert [r["pack_offset"] for r in out[:-1]] == [0, 50, 100, 150, 253, 357]
    with StoreReader() as r:
        for old, new in zip(rows[:-1], out[:-1]):
            assert r.read(new["path"], new["pack_offset"], new["bytes"]) == r.read(old["path"], old["pack_offset"], old["bytes"])
    assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]


def _jpeg(w: int, h: int) -> bytes:
    rng = np.random.default_rng(w * h)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_render_stores_the_encoded_sample_and_reports_where(tmp_path):
    src = tmp_path / "src.jpg"
    src.write_bytes(_jpeg(300, 200))
    params = RenderParams("reencode_jpeg", 95, "adaptive_scale", 0.85, 10**8)
    task = RenderTask("id", "b", "k", "", str(src), None, None, None, 0.5, 150, 100, 5, 2, 128, 96,
                      str(tmp_path / "store" / "b"), params)
    row = render(task)
    assert row["status"] == "ok" and (row["width"], row["height"]) == (128, 96)
    with StoreReader() as r:
        data = r.read(row["path"], row["pack_offset"], row["bytes"])
    assert hashlib.sha256(data).hexdigest() == row["sha256"]
    assert Image.open(io.BytesIO(data)).size == (128, 96)
    bad = render(RenderTask("id2", "b", "k2", "", str(tmp_path / "missing.jpg"), None, None, None, 0.5, 150, 100,
                            0, 0, 128, 96, str(tmp_path / "store" / "b"), params))
    assert bad["status"] == "read_error" and bad["path"] is None and bad["pack_offset"] is None


def test_a_new_run_token_starts_a_new_pack(tmp_path):
    """A long-lived worker (Celery) keeps packs open between runs; the next run's token makes it
    leave a pack that run may have pruned instead of writing into a deleted file."""
    d = str(tmp_path)
    p1, _ = append_to_store(d, b"a", "a.jpg", "run1")
    p1b, off = append_to_store(d, b"b", "b.jpg", "run1")
    assert p1b == p1 and off == 1
    os.unlink(p1)  # pruned by run1's commit
    p2, off = append_to_store(d, b"c", "c.jpg", "run2")
    assert p2 != p1 and off == 0 and open(p2, "rb").read() == b"c"
