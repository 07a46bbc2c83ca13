"""Pixels: decode to RGB, probe headers, torch cover-resize, crop, JPEG encode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, JpegImagePlugin

from bucket_assets.core.imaging import (
    SUBSAMPLING,
    ImageError,
    crop,
    decode_rgb,
    encode_jpeg,
    grey_std,
    is_jpeg,
    jpeg_check,
    probe,
    apply_orientation,
    resize_cover,
    resize_cover_float,
    subsampling_for,
)

MAX = 100_000_000


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _exif_jpeg(w: int, h: int, orientation: int) -> bytes:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to declare width x height (CRC fixed)."""
    data = bytearray(_save(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


# resize_cover -----------------------------------------------------------------------------


def _photo(h: int, w: int) -> np.ndarray:
    """A real photograph (scikit-image's astronaut), cut and scaled to h x w."""
    from pathlib import Path

    import skimage

    img = Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png").convert("RGB")
    return np.asarray(img.resize((w, h), Image.LANCZOS)).copy()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize(
    "src, dst", [((97, 131), (40, 57)), ((64, 64), (32, 48)), ((50, 80), (50, 41)), ((1300, 2000), (544, 838)), ((9, 7), (3, 1))]
)
def test_resize_cover_is_the_direct_torch_call(src, dst):
    h, w = src
    rh, rw = dst
    rgb = _noise(h, w, seed=h * w)
    got = resize_cover(rgb, rw, rh)
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)  # uint8, channels-last in memory
    ref = F.interpolate(x, size=(rh, rw), mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()
    assert got.dtype == np.uint8
    assert got.shape == (rh, rw, 3)
    assert got.flags["C_CONTIGUOUS"]  # interleaved, so the encoder needs no transpose
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("src, dst", [((600, 900), (416, 608)), ((1000, 500), (704, 352)), ((512, 700), (300, 410))])
def test_resize_cover_matches_the_float_reference_on_photos(src, dst):
    rgb = _photo(*src)
    rh, rw = dst
    got = resize_cover(rgb, rw, rh)
    ref = resize_cover_float(rgb, rw, rh)
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float()
    direct = F.interpolate(x, size=(rh, rw), mode="bicubic", antialias=True).round().clamp(0, 255)
    assert np.array_equal(ref, direct.to(torch.uint8)[0].permute(1, 2, 0).numpy())
    assert _psnr(got, ref) >= 45.0
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 8  # rare edge pixels; PSNR is the contract


def test_resize_cover_same_size_is_identity():
    rgb = _noise(20, 30)
    assert np.array_equal(resize_cover(rgb, 30, 20), rgb)


def test_resize_cover_uniform_stays_uniform():
    rgb = np.full((100, 80, 3), 77, dtype=np.uint8)
    out = resize_cover(rgb, 33, 41)
    assert (out == 77).all()


def test_crop_box_and_bounds():
    rgb = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = crop(rgb, 1, 2, 4, 3)
    assert np.array_equal(out, rgb[2:5, 1:5])
    with pytest.raises(ValueError):
        crop(rgb, 3, 0, 4, 3)
    with pytest.raises(ValueError):
        crop(rgb, -1, 0, 2, 2)


# decode_rgb -------------------------------------------------------------------------------


def test_decode_exif_orientation_6_is_transposed():
    data = _exif_jpeg(40, 20, 6)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert stored.shape == (20, 40, 3)
    out = decode_rgb(data, MAX)
    assert out.shape == (40, 20, 3)  # width and height swapped
    # orientation 6 = rotate 90 degrees clockwise for display
    assert np.array_equal(out, np.rot90(stored, k=-1))
    # the stored left half (red) ends up on top
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60


def test_decode_exif_orientation_1_unchanged():
    out = decode_rgb(_exif_jpeg(40, 20, 1), MAX)
    assert out.shape == (20, 40, 3)


def test_decode_rgba_png_composited_on_white():
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0, 0] = (10, 20, 30, 0)  # fully transparent -> white
    arr[0, 1] = (10, 20, 30, 255)  # opaque -> unchanged
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    arr[1, :] = (200, 100, 50, 255)
    out = decode_rgb(_save(Image.fromarray(arr, "RGBA"), "PNG"), MAX)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (10, 20, 30)
    assert all(abs(int(c) - 127) <= 1 for c in out[0, 2])
    assert (out[1] == (200, 100, 50)).all()


def test_decode_la_png_composited_on_white():
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (0, 0))
    img.putpixel((1, 0), (40, 255))
    out = decode_rgb(_save(img, "PNG"), MAX)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (40, 40, 40)


