"""Pixels: probe headers, decode to RGB, cover-resize with torch, crop, encode JPEG.

Every function here is pure (bytes in, bytes or arrays out) so it runs the same in a worker
process, a test, or a benchmark.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageCms, PngImagePlugin, UnidentifiedImageError

# We enforce our own pixel limit (spec image.max_pixels) and report it as too_large; Pillow's
# bomb check would otherwise raise before we can say why.
Image.MAX_IMAGE_PIXELS = None
# Text chunks are never used, but Pillow refuses a PNG whose zTXt/iTXt inflates past 1 MB;
# a bounded larger limit keeps such (real, e.g. XMP-laden) PNGs decodable.
PngImagePlugin.MAX_TEXT_CHUNK = 32 << 20
PngImagePlugin.MAX_TEXT_MEMORY = 64 << 20

# The only formats Pillow may parse: every other plugin (EPS, which runs Ghostscript, PSD,
# ICNS, ...) stays out of reach of input bytes whatever their name says.
# (Multi-picture camera JPEGs open through the JPEG plugin as MPO.)
Image.init()
FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "AVIF") if f in Image.OPEN)

SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
_SRGB = ImageCms.createProfile("sRGB")
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageError(Exception):
    """An image that cannot become a sample; `reason` is a stable skip-reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageHeader:
    width: int  # after EXIF orientation
    height: int
    format: str
    mode: str
    orientation: int


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("decode_error", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError("decode_error", f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a decode error for this sample
        raise ImageError("decode_error", f"{type(exc).__name__}: {exc}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("decode_error", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError("too_large", f"{w}x{h} exceeds max_pixels {max_pixels}")
    return img


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation still to apply to the pixels Pillow decodes from `img`: the one
    source of truth for both the planned size (probe) and the rendered pixels (decode_rgb).
    Pillow's TIFF reader applies the orientation itself (its size is already rotated), so
    nothing is left to apply there. A value stored as text ("6") counts as that number."""
    if img.format == "TIFF" and _PILLOW_ORIENTS_TIFF:
        return 1
    try:
        value = img.getexif().get(0x0112, 1)
        if isinstance(value, (bytes, str)):
            value = value.strip(b"\0 " if isinstance(value, bytes) else "\0 ")
        if isinstance(value, (tuple, list)) and value:
            value = value[0]
        value = int(value)
        return value if value in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - a corrupt EXIF block means "no orientation"
        return 1


# Pillow 13's TIFF plugin rotates on load and reports the rotated size from open.
_PILLOW_ORIENTS_TIFF = int(Image.__version__.split(".")[0]) >= 13


def probe(data: bytes, max_pixels: int) -> ImageHeader:
    """Read the header only (size after EXIF orientation, format, mode): no pixel is decoded.
    The size is exactly the shape decode_rgb returns for these bytes (processing checks it)."""
    img = _open(data, max_pixels)
    w, h = img.size
    orientation = _orientation(img)
    if orientation in _ROTATED:
        w, h = h, w
    return ImageHeader(w, h, img.format or "unknown", img.mode, orientation)


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def grey_std(rgb: np.ndarray) -> float:
    """Standard deviation of luma (0-255) over every 4th pixel: ~0 for a uniform placeholder."""
    sample = rgb[::4, ::4].astype(np.float32)
    return float((sample @ _LUMA).std())


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.uint32)
    # Scale 0..65535 to 0..255 with rounding (not clipping, which would whiten everything).
    return Image.fromarray(((arr * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit sRGB: alpha on white, 16-bit greys scaled, ICC converted."""
    icc = img.info.get("icc_profile")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _sixteen_bit_to_l(img).convert("RGB")
    if img.mode == "F":
        return img.convert("L").convert("RGB")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # palette or colour-key transparency
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    if icc and img.mode in ("RGB", "CMYK", "L"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, _SRGB, outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile falls back to a plain conversion
            pass
    return img.convert("RGB") if img.mode != "RGB" else img


# EXIF orientation -> the numpy equivalent of ImageOps.exif_transpose on an HxWxC array.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


def apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    fn = _ORIENT.get(orientation)
    return np.ascontiguousarray(fn(rgb)) if fn else rgb


def _jpeg_segments(data: bytes):
    """(marker, offset) of each marker segment of a JPEG header, up to the start of scan; a
    header that cannot be walked ends with (None, offset)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            yield None, i
            return
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more headers
            return
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            yield None, i
            return
        yield marker, i
        i += 2 + length
    yield None, i


def _has_icc(data: bytes) -> bool:
    """An APP2 ICC_PROFILE segment before the scan, wherever it sits (a profile may follow a
    large EXIF/XMP block). A header that cannot be walked counts as having one, so the bytes
    take the Pillow path, which handles every case."""
    for marker, i in _jpeg_segments(data):
        if marker is None or (marker == 0xE2 and data[i + 4 : i + 16] == b"ICC_PROFILE\x00"):
            return True
    return False


_ARITH_SOF = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _sof_marker(data: bytes) -> int | None:
    """The start-of-frame marker of a JPEG header, for naming why a decode failed."""
    for marker, _ in _jpeg_segments(data):
        if marker is not None and 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
    return None


def jpeg_check(data: bytes) -> tuple[int, int, float]:
    """(width, height, luma std) of JPEG bytes that Pillow decodes completely; ValueError with a
    one-line reason otherwise. MPO (a JPEG with an MPF block, as cameras write) counts as JPEG.

    Pillow is the decoder of the loaders that read an export (webdataset, HF datasets, ours),
    so passthrough and `verify` decide decodability with it. The decode runs at 1/8 scale
    (Image.draft): libjpeg still entropy-decodes every coefficient, so a truncated or corrupt
    scan fails exactly as a full decode does (tested), but most of the IDCT and 63/64 of the
    pixel memory are skipped. Pillow decodes an arithmetic-coded JPEG only while its scan fits
    Pillow's 64 KiB read buffer (libjpeg's arithmetic decoder cannot suspend), where
    libjpeg-turbo given the whole file (simplejpeg) succeeds: one decoder keeps the image
    stage, verify and Pillow-based loaders in agreement.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                fmt, (w, h) = im.format, im.size
                if fmt in ("JPEG", "MPO"):
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                    im.load()
                    small = np.asarray(im.convert("L") if im.mode != "L" else im, dtype=np.float32)
    except UnidentifiedImageError:
        raise ValueError("Pillow cannot identify it as an image") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "does not decode"
        sof = _sof_marker(data)
        what = f"arithmetic-coded JPEG (SOF{sof - 0xC0}): " if sof in _ARITH_SOF else ""
        msg = f"{what}Pillow cannot decode it ({type(exc).__name__}: {exc})"
        raise ValueError(" ".join(msg.split())) from None
    if fmt not in ("JPEG", "MPO"):
        raise ValueError(f"{fmt} image, not JPEG")
    return w, h, float(small.std())


def jpeg_decodes(data: bytes) -> tuple[int, int]:
    """(width, height) as jpeg_check decides it."""
    w, h, _ = jpeg_check(data)
    return w, h


def _decode_jpeg_fast(
    data: bytes, max_pixels: int, orientation: int | None = None, min_size: tuple[int, int] | None = None
) -> np.ndarray | None:
    """libjpeg-turbo straight into a numpy array (simplejpeg) for plain YCbCr/grey JPEGs without an
    ICC profile: the same pixels as Pillow's decoder, without the PIL image round trip. Returns
    None for anything else (CMYK, ICC, odd headers), which takes the Pillow path."""
    if not is_jpeg(data) or _has_icc(data):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray"):
        return None
    if w * h > max_pixels:
        raise ImageError("too_large", f"{w}x{h} exceeds max_pixels {max_pixels}")
    orientation = jpeg_orientation(data) if orientation is None else orientation
    factor = 1
    if min_size is not None:
        # DCT-domain downscale by 8, 4 or 2 (libjpeg-turbo's SIMD-accelerated scales; 3/4, 5/8...
        # decode slower than a full decode), the largest that keeps at least min_size.
        mw, mh = (min_size[1], min_size[0]) if orientation in _ROTATED else min_size
        factor = next((f for f in (8, 4, 2) if -(-w // f) >= mw and -(-h // f) >= mh), 1)
    try:
        mw, mh = (-(-w // factor), -(-h // factor)) if factor > 1 else (0, 0)
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, min_width=mw, min_height=mh)
    except ValueError as exc:
        raise ImageError("decode_error", str(exc)) from None
    return apply_orientation(rgb, orientation)


def jpeg_orientation(data: bytes) -> int:
    """EXIF orientation from the header only (Pillow parses it lazily, without decoding)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            return _orientation(img)
    except Exception:  # noqa: BLE001 - no readable EXIF means no rotation
        return 1


def decode_rgb(
    data: bytes, max_pixels: int, orientation: int | None = None, min_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode the first frame, apply EXIF orientation, convert to RGB; HxWx3 uint8.
    `orientation`, when the caller already read it from the header (the raw index did), saves
    parsing the EXIF block again. `min_size` (w, h after orientation) lets a JPEG decode at a
    reduced DCT scale that is still at least that large (approximate mode; None = exact)."""
    fast = _decode_jpeg_fast(data, max_pixels, orientation, min_size)
    if fast is not None:
        return fast
    img = _open(data, max_pixels)
    # The same orientation the probe planned with (never Pillow's exif_transpose, which reads
    # the tag its own way): plan and pixels cannot disagree.
    orientation = _orientation(img) if orientation is None else orientation
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.seek(0)
            img.load()
            rgb = to_rgb(img)
            return apply_orientation(np.array(rgb, dtype=np.uint8), orientation)  # writable for torch
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageError("decode_error", f"{type(exc).__name__}: {exc}") from None


def resize_cover(rgb: np.ndarray, resized_w: int, resized_h: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="bicubic", antialias=True) on CPU.

    The HxWx3 uint8 array is viewed as a channels-last NCHW uint8 tensor without a copy; torch's
    uint8 channels-last bicubic-antialias kernel is several times faster than the float32 path
    and within 1-2 grey levels of it (PSNR > 45 dB; see benchmarks/image_throughput.py).
    Returns a C-contiguous HxWx3 array.
    """
    h, w = rgb.shape[:2]
    if (w, h) == (resized_w, resized_h):
        return rgb
    import torch  # imported where pixels are resized: the orchestrating process never needs it
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)
    # F.interpolate returns this kernel's result channels-first, and turning that back into
    # interleaved HxWx3 costs as much as a third of the resize. Writing into a channels-last
    # `out` gives the same values (tested) with no transpose on either side.
    out = torch.empty((1, resized_h, resized_w, 3), dtype=torch.uint8)
    try:
        torch.ops.aten._upsample_bicubic2d_aa.out(
            x, [resized_h, resized_w], False, None, None, out=out.permute(0, 3, 1, 2)
        )
    except (AttributeError, RuntimeError):  # a torch without this overload: the public call
        y = F.interpolate(x, size=(resized_h, resized_w), mode="bicubic", antialias=True, align_corners=False)
        return y.squeeze(0).permute(1, 2, 0).contiguous().numpy()
    return out.squeeze(0).numpy()


def resize_cover_float(rgb: np.ndarray, resized_w: int, resized_h: int) -> np.ndarray:
    """The float32 reference of resize_cover: interpolate on a float tensor, rounded to uint8."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).float()
    y = F.interpolate(x, size=(resized_h, resized_w), mode="bicubic", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).squeeze(0).permute(1, 2, 0).contiguous().numpy()


def crop(rgb: np.ndarray, left: int, top: int, width: int, height: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if left < 0 or top < 0 or left + width > w or top + height > h:
        raise ValueError(f"crop box ({left},{top},{width}x{height}) outside {w}x{h}")
    return rgb[top : top + height, left : left + width]


def subsampling_for(policy: str, scale: float, threshold: float) -> int:
    """Pillow's subsampling code for a policy.

    adaptive_scale: an image downscaled by `scale < threshold` has chroma detail that 4:2:0
    would throw away, so it is encoded 4:4:4; an image kept near its source size (scale >=
    threshold) mostly carries the source's already-subsampled chroma, so 4:2:0 saves bytes
    at no visible cost.
    """
    if policy == "adaptive_scale":
        return SUBSAMPLING["4:4:4"] if scale < threshold else SUBSAMPLING["4:2:0"]
    return SUBSAMPLING[policy]


_SIMPLEJPEG_SUB = {0: "444", 1: "422", 2: "420"}


def encode_jpeg(rgb: np.ndarray, quality: int, subsampling: int) -> bytes:
    """Baseline JPEG, no metadata, libjpeg-turbo (simplejpeg) straight from the array."""
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(rgb), quality=quality, colorspace="RGB", colorsubsampling=_SIMPLEJPEG_SUB[subsampling]
    )


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"
