"""The size a plan is made from and the pixels the renderer decodes come from one source
(issue 11): TIFF orientation, text orientation tags, an ICC profile deep in a JPEG, formats
outside the supported set, big PNG text chunks, and the check that catches a mismatch."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from bucket_assets.core import imaging
from bucket_assets.core.imaging import ImageError, decode_rgb, probe
from bucket_assets.core.processing import RenderParams, RenderTask, render


def _arr(w: int = 120, h: int = 48) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 3, : w // 4] = (255, 0, 0)  # a red block top-left: shows any rotation
    a[h // 2 :, w // 2 :] = (0, 0, 255)
    return a


def _save(fmt: str, orientation=None, **kw) -> bytes:
    im = Image.fromarray(_arr())
    buf = io.BytesIO()
    if orientation is not None:
        exif = im.getexif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("orientation", [1, 2, 3, 5, 6, 7, 8])
def test_probe_size_is_the_decoded_shape(fmt, orientation):
    data = _save(fmt, orientation)
    h = probe(data, 10**8)
    rgb = decode_rgb(data, 10**8)
    assert (rgb.shape[1], rgb.shape[0]) == (h.width, h.height)
    assert (h.width, h.height) == ((48, 120) if orientation in (5, 6, 7, 8) else (120, 48))
    # Also when the renderer is handed the orientation the raw index recorded.
    rgb2 = decode_rgb(data, 10**8, h.orientation)
    assert rgb2.shape == rgb.shape


def _with_text_orientation(jpeg: bytes, value: bytes) -> bytes:
    """A JPEG whose EXIF Orientation tag is stored as ASCII (type 2) instead of SHORT."""
    ifd = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12" + b"\x00\x02" + len(value).to_bytes(4, "big")
    ifd += value.ljust(4, b"\x00")[:4] + b"\x00\x00\x00\x00"
    app1 = b"Exif\x00\x00" + ifd
    seg = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    return jpeg[:2] + seg + jpeg[2:]


@pytest.mark.parametrize("icc", [False, True], ids=["fast-path", "pillow-path"])
def test_orientation_stored_as_text_rotates_plan_and_pixels_alike(icc):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    plain = _save("JPEG", quality=95, **({"icc_profile": srgb} if icc else {}))
    data = _with_text_orientation(plain, b"6\x00")
    assert (imaging._decode_jpeg_fast(data, 10**8) is None) == icc
    h = probe(data, 10**8)
    assert h.orientation == 6 and (h.width, h.height) == (48, 120)
    for orient in (None, h.orientation):
        rgb = decode_rgb(data, 10**8, orient)
        assert (rgb.shape[1], rgb.shape[0]) == (48, 120)
        ref = np.rot90(decode_rgb(plain, 10**8), k=-1)
        assert np.abs(rgb.astype(int) - ref.astype(int)).mean() < 1


def _jpeg_with_late_icc(profile: bytes) -> bytes:
    """An RGB JPEG whose ICC profile follows 200 KiB of APP segments (big XMP blocks)."""
    im = Image.fromarray(_arr())
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, icc_profile=profile)
    data = buf.getvalue()
    filler = b""
    for _ in range(4):
        body = b"http://ns.adobe.com/xap/1.0/\x00" + b" " * 60000
        filler += b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body
    return data[:2] + filler + data[2:]


def test_icc_profile_after_128_kib_is_applied():
    # A profile that swaps red and blue primaries: applying it changes the red block's colour.
    p = ImageCms.createProfile("sRGB")
    swapped = ImageCms.ImageCmsProfile(p).tobytes()
    late = _jpeg_with_late_icc(swapped)
    assert late.index(b"ICC_PROFILE\x00") > 131072
    assert imaging._has_icc(late)
    assert not imaging._has_icc(_save("JPEG", quality=95))
    # The fast path must not take it (it would ignore the profile).
    assert imaging._decode_jpeg_fast(late, 10**8) is None


def test_eps_named_jpg_is_never_handed_to_ghostscript(monkeypatch):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n%%EOF\n"
    import subprocess

    def no_subprocess(*a, **k):  # pragma: no cover - the assertion is that it is not reached
        raise AssertionError("a subprocess was started for image bytes")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    with pytest.raises(ImageError) as e:
        probe(eps, 10**8)
    assert e.value.reason == "decode_error" and "supported format" in e.value.detail
    with pytest.raises(ImageError):
        decode_rgb(eps, 10**8)
    assert "EPS" not in imaging.FORMATS and "JPEG" in imaging.FORMATS


def _png_with_ztxt(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_arr()).save(buf, "PNG")
    data = buf.getvalue()
    payload = b"Comment\x00\x00" + zlib.compress(b"a" * size)
    chunk = len(payload).to_bytes(4, "big") + b"zTXt" + payload
    chunk += zlib.crc32(b"zTXt" + payload).to_bytes(4, "big")
    i = data.index(b"IDAT") - 4
    return data[:i] + chunk + data[i:]


def test_png_with_a_large_ztxt_chunk_decodes():
    data = _png_with_ztxt(3 << 20)
    assert probe(data, 10**8).width == 120
    assert decode_rgb(data, 10**8).shape == (48, 120, 3)


def test_render_refuses_pixels_that_do_not_fit_the_plan(tmp_path):
    src = tmp_path / "a.png"
    src.write_bytes(_save("PNG"))
    params = RenderParams("reencode_jpeg", 95, "4:4:4", 0.85, 10**8)

    def task(src_w, src_h, orientation=None):
        return RenderTask("a", "b", "a", "", str(src), None, None, None, 0.5, 60, 24, 0, 0, 60, 24,
                          store_dir=str(tmp_path / "store"), params=params, orientation=orientation,
                          src_w=src_w, src_h=src_h)

    assert render(task(120, 48))["status"] == "ok"
    # A plan made for the rotated size (e.g. a probe that swapped twice) is caught.
    bad = render(task(48, 120))
    assert bad["status"] == "size_mismatch" and "48x120" in bad["error"]
    # So is an orientation the raw index recorded but the pixels do not follow.
    assert render(task(120, 48, orientation=6))["status"] == "size_mismatch"


def test_passthrough_decides_decodability_with_the_loaders_decoder(tmp_path):
    """An arithmetic-coded JPEG whose scan crosses Pillow's read buffer: libjpeg-turbo (simplejpeg)
    decodes it, Pillow (verify, webdataset, our loader) cannot. Passthrough must not publish it."""
    import simplejpeg

    from bucket_assets_tests.test_hostile_manifest import ARITH_JPEG, _arith_across_buffer

    params = RenderParams("passthrough_jpeg", 95, "4:4:4", 0.85, 10**8, blank_std=None)
    rows = {}
    for name, data in (("small", ARITH_JPEG), ("across", _arith_across_buffer())):
        src = tmp_path / f"{name}.jpg"
        src.write_bytes(data)
        rows[name] = render(RenderTask(name, "b", name, "", str(src), None, None, None, 1.0, 16, 8, 0, 0, 16, 8,
                                       store_dir=str(tmp_path / "store"), params=params))
        assert simplejpeg.decode_jpeg(data).shape[:2] == (8, 16)  # the other decoder would accept both
    assert rows["small"]["status"] == "ok"
    assert rows["across"]["status"] == "decode_error" and "arithmetic-coded" in rows["across"]["error"]
