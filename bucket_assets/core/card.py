"""The export's README.md, shaped like the seed card (laion_aesthetics_512_bucketed_card)."""

from __future__ import annotations

CORNER_NAMES = "0=TL, 1=TR, 2=BL, 3=BR"


def _n(v: int) -> str:
    return f"{v:,}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _short(h: str | None) -> str:
    return f"{h[:12]}…" if h else ""


def render_card(m: dict, pictures: bool = False) -> str:
    """The card for manifest `m`; `pictures`: link the chart and contact sheets (core.pictures)
    written next to it."""
    buckets = m["buckets"]
    summary = m["summary"]
    n_shards = sum(len(b["shards"]) for b in buckets.values())
    samples = summary.get("samples_exported", sum(b["count"] for b in buckets.values()))
    multi = len(m["base_resolutions"]) > 1
    pre = m["preprocessing"]
    ids = sorted(buckets)
    preview = ", ".join(f"`{i}`" for i in ids[:20]) + (f", … (+{len(ids) - 20} more)" if len(ids) > 20 else "")
    dist = sorted(buckets.items(), key=lambda kv: (-kv[1]["count"], kv[0]))
    dist_rows = [
        [bid, f"{b['scaled']['w']}×{b['scaled']['h']}", f"{b['scaled']['w'] / b['scaled']['h']:.3f}", _n(b["count"])]
        for bid, b in dist
    ]
    src_rows = [
        [
            str(s["caption_source_id"]),
            s["name"],
            s["variant"],
            s["backend"],
            s["model"],
            str(s["created_at"]),
            _short(s.get("system_prompt_sha256")),
            _short(s.get("user_prompt_sha256")),
        ]
        for s in m["caption_sources"]
    ]
    sel_rows = [
        [str(s["selector_index"]), s["variant"], s["backend"] or "", s["model"] or "", _n(s["planned_images"])]
        for s in m["caption_selectors"]
    ]
    selected = {s["variant"] for s in m["caption_selectors"]}
    var_rows = [
        ["✓" if v in selected else "", v, _n(c)] for v, c in list(m["caption_variants"].items())[:30]
    ]
    models = [s for s in m["caption_selectors"] if s["model"]]
    model_list = "\n".join(f"{i + 1}. `{s['model']}` (`{s['variant']}`)" for i, s in enumerate(models))
    summary_lines = "\n".join(
        f"- {k}: {_n(v)}" for k, v in summary.items() if isinstance(v, int)
    )
    tar_skips = summary.get("tar_members_skipped") or {}
    if tar_skips:
        summary_lines += "\n- source members skipped (not samples): " + ", ".join(
            f"{k} {_n(v)}" for k, v in tar_skips.items()
        )
    flags = summary.get("flags") or {}
    if flags:
        summary_lines += "\n- repaired or ignored values (records kept): " + ", ".join(
            f"{k} {_n(v)}" for k, v in flags.items()
        )
    dct_note = (
        "\n- Approximate mode (`dct_downscale=true`): JPEG sources were decoded at a reduced DCT scale "
        "(never below twice the resized size) before the resize"
        if pre.get("dct_downscale")
        else ""
    )
    title = f"{m['name']} bucketed {'/'.join(str(b) for b in m['base_resolutions'])}"
    mode_note = (
        "If `image_mode=passthrough_jpeg`, the exporter stores the source file bytes as-is (no EXIF transpose / "
        "resize / crop / re-encode). Bucket target metadata still refers to the planned target size for that "
        "bucket (not necessarily the encoded JPEG dimensions). Loaders should decode the JPEG bytes, apply EXIF "
        "orientation if desired, then do resize/crop at load time. Non-JPEG sources are skipped "
        "(`skipped_passthrough_not_jpeg`)."
    )
    return f"""---
pretty_name: "{title}"
license: other
task_categories:
- text-to-image
language:
- en
tags:
- webdataset
- images
- captions
- bucketed-shards
---
# {title}

This is a captioned bucketed-shards export of the `{m['name']}` dataset.
Images were filtered and resized/cropped into SDXL-style aspect-ratio buckets at base resolution(s) `{m['base_resolutions']}`, without upsampling. The export contains `{_n(samples)}` samples ({_n(summary['images_exported'])} images) across `{_n(n_shards)}` uncompressed WebDataset-style tar shards.

Captions were selected per image from these sources in priority order:
{model_list or '(no model-generated caption sources; captions come from the input sources)'}

Each sample's `.json` metadata records `caption_variant`, `caption_selector_index`, and `caption_source_id`. `manifest.json` records the caption source table and prompt hashes.

## Format
- **Format**: `{m['format']}`
- **Created**: `{m['created']}`
- **Export ID**: `{m['export_id']}`
- **Manifest**: `manifest.json`
- **Image mode**: `{m['image_mode']}`

Directory layout:
- `manifest.json` (global metadata + per-bucket shard listing)
- `buckets/<bucket_id>/shard-*.tar`

Each TAR shard contains 3 files per sample:
- `<key>.jpg` (JPEG bytes; either re-encoded RGB JPEG or source JPEG passthrough depending on `image_mode`)
- `<key>.txt` (caption text, UTF-8, newline-terminated)
- `<key>.json` (per-sample metadata: `image_id`, `source`, `src_w`, `src_h`, `target_w`, `target_h`, `bucket_id`, `caption_variant`, `caption_selector_index`, `caption_source_id`, `url`, `similarity`, `nsfw`, `license`; null where unknown)

## Image preprocessing
If `image_mode=reencode_jpeg`, images are processed deterministically per-sample:
- EXIF transpose, convert to RGB (alpha composited on white, 16-bit greys scaled to 8 bit, ICC profiles converted to sRGB)
- **Cover-resize** using **torch CPU** bicubic interpolation with antialiasing (`mode=bicubic`, `antialias=True`)
- **Never upsample**: samples that would require upscaling are skipped (`too_small_policy={pre['too_small_policy']}`)
- Crop to the bucket target size (`crop_strategy={pre['crop_strategy']}`, allowed corners `{pre['allowed_corners']}`){dct_note}

Resize/crop details:
- Cover scale is `scale = max(target_w / src_w, target_h / src_h)`; if `scale > 1`, the sample is skipped.
- Each resized side is `round(src * scale)`, never below the target side.
- After resize, a crop box is chosen deterministically from the sample key (sha256 of `image_id`).
- Corner strategy chooses a corner from `allowed_corners` where `{CORNER_NAMES}` (optional small jitter for `corner_jitter`, here `{pre['corner_jitter']}`).

JPEG encoding:
- quality `{pre['jpeg_quality']}`
- subsampling policy `{pre['jpeg_subsampling']}` (adaptive threshold `{pre['adaptive_threshold']}`: 4:4:4 when `scale < threshold`, else 4:2:0)

{mode_note}

## Buckets / resolutions
- Buckets follow **SDXL-style proto buckets** defined at a 1024×1024 base.
- Base resolution(s): `{m['base_resolutions']}`
- {'In multi-res exports, buckets are namespaced by base resolution: `r<base>_<proto>`, e.g. `r512_p1024x1024`.' if multi else 'In single-res exports, `bucket_id` is the **proto** (1024-base) bucket, e.g. `p1024x1024`.'}
- The **actual target resolution** for each bucket (proto × base / 1024, rounded half-up to a multiple of `divisible={m['divisible']}`) is stored in:
- `manifest.json` → `buckets[<bucket_id>].scaled.w/h` (and `base_resolution`)
- each sample's `<key>.json` → `target_w` / `target_h`
- Each image goes to the bucket whose aspect ratio is nearest in log space (`|ln(w/h) - ln(tw/th)|`), once per base resolution.

Bucket IDs (preview): {preview}

Bucket distribution:
{_table(['bucket_id', 'target_w×h', 'aspect', 'count'], dist_rows)}
{_pictures(m) if pictures else ''}
## Caption selection (waterfall)
Captions are selected from the caption table (`metadata.duckdb` in the build's work directory) using the first matching selector (highest priority wins).
Within the same selector, the newest caption source is preferred.

Caption provenance:
- Per-sample `<key>.json` includes `caption_source_id` (int).
- `manifest.json` includes a `caption_sources` table mapping `caption_source_id` → backend/model/created_at plus prompt hashes (not prompt text).

Caption sources used:
{_table(['caption_source_id', 'name', 'variant', 'backend', 'model', 'created_at', 'system_prompt_sha256', 'user_prompt_sha256'], src_rows)}

Caption priority (waterfall) + planned usage:
{_table(['selector_index', 'variant', 'backend', 'model', 'planned_images'], sel_rows)}

Available caption variants (top 30):
{_table(['selected', 'variant', 'images_with_ok_caption'], var_rows)}

Missing caption policy: `{m['missing_caption_policy']}`

## Export summary
{summary_lines}

## Efficient loading
### Recommended
Treat this as a **webdataset-style** collection of tar shards:
- Prefer **sequential reads** of tar files for throughput.
- Shuffle at the **shard level** (and optionally within-shard) for good randomness without expensive random I/O.
- Use `manifest.json` to list buckets and shards.

#### Python (`webdataset`)
```python
import glob
import webdataset as wds

urls = sorted(glob.glob("buckets/*/shard-*.tar"))  # or one bucket: "buckets/<bucket_id>/shard-*.tar"
ds = (
    wds.WebDataset(urls, shardshuffle=False)
    .decode("pil")  # decodes .jpg to PIL.Image
    .to_tuple("jpg", "txt", "json")
)
for jpg, caption, meta in ds:
    ...
```

#### Python (`tarfile`, no extra deps)
```python
import io, json, tarfile
from pathlib import Path

tar_path = next(Path("buckets").rglob("shard-*.tar"))
with tarfile.open(tar_path, "r") as tf:
    members = tf.getmembers()
    for m in members:
        if not m.name.endswith(".txt"):
            continue
        key = m.name[:-4]
        caption = tf.extractfile(m).read().decode("utf-8").strip()
        meta = json.loads(tf.extractfile(tf.getmember(key + ".json")).read().decode("utf-8"))
        jpg_bytes = tf.extractfile(tf.getmember(key + ".jpg")).read()
        ...
```
"""


def extract_snippets(card: str) -> list[str]:
    """The fenced python blocks of a card, for tests that run them."""
    out, cur, inside = [], [], False
    for line in card.splitlines():
        if line.strip() == "```python":
            inside, cur = True, []
        elif line.strip() == "```" and inside:
            inside = False
            out.append("\n".join(cur))
        elif inside:
            cur.append(line)
    return out


def _pictures(m: dict) -> str:
    from bucket_assets.core.pictures import CHART_NAME, sheet_path

    buckets = sorted(m["buckets"].items(), key=lambda kv: (-kv[1]["count"], kv[0]))
    sheets = "\n".join(
        f"- `{bid}` ({b['scaled']['w']}×{b['scaled']['h']}, {_n(b['count'])} samples): "
        f"![{bid}]({sheet_path(bid)})"
        for bid, b in buckets
    )
    return f"""
![Samples per bucket]({CHART_NAME})

### What is inside
A contact sheet per bucket (largest first): the first samples of its first shard, with the first
words of their captions.

{sheets}
"""
