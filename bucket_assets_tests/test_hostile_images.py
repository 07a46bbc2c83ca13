"""Hostile image bytes end to end: each file ends as an exported sample with the right pixels
or as a recorded reason, and the summary accounts for every one."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import duckdb
import numpy as np
import pytest
import yaml
from PIL import Image

from bucket_assets.core.manifest import verify_export
from bucket_assets.core.shards import read_shard
from bucket_assets.spec import load_spec
from bucket_assets_tests.conftest import materialize_all

W, H = 800, 600
# PIL transpose that undoes what exif_transpose applies for each orientation
INVERSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _scene() -> Image.Image:
    """An asymmetric picture: orientation mistakes change it a lot."""
    y, x = np.mgrid[0:H, 0:W]
    arr = np.zeros((H, W, 3), dtype=np.uint8)
    arr[..., 0] = (x * 255 // W).astype(np.uint8)
    arr[..., 1] = (y * 255 // H).astype(np.uint8)
    arr[: H // 4, : W // 4, 2] = 255
    return Image.fromarray(arr)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _ycck_jpeg(scene: Image.Image) -> bytes:
    """A YCCK JPEG (Adobe transform 2): the CMYK picture's C, M, Y stored as YCbCr of (255 - C,
    255 - M, 255 - Y) and K as is, which is what libjpeg writes for JCS_YCCK."""
    cmyk = np.asarray(scene.convert("CMYK")).astype(np.float64)
    r, g, b = 255 - cmyk[..., 0], 255 - cmyk[..., 1], 255 - cmyk[..., 2]
    planes = [0.299 * r + 0.587 * g + 0.114 * b, -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
              0.5 * r - 0.418688 * g - 0.081312 * b + 128, cmyk[..., 3]]
    ycck = np.clip(np.stack(planes, -1).round(), 0, 255).astype(np.uint8)
    data = bytearray(_save(Image.fromarray(ycck, "CMYK"), "JPEG", quality=95))
    adobe = data.find(b"Adobe\x00")
    assert adobe > 0
    data[adobe + 11] = 2  # APP14 transform byte: YCCK
    return bytes(data)


def _swapped_primaries_icc() -> bytes:
    """sRGB's ICC profile with the red and green primaries swapped: converting through it to
    sRGB swaps the red and green channels, so a skipped conversion is plain to see."""
    from PIL import ImageCms

    b = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", b[128:132])[0]
    entry = {bytes(b[132 + 12 * i: 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    r, g = entry[b"rXYZ"], entry[b"gXYZ"]
    b[r + 4: r + 12], b[g + 4: g + 12] = b[g + 4: g + 12], b[r + 4: r + 12]
    return bytes(b)


def _files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected outcome: 'exported' or a reason)."""
    scene = _scene()
    jpeg = _save(scene, "JPEG", quality=95)
    rng = np.random.default_rng(0)
    out = {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "decode_error"),
        "zero.jpg": (b"", "decode_error"),
        "random.jpg": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "decode_error"),
        "png_named.jpg": (_save(scene, "PNG"), "exported"),
        "progressive.jpg": (_save(scene, "JPEG", quality=95, progressive=True), "exported"),
        "cmyk.jpg": (_save(scene.convert("CMYK"), "JPEG", quality=95), "exported"),
        "grey.jpg": (_save(scene.convert("L"), "JPEG", quality=95), "exported"),
        "rgba.png": (_save(scene.convert("RGBA"), "PNG"), "exported"),
        "la.png": (_save(scene.convert("LA"), "PNG"), "exported"),
        "sixteen.png": (_save(Image.fromarray(np.asarray(scene.convert("L"), dtype=np.uint16) * 257), "PNG"), "exported"),
        "photo.webp": (_save(scene, "WEBP", quality=95), "exported"),
        "anim.gif": (_save(scene.convert("P"), "GIF", save_all=True, append_images=[Image.new("P", (W, H))]), "exported"),
        "corrupt_exif.jpg": (jpeg[:2] + b"\xff\xe1\x00\x10Exif\x00\x00MM\x00*\xff\xff\xff\xff" + jpeg[2:], "exported"),
        "bomb.png": (_bomb_png(100_000, 100_000), "too_large"),
        "one.png": (_save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "too_small"),
        "sliver.png": (_save(Image.new("RGB", (1, 10_000), (9, 9, 9)), "PNG"), "too_small"),
    }
    for o in range(1, 9):
        stored = scene.transpose(INVERSE[o]) if o in INVERSE else scene
        exif = Image.Exif()
        exif[0x0112] = o
        out[f"orient{o}.jpg"] = (_save(stored, "JPEG", quality=95, exif=exif.tobytes()), "exported")
    out["ycck.jpg"] = (_ycck_jpeg(scene), "exported")
    out["icc_swapped.jpg"] = (_save(scene, "JPEG", quality=95, icc_profile=_swapped_primaries_icc()), "exported")
    out["anim_webp.webp"] = (_save(scene, "WEBP", quality=95, save_all=True, append_images=[Image.new("RGB", (W, H))]),
                             "exported")
    # transparency composited on white: a palette image whose index 0 is transparent
    pal = scene.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    out["palette.png"] = (_save(pal, "PNG", transparency=0), "exported")
    return out


