"""Coverage-guided fuzzing (atheris) of the intake: the tar reader, the image probe/decode, and
the values a sidecar or a name can carry.

    pip install atheris
    python fuzz/fuzz_intake.py -atheris_runs=200000            # or -max_total_time=600
    python fuzz/fuzz_intake.py fuzz/corpus -max_total_time=600 # with a seed corpus (--make-corpus)

The first input byte picks the target (its value mod 3): 0 goes to the tar reader (the rest
written as a .tar, scanned, every record's bytes read back and probed; then the same tar through
the scan cache's worker task, whose fragment must hold one row per record in its schema), 1 to the image intake
(probe, then decode), 2 to the metadata path (the rest split into a member name and a .json
sidecar, each record finalized and turned into a raw index row that must fit the schema). The
scan itself may not raise at all; the only allowed failures are OSError for a member that
cannot be read and ImageError for image bytes. Anything else is a crash atheris reports with
the input that caused it.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bucket_assets.core.imaging import ImageError, decode_rgb, probe
    from bucket_assets.core.raw_index import FRAGMENT_SCHEMA, RAW_INDEX_SCHEMA, ScanTask, record_row, scan_part
    from bucket_assets.core.sources import RawRecord, ScanStats, finalize, read_bytes, stat_token
    from bucket_assets.core.sources.values import load_json_object
    from bucket_assets.core.sources.webdataset import scan
    from bucket_assets.spec import WebDatasetSource

MAX_PIXELS = 4_000_000  # small: a fuzzer must not spend its time decoding big pictures
_DIR = Path(tempfile.mkdtemp(prefix="fuzz-intake-"))
_TAR = _DIR / "00000.tar"
_SOURCE = WebDatasetSource(name="fuzz", kind="webdataset", paths=[str(_TAR)])
_FRAGMENT = _DIR / "scan" / "fragment.parquet"


def _image(data: bytes) -> None:
    try:
        probe(data, MAX_PIXELS)
        decode_rgb(data, MAX_PIXELS, None, None)
    except ImageError:
        pass


def _rows(records) -> None:
    rows = [record_row(i, finalize(r), "webdataset") for i, r in enumerate(records)]
    pa.Table.from_pylist(rows, schema=RAW_INDEX_SCHEMA)  # every value must fit the raw index


def _tar(data: bytes) -> None:
    _TAR.write_bytes(data)
    records = list(scan(_SOURCE, ScanStats(), 1000))
    _rows(records)
    for r in records:
        if r.member is None:
            continue
        try:
            _image(read_bytes(r.location, r.member, r.offset, r.size))
        except OSError:
            pass
    summary = scan_part(ScanTask(source=_SOURCE.model_dump(mode="json"), unit=str(_TAR), fingerprint=stat_token(str(_TAR)),
                                 start=0, stop=None, max_chars=1000, max_pixels=MAX_PIXELS, fragment=str(_FRAGMENT)))
    assert summary["error"] is None and summary["stable"] and summary["rows"] == len(records), summary
    fragment = pq.read_table(_FRAGMENT)
    assert fragment.schema.equals(FRAGMENT_SCHEMA) and fragment.num_rows == len(records)
    assert fragment.column("image_id").to_pylist() == [r.image_id for r in records]  # finalized by _rows


def _metadata(data: bytes) -> None:
    name, _, sidecar = data.partition(b"\n")
    meta, _flags = load_json_object(sidecar)
    rec = RawRecord(image_id=name.decode("utf-8", "surrogateescape"), source="fuzz", location=str(_TAR),
                    member=name.decode("utf-8", "surrogateescape") + ".jpg", meta=meta)
    if meta:
        rec.url, rec.similarity, rec.nsfw = meta.get("url"), meta.get("similarity"), meta.get("NSFW")
        rec.orig_w, rec.orig_h, rec.caption = meta.get("width"), meta.get("height"), meta.get("caption")
    _rows([rec])


def test_one_input(data: bytes) -> None:
    if not data:
        return
    (_tar, _image, _metadata)[data[0] % 3](data[1:])


def make_corpus(out: Path) -> None:
    """A few valid seeds: a small JPEG and PNG, and a tar holding a sample."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (64, 48), (200, 30, 30))
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        (out / f"seed.{fmt.lower()}").write_bytes(b"\x01" + buf.getvalue())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, payload in (("a.jpg", (out / "seed.jpeg").read_bytes()[1:]), ("a.txt", b"caption"),
                              ("a.json", b'{"similarity": 0.3}')):
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
    (out / "seed.tar").write_bytes(b"\x00" + buf.getvalue())
    (out / "seed.meta").write_bytes(b"\x02caf\xe9\n" + b'{"url": "u", "similarity": 0.3, "width": 640, "height": 480, "NSFW": "UNLIKELY"}')


if __name__ == "__main__":
    if "--make-corpus" in sys.argv:
        make_corpus(Path(os.path.dirname(__file__)) / "corpus")
        sys.exit(0)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