def test_decode_16bit_grey_png_scaled_not_clipped():
    v = np.arange(256, dtype=np.uint16).reshape(16, 16)
    img = Image.fromarray(v * 257)
    data = _save(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_rgb(data, MAX)
    assert out.shape == (16, 16, 3)
    for c in range(3):
        assert np.array_equal(out[:, :, c], v.astype(np.uint8))


def test_decode_16bit_grey_rounds_to_nearest():
    # 0x8000 = 32768 -> 32768*255/65535 = 127.5 -> 128; 0x7F7F = 32639 -> 127.0
    img = Image.fromarray(np.array([[32768, 32639, 65535, 1]], dtype=np.uint16))
    out = decode_rgb(_save(img, "PNG"), MAX)
    assert out[0, :, 0].tolist() == [128, 127, 255, 0]


def test_decode_cmyk_jpeg_to_rgb():
    img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    data = _save(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_rgb(data, MAX)
    assert out.shape == (8, 16, 3) and out.dtype == np.uint8
    r, g, b = (int(x) for x in out[4, 8])
    assert r > 200 and g < 60 and b < 60


def test_decode_palette_with_transparency():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    data = _save(img, "PNG", transparency=0)
    out = decode_rgb(data, MAX)
    assert tuple(out[0, 0]) == (255, 255, 255)  # transparent green -> white
    assert tuple(out[0, 1]) == (255, 0, 0)


def test_decode_plain_rgb_png_roundtrip():
    arr = _noise(7, 9)
    assert np.array_equal(decode_rgb(_save(Image.fromarray(arr), "PNG"), MAX), arr)


def test_decode_grey_png_to_rgb():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = decode_rgb(_save(Image.fromarray(arr, "L"), "PNG"), MAX)
    assert out.shape == (3, 4, 3)
    assert np.array_equal(out[:, :, 1], arr)


def test_decode_truncated_jpeg_is_decode_error():
    data = _save(Image.fromarray(_noise(128, 128)), "JPEG", quality=90)
    with pytest.raises(ImageError) as ei:
        decode_rgb(data[: len(data) // 2], MAX)
    assert ei.value.reason == "decode_error"


@pytest.mark.parametrize("data", [b"", bytes(np.random.default_rng(1).integers(0, 256, 1000, dtype=np.uint8)), b"\xff\xd8\xff"])
def test_decode_garbage_is_decode_error(data):
    with pytest.raises(ImageError) as ei:
        decode_rgb(data, MAX)
    assert ei.value.reason == "decode_error"


def test_decode_declared_too_large_rejected_before_decoding():
    data = _png_with_declared_size(100_000, 100_000)
    with pytest.raises(ImageError) as ei:
        decode_rgb(data, MAX)
    assert ei.value.reason == "too_large"
    assert "100000x100000" in str(ei.value)


def test_decode_max_pixels_boundary():
    data = _save(Image.fromarray(_noise(10, 10)), "PNG")
    assert decode_rgb(data, 100).shape == (10, 10, 3)  # exactly max_pixels is allowed
    with pytest.raises(ImageError) as ei:
        decode_rgb(data, 99)
    assert ei.value.reason == "too_large"


# probe ------------------------------------------------------------------------------------------


def test_probe_exif_corrected_size():
    h = probe(_exif_jpeg(40, 20, 6), MAX)
    assert (h.width, h.height) == (20, 40)
    assert h.orientation == 6 and h.format == "JPEG" and h.mode == "RGB"
    h1 = probe(_exif_jpeg(40, 20, 1), MAX)
    assert (h1.width, h1.height, h1.orientation) == (40, 20, 1)


def test_grey_std_separates_blank_from_content():
    uniform = np.full((192, 256, 3), (120, 130, 140), dtype=np.uint8)
    assert grey_std(uniform) < 0.5
    assert grey_std(_photo(192, 256)) > 20
    # an almost-uniform image with a tiny speck is still near-blank
    speck = np.full((192, 256, 3), 90, dtype=np.uint8)
    speck[0, 0] = 0
    assert grey_std(speck) < 2.0
    blank_jpeg = _save(Image.fromarray(uniform), "JPEG", quality=95)
    assert jpeg_check(blank_jpeg) == (256, 192, pytest.approx(0, abs=0.5))
    assert jpeg_check(_save(Image.fromarray(_photo(192, 256)), "JPEG", quality=95))[2] > 20
    with pytest.raises(ValueError, match="Pillow cannot decode it"):
        jpeg_check(blank_jpeg[: len(blank_jpeg) // 2])


def test_probe_reads_the_header_only():
    truncated = _save(Image.fromarray(_photo(120, 160)), "JPEG", quality=95)[:2000]
    h = probe(truncated, MAX)  # pixels are not decoded, so a truncated body is found later
    assert (h.width, h.height) == (160, 120)
    with pytest.raises(ImageError):
        decode_rgb(truncated, MAX)


def test_probe_errors():
    with pytest.raises(ImageError) as ei:
        probe(_png_with_declared_size(100_000, 100_000), MAX)
    assert ei.value.reason == "too_large"
    with pytest.raises(ImageError) as ei:
        probe(b"not an image at all", MAX)
    assert ei.value.reason == "decode_error"
    with pytest.raises(ImageError) as ei:
        probe(b"", MAX)
    assert ei.value.reason == "decode_error"


# JPEG encoding -------------------------------------------------------------------------------------


def test_subsampling_adaptive_scale():
    assert subsampling_for("adaptive_scale", 0.5, 0.85) == 0
    assert subsampling_for("adaptive_scale", 0.8499, 0.85) == 0
    assert subsampling_for("adaptive_scale", 0.85, 0.85) == 2
    assert subsampling_for("adaptive_scale", 1.0, 0.85) == 2


@pytest.mark.parametrize("policy, code", [("4:4:4", 0), ("4:2:2", 1), ("4:2:0", 2)])
def test_subsampling_fixed_policies(policy, code):
    assert SUBSAMPLING[policy] == code
    assert subsampling_for(policy, 0.1, 0.85) == code
    assert subsampling_for(policy, 1.0, 0.85) == code


@pytest.mark.parametrize("code", [0, 1, 2])
def test_encode_jpeg_deterministic_and_uses_subsampling(code):
    rgb = _noise(48, 64, seed=code)
    a = encode_jpeg(rgb, 95, code)
    b = encode_jpeg(rgb.copy(), 95, code)
    assert a == b
    assert is_jpeg(a)
    with Image.open(io.BytesIO(a)) as im:
        assert im.size == (64, 48) and im.mode == "RGB"
        assert JpegImagePlugin.get_sampling(im) == code


def test_encode_jpeg_accepts_non_contiguous_crop():
    rgb = _noise(40, 40)
    view = rgb[5:37, 3:35]
    assert not view.flags["C_CONTIGUOUS"]
    assert encode_jpeg(view, 90, 0) == encode_jpeg(np.ascontiguousarray(view), 90, 0)


def test_is_jpeg():
    assert is_jpeg(_save(Image.new("RGB", (2, 2)), "JPEG"))
    assert not is_jpeg(_save(Image.new("RGB", (2, 2)), "PNG"))
    assert not is_jpeg(b"")


@pytest.mark.parametrize("mode, key, opaque", [("L", 0, 200), ("RGB", (0, 0, 0), (200, 10, 10))])
def test_decode_colour_key_transparency_composited_on_white(mode, key, opaque):
    img = Image.new(mode, (2, 1))
    img.putpixel((1, 0), opaque)
    data = _save(img, "PNG", transparency=key)
    # Pillow itself treats the key colour as fully transparent
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))[0, 0, 3] == 0
    out = decode_rgb(data, MAX)
    assert tuple(out[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_pillow_exif_transpose(orientation):
    from PIL import ImageOps

    arr = _noise(5, 7, seed=orientation)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.info["exif"] = exif.tobytes()
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(_save(img, "PNG", exif=exif.tobytes())))))
    assert np.array_equal(apply_orientation(arr, orientation), ref)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_jpeg_decode_equals_pillow(orientation):
    """The libjpeg-turbo fast path gives Pillow's pixels, orientation applied."""
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(_photo(90, 130)), "JPEG", quality=90, exif=exif.tobytes())
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(decode_rgb(data, MAX), ref)


def test_fast_jpeg_decode_greyscale_equals_pillow():
    data = _save(Image.fromarray(_photo(60, 80)).convert("L"), "JPEG", quality=90)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decode_rgb(data, MAX), ref)


def test_dct_downscale_decodes_smaller_but_close():
    photo = _photo(1200, 1600)
    data = _save(Image.fromarray(photo), "JPEG", quality=95)
    full = decode_rgb(data, MAX)
    small = decode_rgb(data, MAX, None, (400, 300))
    assert full.shape == (1200, 1600, 3)
    assert small.shape[0] >= 300 and small.shape[1] >= 400 and small.shape[1] < 1600
    a = resize_cover(full, 200, 150)
    b = resize_cover(small, 200, 150)
    assert _psnr(a, b) > 30
