"""The sample dataset: real photographs shipped in scikit-image's wheel, cut to varied sizes and
aspect ratios, written in four input formats (LAION-style tars, photo-concept-bucket parquet + folder, a plain
folder, Hugging Face Hub parquet with the image bytes inside) plus two caption sources.

Deterministic: the same call writes the same bytes. It includes hostile cases (a truncated JPEG,
an image too small for any bucket, CMYK, an EXIF-rotated JPEG, RGBA / palette / 16-bit PNGs, a
blank image, a duplicate, NSFW- and low-similarity-tagged records, a missing file).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bucket_assets.core.atomic import atomic_write_bytes

# name -> short description used in captions
PHOTOS = {
    "retina.jpg": "a retinal fundus photograph with branching red blood vessels",
    "hubble_deep_field.jpg": "a deep-space telescope image full of distant galaxies",
    "motorcycle_left.png": "a motorcycle parked in a cluttered workshop",
    "motorcycle_right.png": "a motorcycle in a workshop seen from a second camera",
    "astronaut.png": "an astronaut in a white space suit in front of a flag",
    "coffee.png": "a cup of coffee on a saucer with a spoon",
    "rocket.jpg": "a rocket standing on a launch pad under a blue sky",
    "chelsea.png": "a tabby cat looking to the side",
    "ihc.png": "a stained tissue sample under a microscope",
}
SELECTORS = ["caption_gemini_2_flash_lite", "caption_mistral_medium_3_1", "cogvlm", "alt_text", "sidecar"]

def _photo_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def load_photos() -> dict[str, Image.Image]:
    d = _photo_dir()
    out = {}
    for name in PHOTOS:
        with Image.open(d / name) as im:
            out[name] = im.convert("RGB")
    return out


def _cut(rng: np.random.RandomState, img: Image.Image, aspect: float, min_size: tuple[int, int] = (0, 0)) -> Image.Image:
    """A crop of `img` at `aspect`, as large as fits, then scaled down at random but never below
    `min_size` (so it still fills the bucket it will land in)."""
    w, h = img.size
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    cw, ch = min(cw, w), min(ch, h)
    left = rng.randint(0, w - cw + 1)
    top = rng.randint(0, h - ch + 1)
    out = img.crop((left, top, left + cw, top + ch))
    floor = min(1.0, max(min_size[0] / cw, min_size[1] / ch, 0.3))
    f = float(rng.uniform(floor, 1.0))
    if f < 1.0:
        size = (max(min_size[0], 1, round(cw * f)), max(min_size[1], 1, round(ch * f)))
        out = out.resize(size, Image.LANCZOS)
    return out


def _fit(rng: np.random.RandomState, photos: dict, aspect: float) -> Image.Image:
    """A cut from the largest photo, sized to fill its 512-base bucket."""
    from bucket_assets.core.buckets import bucket_table, nearest_bucket

    b = nearest_bucket(round(1000 * aspect), 1000, bucket_table([512], 32))
    # Slightly above the target so the cover-resize has work to do.
    need = (b.w + 8, b.h + 8)
    candidates = [n for n in BIG if photos[n].width >= need[0] and photos[n].height >= need[1]]
    name = candidates[rng.randint(0, len(candidates))]
    return name, _cut(rng, photos[name], aspect, need)


def _jpeg(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _exif_rotated(img: Image.Image) -> bytes:
    """Stored rotated, with EXIF orientation 6 telling viewers to rotate it back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(img.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
            tf.addfile(ti, io.BytesIO(data))
    atomic_write_bytes(path, buf.getvalue())


ASPECTS = [1.0, 1.46, 0.68, 1.33, 0.75, 1.78, 0.56, 2.0, 0.5, 1.2, 0.83, 2.5, 0.4, 3.0, 1.0, 1.5, 0.36, 1.1]
BIG = ["retina.jpg", "hubble_deep_field.jpg", "motorcycle_left.png", "motorcycle_right.png"]


def generate(root: str | Path = "data", seed: int = 0) -> dict[str, int]:
    """Write raw sources under root/raw and caption sources under root/captions (data/spec.yaml reads them)."""
    root = Path(root)
    rng = np.random.RandomState(seed)
    photos = load_photos()
    counts = {}
    all_ids: list[tuple[str, str]] = []  # (image_id, photo name)

    # LAION-style tar shards -------------------------------------------------------------
    laion = root / "raw" / "laion"
    shard_members: list[list[tuple[str, bytes]]] = [[], []]
    first_jpeg = None
    for i in range(24):
        key = f"{i:09d}"
        photo, img = _fit(rng, photos, ASPECTS[i % len(ASPECTS)])
        nsfw, sim = "UNLIKELY", round(float(rng.uniform(0.31, 0.45)), 4)
        if i == 3:
            data = _jpeg(img)[:6000]  # truncated download
        elif i == 5:
            photo = "chelsea.png"
            data = _jpeg(photos[photo])  # 451x300: too small for every 512-base bucket
        elif i == 6:
            photo = "astronaut.png"
            data = _png(photos[photo])  # exactly 512x512: fills p1024x1024 with no resize
        elif i == 7:
            data = _jpeg(img.convert("CMYK"))
        elif i == 9:
            data = _exif_rotated(img)
        elif i == 11:
            data = _jpeg(Image.new("RGB", (800, 600), (128, 128, 128)))  # blank placeholder
        elif i == 13:
            data, nsfw = _jpeg(img), "NSFW"
        elif i == 15:
            data, sim = _jpeg(img), 0.21
        elif i == 17 and first_jpeg is not None:
            data = first_jpeg  # the same bytes as sample 0
        else:
            data = _jpeg(img)
        if i == 0:
            first_jpeg = data
        caption = f"{PHOTOS[photo].capitalize()} - stock photo {i}"
        meta = {
            "url": f"https://example.com/images/{key}.jpg",
            "caption": caption,
            "key": key,
            "status": "success",
            "similarity": sim,
            "NSFW": nsfw,
            "LICENSE": "?" if i % 2 else "creativecommons.org/licenses/by/4.0",
            "original_width": img.width,
            "original_height": img.height,
        }
        shard_members[i // 12] += [
            (f"{key}.jpg", data),
            (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]
        all_ids.append((key, photo))
    for s, members in enumerate(shard_members):
        _tar(laion / f"{s:05d}.tar", members)
    counts["laion"] = 24

    # photo-concept-bucket style parquet + folder ----------------------------------------------
    pcb = root / "raw" / "pcb"
    rows = {"id": [], "cogvlm_caption": [], "tags": [], "width": [], "height": [], "url": []}
    for i in range(16):
        pid = 5000 + i
        photo, img = _fit(rng, photos, ASPECTS[(i + 5) % len(ASPECTS)])
        if i == 2:
            ext, data = "png", _png(img.convert("RGBA"))
        elif i == 4:
            ext, data = "png", _png(img.convert("L"))
        elif i == 6:
            buf = io.BytesIO()
            img.save(buf, "WEBP", quality=90)
            ext, data = "webp", buf.getvalue()
        else:
            ext, data = "jpg", _jpeg(img)
        if i != 10:  # id 5010 has no image file
            atomic_write_bytes(pcb / "train" / f"{pid}.{ext}", data)
        rows["id"].append(pid)
        rows["cogvlm_caption"].append(None if i in (1, 8) else ("" if i == 12 else f"The image shows {PHOTOS[photo]}."))
        rows["tags"].append(", ".join(PHOTOS[photo].split()[1:4]))
        rows["width"].append(img.width)
        rows["height"].append(img.height)
        rows["url"].append(f"https://images.example.org/photos/{pid}/")
        all_ids.append((str(pid), photo))
    table = pa.table(rows, schema=pa.schema([("id", pa.int64()), ("cogvlm_caption", pa.string()), ("tags", pa.string()),
                                             ("width", pa.int32()), ("height", pa.int32()), ("url", pa.string())]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(pcb / "photo-concept-bucket.parquet", buf.getvalue())
    counts["pcb"] = 16

    # plain folder with sidecar captions ---------------------------------------------------
    folder = root / "raw" / "folder"
    for i in range(6):
        stem = f"folder_img_{i:02d}"
        photo, img = _fit(rng, photos, ASPECTS[(i + 9) % len(ASPECTS)])
        if i == 1:
            arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
            ext, data = "png", _png(Image.fromarray(arr))
        elif i == 2:
            p = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
            p.info["transparency"] = 0
            buf = io.BytesIO()
            p.save(buf, "PNG", transparency=0)
            ext, data = "png", buf.getvalue()
        else:
            ext, data = "jpg", _jpeg(img)
        atomic_write_bytes(folder / f"{stem}.{ext}", data)
        if i != 4:
            atomic_write_bytes(folder / f"{stem}.txt", f"{PHOTOS[photo]}, photo {i}\n".encode())
        all_ids.append((stem, photo))
    counts["folder"] = 6

    # two caption sources in the landing directory ---------------------------------------------
    captions = root / "captions"
    sources = [
        ("gemini_flash_lite_v1", "caption_gemini_2_flash_lite", "google/gemini-2.0-flash-lite-001", 1776589694, 0.8),
        ("mistral_medium_v1", "caption_mistral_medium_3_1", "mistralai/mistral-medium-3.1", 1776684944, 0.6),
    ]
    for name, variant, model, created, coverage in sources:
        ids, texts, statuses = [], [], []
        for image_id, photo in all_ids:
            if rng.uniform() > coverage:
                continue
            ok = rng.uniform() > 0.1
            ids.append(image_id)
            texts.append(f"{PHOTOS[photo].capitalize()}, described by {model.split('/')[1]}." if ok else None)
            statuses.append("ok" if ok else "error")
        buf = io.BytesIO()
        pq.write_table(pa.table({"image_id": ids, "caption": texts, "status": statuses}), buf)
        atomic_write_bytes(captions / f"{name}.parquet", buf.getvalue())
        meta = {
            "variant": variant,
            "backend": "openrouter",
            "model": model,
            "created_at": created,
            "system_prompt_sha256": "503ff8c1ba9c" + "0" * 52,
            "user_prompt_sha256": "6b4b2b1dc90b" + "0" * 52,
        }
        atomic_write_bytes(captions / f"{name}.json", (json.dumps(meta, indent=2) + "\n").encode())
        counts[name] = len(ids)

    # Hugging Face Hub style: the image bytes inside parquet (the `datasets` Image feature's
    # {bytes, path} struct), split over two files. After the caption sources, with its own
    # random stream, so the sources above stay as they were.
    counts["hf"] = _hub_parquet(root / "raw" / "hf" / "data", np.random.RandomState(seed + 1), photos)
    return counts


HF_SCHEMA = pa.schema([("key", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                       ("text", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("aesthetic", pa.float32())])


def _hub_parquet(d: Path, rng: np.random.RandomState, photos: dict, files: int = 2) -> int:
    """Rows train-NNNNN: five photos (one PNG), then one row whose image is null (missing_image)."""
    rows = []
    for i in range(6):
        key = f"hf{i:05d}"
        photo, img = _fit(rng, photos, ASPECTS[(i + 3) % len(ASPECTS)])
        image = None if i == 5 else ({"bytes": _png(img), "path": f"{key}.png"} if i == 2
                                     else {"bytes": _jpeg(img), "path": f"{key}.jpg"})
        rows.append({"key": key, "image": image, "text": f"{PHOTOS[photo].capitalize()}, from the hub",
                     "width": img.width, "height": img.height, "aesthetic": round(float(rng.uniform(4.5, 7.0)), 2)})
    per = -(-len(rows) // files)
    for k in range(files):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows[k * per:(k + 1) * per], schema=HF_SCHEMA), buf, row_group_size=2)
        atomic_write_bytes(d / f"train-{k:05d}-of-{files:05d}.parquet", buf.getvalue())
    return len(rows)
