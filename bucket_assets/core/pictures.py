"""Pictures of an export for people: the bucket distribution chart and per-bucket contact sheets.

Both are deterministic PNGs (no timestamps or software tags), so an unchanged export keeps
byte-identical pictures.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageDraw, ImageFont

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
