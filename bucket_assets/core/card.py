"""The export's README.md, shaped like the seed card (laion_aesthetics_512_bucketed_card)."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

CORNER_NAMES = "0=TL, 1=TR, 2=BL, 3=BR"

# Every value below that comes from the manifest (spec name, bucket ids, caption source fields,
# summary keys...) is escaped for where it lands: _text for table cells, list items and the
# heading, _code for inline code, _yaml for the front matter, quote() for link targets.
# Line breaks and other control characters (a tab is kept).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
# HTML, table pipes, links/images, code spans, backslash escapes and emphasis (an underscore only
# at a word's edge: intraword ones never emphasise), as entities that render literally.
_TEXT_SPECIAL = re.compile(r'[&<>"|\\\[\]`*~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])')
_ENTITY = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
# A block marker (heading, quote, list item) at the start of a list item's content.
_BLOCK_START = re.compile(r"^[#>+*=-]|^\d+(?=[.)](\s|$))")
_CODE_UNSAFE = re.compile(r"[&<>\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


def _str(v) -> str:
    s = "" if v is None else str(v)
    return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # lone surrogates -> U+FFFD


def _text(v) -> str:
    """A value as one line of inline markdown that cannot open HTML, a link, a code span or a new
    table cell."""
    return _TEXT_SPECIAL.sub(lambda m: _ENTITY.get(m.group(), f"&#{ord(m.group())};"), _CONTROL.sub(" ", _str(v)))


def _item(v) -> str:
    """_text for the start of a list item, where a leading `#`, `>`, `-` or `1.` would nest a block."""
    return _BLOCK_START.sub(lambda m: "".join(f"&#{ord(c)};" for c in m.group()), _text(v))


def _code(v) -> str:
    """A value as inline code. Code spans show their content raw (no entities), so a value with
    HTML or line breaks becomes <code> with escaped text; backticks get a longer fence."""
    s = _str(v)
    if _CODE_UNSAFE.search(s):
        return f"<code>{_text(s)}</code>"
    if "`" not in s:
        return f"`{s}`"
    fence = "`" * (max(map(len, re.findall(r"`+", s))) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _yaml(s: str) -> str:
    """A YAML double-quoted scalar (JSON's escapes are YAML's), with nothing HTML-like left raw."""
    return re.sub(r"[<>&\x7f-\x9f\u2028\u2029\ufeff]", lambda m: f"\\u{ord(m.group()):04x}",
                  json.dumps(_str(s), ensure_ascii=False))


def _n(v) -> str:
    return f"{v:,}" if isinstance(v, (int, float)) and not isinstance(v, bool) else _str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_text(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _short(h: str | None) -> str:
    return f"{_str(h)[:12]}…" if h else ""


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
    preview = ", ".join(_code(i) for i in ids[:20]) + (f", … (+{len(ids) - 20} more)" if len(ids) > 20 else "")
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
    def _models(sel: dict) -> str:
        # Every source of the variant (two input sources may share one, e.g. alt_text), else the newest's.
        names = list(dict.fromkeys(c["model"] for c in m["caption_sources"] if c["variant"] == sel["variant"] and c["model"]))
        return ", ".join(_code(n) for n in names) if names else _code(sel["model"])

    model_list = "\n".join(f"{i + 1}. {_models(s)} ({_code(s['variant'])})" for i, s in enumerate(models))
    summary_lines = "\n".join(
        f"- {_item(k)}: {_n(v)}" for k, v in summary.items() if isinstance(v, int)
    )
    tar_skips = summary.get("tar_members_skipped") or {}
    if tar_skips:
        summary_lines += "\n- source members skipped (not samples): " + ", ".join(
            f"{_text(k)} {_text(_n(v))}" for k, v in tar_skips.items()
        )
    file_skips = summary.get("source_files_skipped") or {}
    if file_skips:
        summary_lines += "\n- source files that could not be read (see the build log): " + ", ".join(
            f"{_text(k)} {_text(_n(v))}" for k, v in file_skips.items()
        )
    used = summary.get("caption_sources_used") or []
    if used:
        summary_lines += "\n- samples per caption source: " + ", ".join(
            (f"{_text(u['name'])} ({_text(u['variant'])}) {_text(_n(u['samples']))}" if u.get("name") is not None
             else f"no caption (empty text) {_text(_n(u['samples']))}")
            for u in used
        )
    flags = summary.get("flags") or {}
    if flags:
        summary_lines += "\n- repaired or ignored values (records kept): " + ", ".join(
            f"{_text(k)} {_text(_n(v))}" for k, v in flags.items()
        )
    dct_note = (
        "\n- Approximate mode (`dct_downscale=true`): JPEG sources were decoded at a reduced DCT scale "
        "(never below twice the resized size) before the resize"
        if pre.get("dct_downscale")
        else ""
    )
    warnings = m.get("warnings") or []
    warning_block = (
        "\n> **Warnings from the build that made this export:**\n"
        + "\n".join(f"> - {_text(w)}" for w in warnings) + "\n\n"
        if warnings else ""
    )
    rejected = m.get("caption_sources_rejected") or []
    rejected_block = (
        "\nCaption sources rejected (not used):\n"
        + _table(["name", "reason"], [[r["name"], r["reason"]] for r in rejected]) + "\n"
        if rejected else ""
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
pretty_name: {_yaml(title)}
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
# {_text(title)}

This is a captioned bucketed-shards export of the {_code(m['name'])} dataset.
{warning_block}Images were filtered and resized/cropped into SDXL-style aspect-ratio buckets at base resolution(s) {_code(m['base_resolutions'])}, without upsampling. The export contains {_code(_n(samples))} samples ({_text(_n(summary['images_exported']))} images) across {_code(_n(n_shards))} uncompressed WebDataset-style tar shards.

Captions were selected per image from these sources in priority order:
{model_list or '(no model-generated caption sources; captions come from the input sources)'}

Each sample's `.json` metadata records `caption_variant`, `caption_selector_index`, and `caption_source_id`. `manifest.json` records the caption source table and prompt hashes.

## Format
- **Format**: {_code(m['format'])}
- **Created**: {_code(m['created'])}
- **Export ID**: {_code(m['export_id'])}
- **Manifest**: `manifest.json`
- **Image mode**: {_code(m['image_mode'])}

Directory layout:
- `manifest.json` (global metadata + per-bucket shard listing)
- `buckets/<bucket_id>/shard-*.tar`

Each TAR shard contains 3 files per sample:
- `<key>.jpg` (JPEG bytes; either re-encoded RGB JPEG or source JPEG passthrough depending on `image_mode`)
- `<key>.txt` (caption text, UTF-8, newline-terminated)
- `<key>.json` (per-sample metadata: `image_id`, `source`, `src_w`, `src_h`, `target_w`, `target_h`, `bucket_id`, `caption_variant`, `caption_selector_index`, `caption_source_id`, `url`, `similarity`, `nsfw`, `license`, `source_meta` (the source's own record: the tar's `.json` and img2dataset parquet row, the parquet row, the imagefolder metadata row); null where unknown)

## Image preprocessing
If `image_mode=reencode_jpeg`, images are processed deterministically per-sample:
- EXIF transpose, convert to RGB (alpha composited on white, 16-bit greys scaled to 8 bit, ICC profiles converted to sRGB)
- **Cover-resize** using **torch CPU** bicubic interpolation with antialiasing (`mode=bicubic`, `antialias=True`)
- **Never upsample**: samples that would require upscaling are skipped ({_code(f"too_small_policy={pre['too_small_policy']}")})
- Crop to the bucket target size ({_code(f"crop_strategy={pre['crop_strategy']}")}, allowed corners {_code(pre['allowed_corners'])}){dct_note}

Resize/crop details:
- Cover scale is `scale = max(target_w / src_w, target_h / src_h)`; if `scale > 1`, the sample is skipped.
- Each resized side is `round(src * scale)`, never below the target side.
- After resize, a crop box is chosen deterministically from the sample key (sha256 of `image_id`).
- Corner strategy chooses a corner from `allowed_corners` where `{CORNER_NAMES}` (optional small jitter for `corner_jitter`, here {_code(pre['corner_jitter'])}).

JPEG encoding:
- quality {_code(pre['jpeg_quality'])}
- subsampling policy {_code(pre['jpeg_subsampling'])} (adaptive threshold {_code(pre['adaptive_threshold'])}: 4:4:4 when `scale < threshold`, else 4:2:0)

{mode_note}

## Buckets / resolutions
- Buckets follow **SDXL-style proto buckets** defined at a 1024×1024 base.
- Base resolution(s): {_code(m['base_resolutions'])}
- {'In multi-res exports, buckets are namespaced by base resolution: `r<base>_<proto>`, e.g. `r512_p1024x1024`.' if multi else 'In single-res exports, `bucket_id` is the **proto** (1024-base) bucket, e.g. `p1024x1024`.'}
- The **actual target resolution** for each bucket (proto × base / 1024, rounded half-up to a multiple of {_code(f"divisible={m['divisible']}")}) is stored in:
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
{rejected_block}
Missing caption policy: {_code(m['missing_caption_policy'])}

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
        f"- {_code(bid)} ({_text(b['scaled']['w'])}×{_text(b['scaled']['h'])}, {_text(_n(b['count']))} samples): "
        f"![{_text(bid)}]({quote(sheet_path(bid))})"
        for bid, b in buckets
    )
    return f"""
![Samples per bucket]({CHART_NAME})

### What is inside
A contact sheet per bucket (largest first): the first samples of its first shard, with the first
words of their captions.

{sheets}
"""
