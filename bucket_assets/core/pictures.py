"""Pictures of an export for people: the bucket distribution chart and per-bucket contact sheets.

Both are deterministic PNGs (no timestamps or software tags), so an unchanged export keeps
byte-identical pictures.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image, ImageDraw, ImageFont

from bucket_assets.core.atomic import atomic_write_bytes, atomic_write_text, remove_stale_temps
from bucket_assets.core.publish import BUCKET_DIR_RE, file_identity
from bucket_assets.core.shards import read_shard

CHART_NAME = "bucket_distribution.png"
SHEETS_DIR = "contact_sheets"


def _keep_matplotlib_out_of_home() -> None:
    """matplotlib keeps its font cache in $MPLCONFIGDIR, else under $HOME (~/.cache/matplotlib).
    Unless the user chose a dir, point it at a private one under the system temp dir (reused by
    later builds, so the cache is built once): a build writes only to its work and output dirs.
    Effective only before matplotlib is first imported (it reads the variable then)."""
    if os.environ.get("MPLCONFIGDIR") or "matplotlib" in sys.modules:
        return
    uid = os.getuid()
    d = os.path.join(tempfile.gettempdir(), f"bucket_assets-mpl-{uid}")
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError:
        d = None
    if d is not None:
        # The temp dir is shared: trust only a real dir of ours that nobody else can write.
        st = os.lstat(d)
        if not (stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o022):
            d = None
    if d is None:
        import atexit
        import shutil

        d = tempfile.mkdtemp(prefix=f"bucket_assets-mpl-{uid}-")
        atexit.register(shutil.rmtree, d, True)
    os.environ["MPLCONFIGDIR"] = d


def bucket_chart_png(manifest: dict) -> bytes:
    """Samples per bucket, buckets ordered by aspect ratio (tall to wide), as a bar chart."""
    _keep_matplotlib_out_of_home()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    buckets = sorted(manifest["buckets"].items(), key=lambda kv: (kv[1]["aspect"], kv[0]))
    labels = [f"{b['scaled']['w']}×{b['scaled']['h']}" for _, b in buckets]
    counts = [b["count"] for _, b in buckets]
    fig = Figure(figsize=(max(6.0, 0.32 * len(buckets) + 2), 4.2), dpi=100)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(buckets)), counts, color="#4f6bd8")
    ax.set_xticks(range(len(buckets)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("samples")
    ax.set_title(f"{manifest['name']}: samples per bucket (target size; tall → wide)", fontsize=10)
    ax.bar_label(bars, fontsize=7)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def first_samples(shard_paths: Iterable[str | os.PathLike], n: int) -> list[tuple[bytes, str]]:
    """(jpg bytes, caption) of the first `n` samples in shard order."""
    out: list[tuple[bytes, str]] = []
    for path in shard_paths:
        for _key, parts in read_shard(path):
            out.append((parts["jpg"], parts["txt"].decode("utf-8", errors="replace").strip()))
            if len(out) >= n:
                return out
    return out


def _first_words(text: str, width_px: int, font) -> str:
    words, line = text.split(), ""
    for w in words:
        cand = f"{line} {w}".strip()
        if font.getlength(cand + "…") > width_px:
            return (line + "…") if line else w[: max(1, len(w) // 2)] + "…"
        line = cand
    return line or "(no caption)"


def contact_sheet_png(samples: list[tuple[bytes, str]], title: str, tile: int = 200, cols: int = 4) -> bytes:
    """A grid of thumbnails (aspect kept, `tile` px on the long side), each with its caption's
    first words underneath, and a title line."""
    font = ImageFont.load_default(size=12)
    title_font = ImageFont.load_default(size=15)
    rows = max(1, (len(samples) + cols - 1) // cols)
    pad, text_h, head = 8, 18, 30
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, head + rows * (tile + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 7), title, fill="black", font=title_font)
    for i, (jpg, caption) in enumerate(samples):
        with Image.open(io.BytesIO(jpg)) as im:
            im = im.convert("RGB")
            im.thumbnail((tile, tile), Image.Resampling.LANCZOS)
            x = pad + (i % cols) * (tile + pad)
            y = head + (i // cols) * (tile + text_h + pad)
            sheet.paste(im, (x + (tile - im.width) // 2, y + (tile - im.height) // 2))
        draw.text((x, y + tile + 2), _first_words(caption, tile, font), fill="#333333", font=font)
    buf = io.BytesIO()
    sheet.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def sheet_path(bucket_id: str) -> str:
    return str(Path(SHEETS_DIR) / f"{bucket_id}.png")


# Bump when the chart or a contact sheet is drawn differently from the same inputs: every
# picture recorded in the pictures state is then drawn again.
PICTURES_VERSION = 1
PICTURES_STATE = "card_pictures.json"


def _picture_key(*parts) -> str:
    return hashlib.sha256(json.dumps([PICTURES_VERSION, *parts], sort_keys=True).encode()).hexdigest()


def write_pictures(out: Path, manifest: dict, per_bucket: int = 8, state_path: Path | None = None) -> int:
    """The chart and one contact sheet per bucket next to the card; unchanged files are left
    alone and sheets of buckets no longer exported removed. Returns files written.

    With `state_path` (a JSON file in the work dir), each picture's inputs are recorded with
    the identity (size, mtime_ns, inode) of the file written: a picture whose inputs (the chart:
    the manifest's content; a sheet: its title and its bucket's shard paths and sha256) and file
    are those recorded is not drawn again, so a no-op build opens no shard and skips matplotlib.
    A missing or unreadable state just means every picture is drawn and compared."""
    written = 0
    old: dict = {}
    if state_path is not None:
        try:
            old = json.loads(state_path.read_text(encoding="utf-8"))
            old = old if isinstance(old, dict) and old.get("version") == PICTURES_VERSION else {}
        except (OSError, ValueError):
            old = {}
    new: dict[str, dict] = {}

    def put(path: Path, key: str, draw: Callable[[], bytes]) -> None:
        nonlocal written
        rel = str(path.relative_to(out))
        prev = (old.get("files") or {}).get(rel)
        ident = file_identity(path)
        if not (isinstance(prev, dict) and prev.get("key") == key and ident is not None
                and list(ident) == prev.get("ident")):
            data = draw()
            if not path.is_file() or path.read_bytes() != data:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
                written += 1
            ident = file_identity(path)
        new[rel] = {"key": key, "ident": list(ident) if ident is not None else None}

    chart_input = {k: v for k, v in manifest.items() if k != "created"}
    put(out / CHART_NAME, _picture_key("chart", chart_input), lambda: bucket_chart_png(manifest))
    keep = set()
    for bucket_id, b in manifest["buckets"].items():
        shards = [(sh["path"], sh["sha256"]) for sh in b["shards"]]
        title = f"{bucket_id}: {b['scaled']['w']}x{b['scaled']['h']}, {b['count']} samples"
        keep.add(out / sheet_path(bucket_id))
        put(out / sheet_path(bucket_id), _picture_key("sheet", title, per_bucket, shards),
            lambda shards=shards, title=title: contact_sheet_png(
                first_samples([out / rel for rel, _ in shards], per_bucket), title))
    sheets = out / SHEETS_DIR
    if sheets.is_dir():
        remove_stale_temps(sheets)
        for p in sheets.iterdir():
            # Only sheets of our own naming: any other file there is the user's.
            if p not in keep and p.suffix == ".png" and BUCKET_DIR_RE.match(p.stem) and p.is_file():
                p.unlink()
    if state_path is not None and new != old.get("files"):
        state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state_path, json.dumps({"version": PICTURES_VERSION, "files": new}, sort_keys=True))
    return written
