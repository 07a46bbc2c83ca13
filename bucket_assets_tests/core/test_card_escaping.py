"""The dataset card escapes every value it takes from the manifest (spec name, bucket ids, caption
source name/variant/backend/model, summary keys...): hostile strings cannot inject HTML, links or
table rows, and ordinary values render exactly as before."""

from __future__ import annotations

import html
import re

import pytest
import yaml

from bucket_assets.core.card import render_card

HOSTILE = (
    '</details><script>alert(1)</script> | cell\nrow | `tick` ``two`` [link](javascript:alert(1)) '
    '![img](http://evil/x.png) <img src=x onerror=alert(1)> & "q" \\| # *em* _u_ ~~s~~ \u2028end'
)


def _manifest(s=lambda field, normal: normal, bucket_ids=("p1024x1024", "p768x1344")) -> dict:
    """A manifest shaped like build_manifest's; `s(field, normal)` supplies each input-derived string."""
    buckets = {
        bid: {
            "proto": {"w": 1024, "h": 1024}, "scaled": {"w": 512 + 64 * i, "h": 512}, "base_resolution": 512,
            "aspect": 1.0, "count": 10 - i,
            "shards": [{"path": f"buckets/{bid}/shard-000000.tar", "samples": 10 - i, "bytes": 1, "sha256": "0" * 64}],
        }
        for i, bid in enumerate(bucket_ids)
    }
    variant = s("variant", "caption_llm")
    return {
        "format": s("format", "bucketed_shards_v1"),
        "name": s("name", "laion_aesthetics"),
        "created": s("created", "2024-05-01T12:00:00+00:00"),
        "export_id": s("export_id", "0123456789abcdef"),
        "image_mode": s("image_mode", "reencode_jpeg"),
        "preprocessing": {
            "too_small_policy": s("too_small_policy", "drop"), "crop_strategy": s("crop_strategy", "corner"),
            "allowed_corners": [0, 1, 2, 3], "corner_jitter": 0, "jpeg_quality": 95,
            "jpeg_subsampling": s("jpeg_subsampling", "adaptive_scale"), "adaptive_threshold": 0.5,
            "dct_downscale": False,
        },
        "base_resolutions": [512],
        "divisible": 64,
        "buckets": buckets,
        "caption_sources": [
            {
                "caption_source_id": 1, "name": s("source_name", "gemini_run"), "variant": variant,
                "backend": s("backend", "openrouter"), "model": s("model", "google/gemini-2.0-flash-lite-001"),
                "created_at": s("created_at", "2024-04-30 10:00:00"),
                "system_prompt_sha256": s("system_prompt_sha256", "a" * 64),
                "user_prompt_sha256": s("user_prompt_sha256", "b" * 64),
            }
        ],
        "caption_selectors": [
            {"selector_index": 0, "variant": variant, "backend": s("backend", "openrouter"),
             "model": s("model", "google/gemini-2.0-flash-lite-001"), "planned_images": 19},
            {"selector_index": 1, "variant": s("variant2", "alt_text"), "backend": None, "model": None,
             "planned_images": 1},
        ],
        "caption_variants": {variant: 19, s("variant2", "alt_text"): 20, s("variant3", "caption"): 3},
        "missing_caption_policy": s("missing_caption_policy", "drop"),
        "summary": {
            "images_seen": 25, "images_exported": 20, "samples_exported": 19, s("summary_key", "skipped_too_small"): 5,
            "tar_members_skipped": {s("tar_key", "unsafe_path"): 2},
            "flags": {s("flag_key", "caption_nul_removed"): 1},
        },
        "spec_sha256": "c" * 64,
    }


def _hostile(field, normal):
    return f"{field}:{HOSTILE}"


HOSTILE_IDS = (f"bucket:{HOSTILE}", "p1024x1024")


# Ordinary values ------------------------------------------------------------------------------------


def test_ordinary_values_render_as_before():
    card = render_card(_manifest())
    assert card.startswith('---\npretty_name: "laion_aesthetics bucketed 512"\n')
    assert "\n# laion_aesthetics bucketed 512\n" in card
    assert "This is a captioned bucketed-shards export of the `laion_aesthetics` dataset." in card
    assert "base resolution(s) `[512]`, without upsampling. The export contains `19` samples (20 images) across `2`" in card
    assert "\n1. `google/gemini-2.0-flash-lite-001` (`caption_llm`)\n" in card
    assert "- **Created**: `2024-05-01T12:00:00+00:00`\n" in card
    assert "Bucket IDs (preview): `p1024x1024`, `p768x1344`\n" in card
    assert "| p1024x1024 | 512×512 | 1.000 | 10 |\n| p768x1344 | 576×512 | 1.125 | 9 |\n" in card
    assert (
        "| 1 | gemini_run | caption_llm | openrouter | google/gemini-2.0-flash-lite-001 | 2024-04-30 10:00:00 "
        "| aaaaaaaaaaaa… | bbbbbbbbbbbb… |\n" in card
    )
    assert "| 0 | caption_llm | openrouter | google/gemini-2.0-flash-lite-001 | 19 |\n| 1 | alt_text |  |  | 1 |\n" in card
    assert "| ✓ | caption_llm | 19 |\n| ✓ | alt_text | 20 |\n|  | caption | 3 |\n" in card
    assert "Missing caption policy: `drop`\n" in card
    assert "- skipped_too_small: 5\n" in card
    assert "- source members skipped (not samples): unsafe_path 2\n" in card
    assert "- repaired or ignored values (records kept): caption_nul_removed 1\n" in card
    assert "crop_strategy=corner" in card and "`adaptive_scale`" in card


