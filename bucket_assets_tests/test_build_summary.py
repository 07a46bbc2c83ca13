"""`bucket-assets build` says what happened (issue 12): images seen, exported, skips by reason,
samples per caption source, rejected caption sources, and warnings such as a selector that
matches no caption variant of any source (also in the manifest and the card; --strict fails)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import yaml

from bucket_assets.core.accounting import build_report
from bucket_assets.core.captions import selector_warnings
from bucket_assets_tests.conftest import run_cli

SELECTORS = ["caption_gemini_2_flash_lite", "caption_mistral_medium_3_1", "cogvlm", "alt_text", "sidecar"]


def _build(spec: Path, *extra: str):
    return run_cli("build", "--spec", str(spec), *extra, env={"DAGSTER_HOME": str(spec.parent / "home")})


def _summary_lines(stdout: str) -> list[str]:
    return [ln.strip() for ln in stdout.splitlines() if ln.startswith("  ")]


def test_clean_build_prints_a_summary_that_matches_the_manifest(make_spec):
    spec = make_spec("report", **{"captions.selectors": SELECTORS})
    res = _build(spec)
    assert res.returncode == 0, res.stderr[-2000:]
    export = Path(yaml.safe_load(spec.read_text())["output_dir"])
    m = json.loads((export / "manifest.json").read_text())
    s = m["summary"]
    lines = _summary_lines(res.stdout)
    assert lines == build_report(m)
    assert lines[0].startswith(f"images: {s['images_seen']:,} seen, {s['images_exported']:,} exported as "
                               f"{s['samples_exported']:,} samples in ")
    skipped = dict(re.findall(r"(\w+) (\d+)", lines[1].removeprefix("skipped: ")))
    assert skipped and {f"skipped_{k}" if f"skipped_{k}" in s else k + "s": int(v) for k, v in skipped.items()} == {
        k: v for k, v in s.items() if isinstance(v, int) and v and k not in ("images_seen", "images_exported", "samples_exported")
    }
    # Every exported sample is counted under the caption source it took its text from.
    used = s["caption_sources_used"]
    assert sum(u["samples"] for u in used) == s["samples_exported"]
    assert len({u["name"] for u in used}) >= 2
    captions_line = next(ln for ln in lines if ln.startswith("captions: "))
    for u in used:
        assert f"{u['name']} ({u['variant']}) {u['samples']:,}" in captions_line or u["name"] is None
    assert m["warnings"] == [] and m["caption_sources_rejected"] == []
    assert "warning" not in res.stderr
    assert "Warnings from the build" not in (export / "README.md").read_text()


def test_misspelled_selector_is_a_loud_warning_in_console_manifest_and_card(make_spec):
    typo = ["caption_gemini_2_flash_lte", *SELECTORS[1:]]
    spec = make_spec("typo", **{"captions.selectors": typo})
    res = _build(spec)
    # A warning, not a failure (a selector may name captions that land later) ...
    assert res.returncode == 0, res.stderr[-2000:]
    warn = [ln for ln in res.stderr.splitlines() if ln.startswith("bucket-assets: warning: ")]
    assert any("captions.selectors[0] 'caption_gemini_2_flash_lte' matches no caption variant of any source" in w
               and "did you mean 'caption_gemini_2_flash_lite'?" in w for w in warn), res.stderr
    # ... and the landing source the typo shut out is listed as rejected, with the reason.
    assert any("rejected" in w and "'caption_gemini_2_flash_lite' is not in captions.selectors" in w for w in warn), warn
    export = Path(yaml.safe_load(spec.read_text())["output_dir"])
    m = json.loads((export / "manifest.json").read_text())
    assert len(m["warnings"]) == len(warn) >= 2
    assert [r["reason"] for r in m["caption_sources_rejected"]] and all(
        "is not in captions.selectors" in r["reason"] for r in m["caption_sources_rejected"])
    assert any(ln.startswith("rejected: caption source ") for ln in _summary_lines(res.stdout))
    card = (export / "README.md").read_text()
    assert "Warnings from the build that made this export" in card and "caption&#95;gemini&#95;2&#95;flash&#95;lte" in card \
        or "caption_gemini_2_flash_lte" in card
    assert "Caption sources rejected (not used):" in card
    # The check shows in the UI as a warning; the run itself succeeded.
    with duckdb.connect(str(Path(yaml.safe_load(spec.read_text())["work_dir"]) / "metadata.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM rejected_caption_sources").fetchone()[0] == len(m["caption_sources_rejected"])

    # --strict turns the warnings into a failed build, in one line; the export is still complete.
    res = _build(spec, "--strict")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("bucket-assets: ") and "--strict" in res.stderr
    assert run_cli("verify", str(export)).returncode == 0

    # Fixing the selector clears the warnings everywhere.
    spec.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), "captions": {
        **yaml.safe_load(spec.read_text())["captions"], "selectors": SELECTORS}}))
    res = _build(spec, "--strict")
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((export / "manifest.json").read_text())
    assert m["warnings"] == [] and "Warnings from the build" not in (export / "README.md").read_text()


def test_selector_warnings_name_the_near_variant():
    assert selector_warnings(["cogvlm", "alt_txt"], {"cogvlm", "alt_text"}) == [
        "captions.selectors[1] 'alt_txt' matches no caption variant of any source (variants: alt_text, cogvlm); "
        "did you mean 'alt_text'?"
    ]
    assert selector_warnings(["zzz"], set()) == [
        "captions.selectors[0] 'zzz' matches no caption variant of any source (variants: none)"]
    assert selector_warnings(["a", "b"], {"a", "b"}) == []