@pytest.fixture(scope="module")
def hostile_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    folder = root / "images"
    folder.mkdir()
    files = _files()
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    spec = {
        "name": "hostile", "output_dir": str(root / "export"), "work_dir": str(root / "work"),
        "sources": [{"name": "folder", "kind": "folder", "path": str(folder), "image_extensions": ["jpg", "png", "webp", "gif"]}],
        "filters": {"drop_duplicates": False},
        "captions": {"landing_dir": str(root / "captions"), "selectors": ["sidecar"]},
        "image": {"crop": {"strategy": "center"}, "workers": 1},
    }
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    assert materialize_all(spec_path).success
    return load_spec(spec_path), files


def _outcomes(spec) -> dict[str, str]:
    from bucket_assets.core.accounting import OUTCOMES_SQL

    con = duckdb.connect(str(spec.db_path), read_only=True)
    try:
        con.execute(OUTCOMES_SQL)
        return dict(con.execute("SELECT image_id, outcome FROM image_outcomes").fetchall())
    finally:
        con.close()


def _samples(spec) -> dict[str, np.ndarray]:
    out = {}
    for shard in Path(spec.output_dir).rglob("shard-*.tar"):
        for _, parts in read_shard(shard):
            meta = json.loads(parts["json"])
            out[meta["image_id"]] = np.asarray(Image.open(io.BytesIO(parts["jpg"])).convert("RGB"))
    return out


def _psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_every_hostile_file_ends_as_expected(hostile_export):
    spec, files = hostile_export
    outcomes = _outcomes(spec)
    want = {Path(n).stem: expected for n, (_, expected) in files.items()}
    assert outcomes == want
    manifest = json.loads((Path(spec.output_dir) / "manifest.json").read_text())
    s = manifest["summary"]
    assert s["images_seen"] == len(files)
    assert s["images_exported"] == sum(1 for v in want.values() if v == "exported")
    assert s["decode_errors"] == 3 and s["skipped_too_large"] == 1 and s["skipped_too_small"] == 2
    verify_export(spec.output_dir)


def test_exported_pixels_are_right(hostile_export):
    spec, _ = hostile_export
    samples = _samples(spec)
    ref = samples["orient1"]
    # every EXIF orientation comes out upright, like the plain file
    for o in range(2, 9):
        assert samples[f"orient{o}"].shape == ref.shape
        assert _psnr(samples[f"orient{o}"], ref) > 35, o
    for name in ("png_named", "progressive", "cmyk", "photo", "corrupt_exif"):
        assert _psnr(samples[name], ref) > 30, name
    # greyscale-derived images are grey
    for name in ("grey", "sixteen", "la"):
        img = samples[name].astype(int)
        assert np.abs(img[..., 0] - img[..., 1]).max() <= 3, name
    assert _psnr(samples["sixteen"], samples["grey"]) > 35  # scaled, not clipped
    # fully opaque alpha leaves the picture as it was
    assert _psnr(samples["rgba"], ref) > 35
    # the palette's transparent index is composited on white
    pal = samples["palette"]
    assert (pal.reshape(-1, 3) > 245).all(axis=1).any()
    # an animated GIF or WebP exports its first frame (the scene, not the black second frame)
    assert samples["anim"].mean() > 40
    assert _psnr(samples["anim_webp"], ref) > 30
    # YCCK decodes to the same picture as the CMYK file
    assert _psnr(samples["ycck"], samples["cmyk"]) > 30
    # an embedded ICC profile is converted to sRGB: here its swapped primaries swap red and green
    assert _psnr(samples["icc_swapped"], ref[..., [1, 0, 2]]) > 30
    assert _psnr(samples["icc_swapped"], ref) < 20