def test_ordinary_pictures_section_as_before():
    card = render_card(_manifest(), pictures=True)
    assert "![Samples per bucket](bucket_distribution.png)" in card
    assert "- `p1024x1024` (512×512, 10 samples): ![p1024x1024](contact_sheets/p1024x1024.png)\n" in card


# Hostile values -------------------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["no_pictures", "pictures"])
def hostile_card(request) -> str:
    return render_card(_manifest(_hostile, HOSTILE_IDS), pictures=request.param)


def test_no_raw_html_from_input(hostile_card):
    low = hostile_card.lower()
    for tag in ("<script", "</details", "<img", "<a "):
        assert tag not in low, tag
    assert "\u2028" not in hostile_card
    # The hostile text is still there, escaped.
    assert "<script>alert(1)</script>" in html.unescape(hostile_card)


def test_front_matter_is_valid_yaml_with_the_exact_title(hostile_card):
    front = hostile_card.split("\n---\n", 1)[0].removeprefix("---\n")
    meta = yaml.safe_load(front)
    assert meta["pretty_name"] == f"name:{HOSTILE} bucketed 512"
    assert meta["license"] == "other" and "webdataset" in meta["tags"]


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


TABLES = {
    "| bucket_id |": 2,
    "| caption_source_id |": 1,
    "| selector_index |": 2,
    "| selected |": 3,
}


def test_tables_keep_their_shape(hostile_card):
    lines = hostile_card.split("\n")
    for header, n_rows in TABLES.items():
        start = next(i for i, line in enumerate(lines) if line.startswith(header))
        body = []
        for line in lines[start:]:
            if not line.startswith("|"):
                break
            body.append(line)
        assert len(body) == 2 + n_rows, (header, body)
        pipes = _unescaped_pipes(body[0])
        assert all(_unescaped_pipes(line) == pipes for line in body), (header, body)


def test_list_and_heading_lines_stay_one_line(hostile_card):
    lines = hostile_card.split("\n")
    model_lines = [line for line in lines if line.startswith("1. ")]
    assert len(model_lines) == 1 and "model:" in model_lines[0] and "variant:" in model_lines[0]
    assert sum(line.startswith("# ") for line in lines) == 1
    assert [line for line in lines if line.startswith("Bucket IDs (preview): ")][0].count("bucket:") == 1
    for key in ("summary_key:", "tar_key:", "flag_key:"):
        (line,) = [line for line in lines if key in line]
        assert line.startswith("- ")


# Rendered through a CommonMark + tables parser ---------------------------------------------------------


def _tokens(card: str):
    markdown_it = pytest.importorskip("markdown_it")
    body = card.split("\n---\n", 1)[1]  # drop the YAML front matter
    return markdown_it.MarkdownIt("commonmark").enable("table").parse(body)


def _visible(inline) -> str:
    """The text a reader sees in an inline token (raw <code> wrappers dropped)."""
    return "".join(c.content for c in inline.children or [] if c.type in ("text", "code_inline", "softbreak"))


def _flat(s: str) -> str:
    return re.sub(r"[\n\u2028]", " ", s)


def test_rendered_card_has_no_html_but_code_and_shows_values_verbatim(hostile_card):
    tokens = _tokens(hostile_card)
    html_bits = [c.content for t in tokens for c in (t.children or []) if c.type == "html_inline"]
    html_bits += [t.content for t in tokens if t.type == "html_block"]
    assert set(html_bits) <= {"<code>", "</code>"}, set(html_bits)
    links = [c for t in tokens for c in (t.children or []) if c.type in ("link_open", "image")]
    assert all(c.attrs.get("src", "").startswith("contact_sheets/") or c.attrs.get("src") == "bucket_distribution.png"
               for c in links), [c.attrs for c in links]

    # Table cells: one row per input row, each cell showing the value (newlines as spaces).
    rows, row = [], None
    for t in tokens:
        if t.type == "tr_open":
            row = []
        elif t.type == "inline" and row is not None:
            row.append(_visible(t))
        elif t.type == "tr_close":
            rows.append(row)
            row = None
    src_row = next(r for r in rows if r and r[0] == "1" and len(r) == 8)
    assert src_row[1:5] == [_flat(_hostile(f, "")) for f in ("source_name", "variant", "backend", "model")]
    dist_ids = [r[0] for r in rows if len(r) == 4 and r[3] in ("10", "9")]
    assert dist_ids == [_flat(HOSTILE_IDS[0]), "p1024x1024"]

    # Code spans / <code>: the model list shows model and variant verbatim.
    items = [_visible(t) for t in tokens if t.type == "inline" and t.content.startswith(("`model:", "<code>model:"))]
    assert items == [f"{_flat(_hostile('model', ''))} ({_flat(_hostile('variant', ''))})"]


@pytest.mark.parametrize("value", ["a`b", "`lead", "trail`", "two``ticks", "`"])
def test_backticks_in_code_spans(value):
    card = render_card(_manifest(lambda f, n: value if f == "model" else n))
    (line,) = [line for line in card.split("\n") if line.startswith("1. ")]
    tokens = _tokens(card)
    codes = [c.content for t in tokens for c in (t.children or []) if c.type == "code_inline"]
    assert value in codes, (line, codes)


def test_picture_links_are_url_encoded():
    card = render_card(_manifest(bucket_ids=("p1024x1024", "odd id (x)")), pictures=True)
    assert "![odd id (x)](contact_sheets/odd%20id%20%28x%29.png)" in card
    assert "- `odd id (x)` (576×512, 9 samples)" in card


def test_entities_decode_back_to_the_value():
    card = render_card(_manifest(_hostile, HOSTILE_IDS))
    (row,) = [line for line in card.split("\n") if line.startswith("| 1 | source_name:")]
    cells = [html.unescape(c.strip()) for c in row.strip("|").split("|")]
    assert cells[4] == _flat(_hostile("model", ""))
