"""The dataset spec: parsing, defaults, error messages naming the key, and path checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from bucket_assets.spec import (
    SPEC_ENV_VAR,
    FolderSource,
    ParquetSource,
    SpecError,
    WebDatasetSource,
    check_paths,
    load_spec,
    parse_spec,
)


def _minimal(source_path: str = "images") -> dict:
    return {
        "name": "demo",
        "output_dir": "out",
        "work_dir": "work",
        "sources": [{"name": "pics", "kind": "folder", "path": source_path}],
    }


def _error(data, base: Path) -> str:
    with pytest.raises(SpecError) as ei:
        parse_spec(data, base)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


# parse_spec ----------------------------------------------------------------------------------------


def test_minimal_spec_fills_defaults(tmp_path):
    spec = parse_spec(_minimal(), tmp_path)
    base = tmp_path.resolve()
    assert spec.name == "demo"
    assert spec.output_dir == str(base / "out")
    assert spec.work_dir == str(base / "work")
    (src,) = spec.sources
    assert isinstance(src, FolderSource)
    assert src.path == str(base / "images")
    assert src.caption_variant == "sidecar"
    assert src.image_extensions == ["jpg", "jpeg", "png", "webp"]

    f = spec.filters
    assert (f.min_similarity, f.drop_nsfw, f.drop_blank, f.blank_std_threshold, f.drop_duplicates) == (
        0.3, ["NSFW"], True, 2.0, True
    )
    assert spec.buckets.base_resolutions == [512] and spec.buckets.divisible == 32
    img = spec.image
    assert img.mode == "reencode_jpeg"
    assert img.crop.strategy == "corner" and img.crop.allowed_corners == [2, 3] and img.crop.jitter == 0
    assert (img.jpeg.quality, img.jpeg.subsampling, img.jpeg.adaptive_threshold) == (95, "adaptive_scale", 0.85)
    assert img.max_pixels == 100_000_000 and img.workers == 0
    c = spec.captions
    assert c.landing_dir == str(base / "data" / "captions")
    assert c.selectors == ["caption_gemini_2_flash_lite", "caption_mistral_medium_3_1", "alt_text"]
    assert c.missing == "empty" and c.max_chars == 20_000
    assert spec.shards.max_samples == 1000 and spec.shards.max_bytes == 1_000_000_000
    assert spec.multi_res is False
    assert spec.db_path == Path(spec.work_dir) / "metadata.duckdb"
    assert spec.processed_dir == Path(spec.work_dir) / "processed"


def test_paths_resolve_against_base_dir_and_absolute_paths_kept(tmp_path):
    data = _minimal()
    data["output_dir"] = "/abs/out/../export"
    data["sources"] = [
        {"name": "wds", "kind": "webdataset", "paths": ["shards/*.tar"]},
        {"name": "pq", "kind": "parquet", "path": "meta.parquet", "image_dir": "imgs"},
    ]
    spec = parse_spec(data, tmp_path)
    base = tmp_path.resolve()
    assert spec.output_dir == "/abs/export"
    wds, pq = spec.sources
    assert isinstance(wds, WebDatasetSource) and wds.paths == [str(base / "shards" / "*.tar")]
    assert wds.caption_variant == "alt_text"
    assert isinstance(pq, ParquetSource) and pq.path == str(base / "meta.parquet") and pq.image_dir == str(base / "imgs")
    assert pq.columns.id == "id" and pq.columns.caption == "caption" and pq.columns.width is None
    assert pq.caption_variant == "caption"


def test_multi_res_and_fingerprint(tmp_path):
    a = parse_spec(_minimal(), tmp_path)
    data = _minimal()
    data["buckets"] = {"base_resolutions": [512, 256]}
    b = parse_spec(data, tmp_path)
    assert b.multi_res is True
    assert a.fingerprint() == parse_spec(_minimal(), tmp_path).fingerprint()
    assert a.fingerprint() != b.fingerprint()
    assert len(a.fingerprint()) == 64


def test_spec_is_frozen(tmp_path):
    spec = parse_spec(_minimal(), tmp_path)
    with pytest.raises(Exception):
        spec.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "path, value, where",
    [
        (("filters",), {"bogus": 1}, "filters.bogus"),
        ((), {"extra_top": 1}, "extra_top"),
        (("image", "jpeg"), {"qualty": 90}, "image.jpeg.qualty"),
        (("sources", 0), {"colour": "red"}, "sources[0].colour"),
    ],
)
def test_unknown_key_names_the_path(tmp_path, path, value, where):
    data = _minimal()
    node = data
    for p in path:
        node = node.setdefault(p, {}) if isinstance(p, str) else node[p]
    node.update(value)
    msg = _error(data, tmp_path)
    assert f"at {where}:" in msg
    assert "unknown key" in msg


@pytest.mark.parametrize(
    "section, value, where",
    [
        ("shards", {"max_samples": "many"}, "shards.max_samples"),
        ("shards", {"max_samples": 0}, "shards.max_samples"),
        ("filters", {"drop_blank": "perhaps"}, "filters.drop_blank"),
        ("buckets", {"base_resolutions": [32]}, "buckets.base_resolutions"),
        ("buckets", {"base_resolutions": [512, 512]}, "buckets.base_resolutions"),
        ("image", {"crop": {"allowed_corners": [4]}}, "image.crop.allowed_corners[0]"),
        ("image", {"jpeg": {"quality": 101}}, "image.jpeg.quality"),
        ("captions", {"missing": "skip"}, "captions.missing"),
    ],
)
def test_wrong_type_or_value_names_the_key(tmp_path, section, value, where):
    data = _minimal()
    data[section] = value
    msg = _error(data, tmp_path)
    assert msg.startswith(f"spec error at {where}:")


def test_source_errors_name_the_source(tmp_path):
    data = _minimal()
    data["sources"][0]["path"] = 5
    assert _error(data, tmp_path).startswith("spec error at sources[0].path:")
    data = _minimal()
    data["sources"][0]["kind"] = "ftp"
    assert "sources[0]" in _error(data, tmp_path)
    data = _minimal()
    data["sources"][0]["name"] = "bad name!"
    assert _error(data, tmp_path).startswith("spec error at sources[0].name:")


def test_missing_required_key(tmp_path):
    data = _minimal()
    del data["work_dir"]
    msg = _error(data, tmp_path)
    assert "work_dir" in msg and "required key is missing" in msg
    data = _minimal()
    data["sources"] = []
    assert "sources" in _error(data, tmp_path)


def test_duplicate_source_names(tmp_path):
    data = _minimal()
    data["sources"].append(copy.deepcopy(data["sources"][0]))
    msg = _error(data, tmp_path)
    assert "two sources are named 'pics'" in msg


def test_duplicate_selectors(tmp_path):
    data = _minimal()
    data["captions"] = {"selectors": ["a", "b", "a"]}
    assert "selectors" in _error(data, tmp_path)


def test_non_mapping_spec(tmp_path):
    assert "mapping" in _error(["a"], tmp_path)
    assert "mapping" in _error(None, tmp_path)


# load_spec ---------------------------------------------------------------------------------------------


def test_load_spec_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(missing)


def test_load_spec_invalid_yaml(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)


def test_load_spec_reads_file_and_env(tmp_path, monkeypatch):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(_minimal()), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    spec = load_spec(p)
    assert spec.name == "demo" and spec.output_dir == str(tmp_path.resolve() / "out")
    monkeypatch.setenv(SPEC_ENV_VAR, str(p))
    assert load_spec().name == "demo"


# check_paths -----------------------------------------------------------------------------------------------


def test_check_paths_ok(tmp_path):
    (tmp_path / "images").mkdir()
    check_paths(parse_spec(_minimal(), tmp_path))


def test_check_paths_missing_folder(tmp_path):
    with pytest.raises(SpecError) as ei:
        check_paths(parse_spec(_minimal(), tmp_path))
    assert str(ei.value).startswith("spec error at sources[0].path:")


def test_check_paths_second_source_missing(tmp_path):
    (tmp_path / "images").mkdir()
    data = _minimal()
    data["sources"].append({"name": "more", "kind": "folder", "path": "more"})
    with pytest.raises(SpecError, match=r"sources\[1\]\.path"):
        check_paths(parse_spec(data, tmp_path))


def test_check_paths_webdataset_and_parquet(tmp_path):
    data = _minimal()
    data["sources"] = [{"name": "wds", "kind": "webdataset", "paths": ["shards/*.tar"]}]
    with pytest.raises(SpecError, match=r"sources\[0\]\.paths\[0\]"):
        check_paths(parse_spec(data, tmp_path))
    data["sources"] = [{"name": "pq", "kind": "parquet", "path": "m/meta.parquet", "image_dir": "imgs"}]
    with pytest.raises(SpecError, match=r"sources\[0\]\.path:"):
        check_paths(parse_spec(data, tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "meta.parquet").write_bytes(b"")
    with pytest.raises(SpecError, match=r"sources\[0\]\.image_dir"):
        check_paths(parse_spec(data, tmp_path))


def test_check_paths_output_inside_source(tmp_path):
    (tmp_path / "images").mkdir()
    data = _minimal()
    data["output_dir"] = "images/export"
    with pytest.raises(SpecError) as ei:
        check_paths(parse_spec(data, tmp_path))
    assert str(ei.value).startswith("spec error at output_dir:")


def test_check_paths_work_dir_contains_source(tmp_path):
    (tmp_path / "work" / "images").mkdir(parents=True)
    data = _minimal("work/images")
    with pytest.raises(SpecError, match="at work_dir:"):
        check_paths(parse_spec(data, tmp_path))


def test_check_paths_output_and_work_nested(tmp_path):
    (tmp_path / "images").mkdir()
    data = _minimal()
    data["work_dir"] = "out/work"
    with pytest.raises(SpecError, match="must not contain each other"):
        check_paths(parse_spec(data, tmp_path))


def test_fingerprint_ignores_locations_and_worker_count(tmp_path):
    """The manifest's spec_sha256 / export_id depend on what decides the bytes, not on where the
    export is written or how many processes build it."""
    a = parse_spec(_minimal(), tmp_path)
    moved = _minimal("elsewhere/images")
    moved.update(output_dir="o2", work_dir="w2", image={"workers": 7}, metadata={"memory_limit": "1GB"},
                 captions={"landing_dir": "other"})
    assert parse_spec(moved, tmp_path / "sub").fingerprint() == a.fingerprint()
    q = _minimal()
    q["image"] = {"jpeg": {"quality": 90}}
    assert parse_spec(q, tmp_path).fingerprint() != a.fingerprint()


@pytest.mark.parametrize("column", ['id"; DROP TABLE raw_index; --', "a\nb", "", "x" * 200, "'quoted'"])
def test_column_names_are_allow_listed(tmp_path, column):
    data = _minimal()
    data["sources"] = [{"name": "p", "kind": "parquet", "path": "m.parquet", "image_dir": "i",
                        "columns": {"caption": column}}]
    assert _error(data, tmp_path).startswith("spec error at sources[0].columns.caption:")


def _cli_cases(root: Path) -> list[tuple[str, dict, str]]:
    (root / "images").mkdir(exist_ok=True)
    base = _minimal(str(root / "images"))
    base.update(output_dir=str(root / "out"), work_dir=str(root / "work"))

    def variant(**changes) -> dict:
        d = copy.deepcopy(base)
        for k, v in changes.items():
            d[k] = v
        return d

    twice = copy.deepcopy(base["sources"][0])
    return [
        ("unknown key", variant(filters={"min_simlarity": 0.3}), "spec error at filters.min_simlarity:"),
        ("wrong type", variant(image={"jpeg": {"quality": "high"}}), "spec error at image.jpeg.quality:"),
        ("missing path", variant(sources=[{"name": "pics", "kind": "folder", "path": str(root / "nowhere")}]),
         "spec error at sources[0].path:"),
        ("output inside a source", variant(output_dir=str(root / "images" / "export")), "spec error at output_dir:"),
        ("two sources with one name", variant(sources=[twice, twice]), "spec error at sources:"),
    ]


@pytest.mark.parametrize("case", ["unknown key", "wrong type", "missing path", "output inside a source",
                                  "two sources with one name"])
def test_bad_spec_is_one_line_error_before_any_work(tmp_path, case):
    from bucket_assets_tests.conftest import run_cli

    cases = {name: (data, needle) for name, data, needle in _cli_cases(tmp_path)}
    data, needle = cases[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    res = run_cli("build", "--spec", str(spec), env={"DAGSTER_HOME": str(tmp_path / "home")})
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("bucket-assets: " + needle), err
    # before any work: nothing created
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists() and not (tmp_path / "home").exists()
