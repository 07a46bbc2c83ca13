"""The dataset spec: parsing, defaults, error messages naming the key, and path checks."""

from __future__ import annotations

import copy
import os
import re
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
    (root / "src" / "a" / "b").mkdir(parents=True, exist_ok=True)
    (root / "src" / "a" / "b" / "x.tar").write_bytes(b"")
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
        ("output a source glob matches", variant(sources=[{"name": "w", "kind": "webdataset",
                                                           "paths": [str(root / "src" / "*" / "*" / "*.tar")]}],
                                                 output_dir=str(root / "src" / "export")),
         "spec error at output_dir:"),
        ("nan similarity", variant(filters={"min_similarity": float("nan")}),
         "spec error at filters.min_similarity: must be a finite number between -1 and 1"),
    ]


@pytest.mark.parametrize("case", ["unknown key", "wrong type", "missing path", "output inside a source",
                                  "two sources with one name", "output a source glob matches", "nan similarity"])
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


# glob overlap ------------------------------------------------------------------------------------------


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def _wds(tmp_path: Path, pattern: str, **dirs) -> dict:
    data = _minimal()
    data["sources"] = [{"name": "wds", "kind": "webdataset", "paths": [pattern]}]
    data.update(dirs)
    return data


def test_check_paths_glob_source_issue_case(tmp_path):
    """The second build would ingest src/export/buckets/<id>/shard-000000.tar."""
    _touch(tmp_path / "src" / "a" / "b" / "x.tar")
    data = _wds(tmp_path, "src/*/*/*.tar", output_dir="src/export")
    with pytest.raises(SpecError, match=r"^spec error at output_dir: .* overlaps the input sources\[0\]"):
        check_paths(parse_spec(data, tmp_path))


@pytest.mark.parametrize(
    "pattern, key, value, refused",
    [
        ("data/*/shards/*.tar", "output_dir", "data/export", True),  # data/export/shards/x.tar matches
        ("data/*/shards/*.tar", "output_dir", "data/out2/other", False),
        ("data/*/shards/*.tar", "output_dir", "data/a/shards/export", True),  # inside a matched source dir
        ("data/*/shards/*.tar", "work_dir", "data/work", True),
        ("data/*/shards/*.tar", "work_dir", "elsewhere/work", False),
        ("data/**/*.tar", "work_dir", "data/x/y/work", True),  # `**` taken as any depth
        ("data/**/*.tar", "output_dir", "data", True),  # the pattern's literal prefix is inside it
        ("data/a/shards/x.tar", "output_dir", "data/a/other", False),
        ("data/[ab]/shards/*.tar", "output_dir", "data/b", True),
        ("data/[ab]/shards/*.tar", "output_dir", "data/c", False),
    ],
)
def test_check_paths_glob_overlap(tmp_path, pattern, key, value, refused):
    _touch(tmp_path / "data" / "a" / "shards" / "x.tar")
    _touch(tmp_path / "data" / "a" / "y.tar")  # for data/**/*.tar (glob reads ** as * here)
    spec = parse_spec(_wds(tmp_path, pattern, **{key: value}), tmp_path)
    if refused:
        with pytest.raises(SpecError, match=rf"^spec error at {key}: .* overlaps the input sources\[0\]"):
            check_paths(spec)
    else:
        check_paths(spec)


def test_check_paths_glob_overlap_through_symlink(tmp_path):
    _touch(tmp_path / "data" / "a" / "shards" / "x.tar")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    spec = parse_spec(_wds(tmp_path, str(tmp_path / "link" / "*" / "shards" / "*.tar"), output_dir="data/export"),
                      tmp_path)
    with pytest.raises(SpecError, match="^spec error at output_dir:"):
        check_paths(spec)


def test_check_paths_glob_match_resolving_into_output(tmp_path):
    """A matched file that is a link into the export is refused even when the pattern is not."""
    target = _touch(tmp_path / "out" / "buckets" / "p1024x1024" / "shard-000000.tar")
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "a.tar").symlink_to(target)
    with pytest.raises(SpecError, match=r"^spec error at output_dir: .* overlaps the input sources\[0\]"):
        check_paths(parse_spec(_wds(tmp_path, "tars/*.tar"), tmp_path))


def test_check_paths_url_glob_overlap(tmp_path):
    _touch(tmp_path / "meta" / "2024" / "part-0.parquet")
    data = _minimal()
    data["sources"] = [{"name": "web", "kind": "urls", "path": "meta/*/*.parquet"}]
    data["work_dir"] = "meta/work"
    with pytest.raises(SpecError, match=r"^spec error at work_dir: .* overlaps the input sources\[0\]"):
        check_paths(parse_spec(data, tmp_path))
    data["work_dir"] = "work"
    check_paths(parse_spec(data, tmp_path))


def test_overlap_helper_rule():
    from bucket_assets.spec import _pattern_overlaps

    assert _pattern_overlaps("/d/*/shards/*.tar", "/d/export")
    assert not _pattern_overlaps("/d/*/shards/*.tar", "/d/out2/other")
    assert _pattern_overlaps("/d/*/shards/*.tar", "/")  # an ancestor of every match
    assert _pattern_overlaps("/d/*", "/d/export")  # the pattern matches the dir itself
    assert _pattern_overlaps("/d/x.parquet", "/d/export")  # inside the source's directory (literal rule)
    assert not _pattern_overlaps("/d/x.parquet", "/e")


@pytest.mark.parametrize("key", ["output_dir", "work_dir"])
def test_check_paths_output_or_work_dir_not_a_directory(tmp_path, key):
    (tmp_path / "images").mkdir()
    _touch(tmp_path / "afile")
    data = _minimal()
    data[key] = "afile"
    with pytest.raises(SpecError, match=rf"^spec error at {key}: .*afile is not a directory$"):
        check_paths(parse_spec(data, tmp_path))
    data[key] = "afile/sub"  # cannot be created under a file
    with pytest.raises(SpecError, match=rf"^spec error at {key}: .*afile is not a directory$"):
        check_paths(parse_spec(data, tmp_path))


# values that validate but cannot work ---------------------------------------------------------------

_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "path, value, where, bound",
    [
        (("filters", "min_similarity"), _NAN, "filters.min_similarity", "between -1 and 1"),
        (("filters", "min_similarity"), _INF, "filters.min_similarity", "between -1 and 1"),
        (("filters", "min_similarity"), 1.5, "filters.min_similarity", "between -1 and 1"),
        (("filters", "min_similarity"), "nan", "filters.min_similarity", "between -1 and 1"),
        (("filters", "blank_std_threshold"), _NAN, "filters.blank_std_threshold", "between 0 and 255"),
        (("filters", "blank_std_threshold"), 256, "filters.blank_std_threshold", "between 0 and 255"),
        (("captions", "max_chars"), 10**20, "captions.max_chars", "between 1 and 10000000"),
        (("captions", "max_chars"), 1e15, "captions.max_chars", "between 1 and 10000000"),
        (("captions", "max_chars"), "1e20", "captions.max_chars", "between 1 and 10000000"),
        (("captions", "max_chars"), 2.5, "captions.max_chars", "an integer between 1 and 10000000"),
        (("buckets", "divisible"), 10**12, "buckets.divisible", "between 1 and 256"),
        (("buckets", "divisible"), 0, "buckets.divisible", "between 1 and 256"),
        (("metadata", "memory_limit"), "1KB", "metadata.memory_limit", "between 64MB and 16TB"),
        (("metadata", "memory_limit"), "63MB", "metadata.memory_limit", "between 64MB and 16TB"),
        (("metadata", "memory_limit"), "17TB", "metadata.memory_limit", "between 64MB and 16TB"),
        (("metadata", "memory_limit"), "lots", "metadata.memory_limit", "between 64MB and 16TB"),
        (("image", "max_pixels"), 10**13, "image.max_pixels", "between 1 and 1000000000"),
        (("image", "workers"), 10**6, "image.workers", "between 0 and 1024"),
        (("image", "crop", "jitter"), 4097, "image.crop.jitter", "between 0 and 4096"),
        (("image", "jpeg", "adaptive_threshold"), _NAN, "image.jpeg.adaptive_threshold",
         "greater than 0 and at most 1"),
        (("image", "jpeg", "quality"), 101, "image.jpeg.quality", "between 1 and 100"),
        (("shards", "max_samples"), 10**9, "shards.max_samples", "between 1 and 1000000"),
        (("shards", "max_bytes"), 2**36 + 1, "shards.max_bytes", "between 10000 and 68719476736 (64 GiB)"),
    ],
)
def test_unworkable_values_are_errors_with_the_bound(tmp_path, path, value, where, bound):
    data = _minimal()
    node = data
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    msg = _error(data, tmp_path)
    assert msg.startswith(f"spec error at {where}: must be ") and bound in msg, msg


@pytest.mark.parametrize(
    "key, value, bound",
    [
        ("timeout_s", _NAN, "greater than 0 and at most 3600"),
        ("timeout_s", _INF, "greater than 0 and at most 3600"),
        ("backoff_s", _NAN, "between 0 and 600"),
        ("max_backoff_s", "inf", "between 0 and 3600"),
        ("max_bytes", 10**15, "between 1 and 4294967296 (4 GiB)"),
        ("concurrency", 1e20, "between 1 and 512"),
    ],
)
def test_download_numbers_finite_and_bounded(tmp_path, key, value, bound):
    data = _minimal()
    data["sources"] = [{"name": "web", "kind": "urls", "path": "m.parquet", "download": {key: value}}]
    msg = _error(data, tmp_path)
    assert msg.startswith(f"spec error at sources[0].download.{key}: must be ") and bound in msg, msg


def test_divisible_at_most_the_smallest_bucket_side(tmp_path):
    """scale_side clamps a side below divisible/2 up to divisible, so buckets stop following their
    proto aspect; the smallest proto side (512) at base 128 is 64."""
    data = _minimal()
    data["buckets"] = {"base_resolutions": [512, 128], "divisible": 128}
    msg = _error(data, tmp_path)
    assert msg == "spec error at buckets.divisible: must be at most 64, the smallest bucket side at base resolution 128"
    data["buckets"] = {"base_resolutions": [512, 128], "divisible": 64}
    assert parse_spec(data, tmp_path).buckets.divisible == 64
    data["buckets"] = {"base_resolutions": [512], "divisible": 256}
    assert parse_spec(data, tmp_path).buckets.divisible == 256


def test_yaml_nan_similarity_via_load_spec(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(_minimal()) + "filters: {min_similarity: .nan}\n", encoding="utf-8")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    assert str(ei.value) == "spec error at filters.min_similarity: must be a finite number between -1 and 1"


def test_bounds_keep_valid_forms(tmp_path):
    data = _minimal()
    data.update(
        filters={"min_similarity": -1, "blank_std_threshold": 255},
        captions={"max_chars": 100.0},  # an integral float stays accepted
        buckets={"base_resolutions": [64], "divisible": 32},
        image={"max_pixels": 1_000_000_000, "crop": {"jitter": 4096}, "workers": "8"},
        shards={"max_samples": 1_000_000, "max_bytes": 2**36},
        metadata={"memory_limit": "64MB"},
    )
    spec = parse_spec(data, tmp_path)
    assert spec.captions.max_chars == 100 and spec.image.workers == 8 and spec.filters.min_similarity == -1
    for limit in ("3GB", "3 GB", "1.5GiB", "16TB", "65536KiB"):
        data["metadata"] = {"memory_limit": limit}
        assert parse_spec(data, tmp_path).metadata.memory_limit == limit
    data["filters"] = {"min_similarity": None}
    assert parse_spec(data, tmp_path).filters.min_similarity is None


def test_readme_spec_reference_parses(tmp_path):
    """The README's full example spec (every section, every source kind) is a valid spec."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Spec reference", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = parse_spec(yaml.safe_load(block), tmp_path)
    assert [s.kind for s in spec.sources] == ["webdataset", "parquet", "parquet", "folder", "urls"]
    assert spec.sources[2].columns.image == "image" and spec.sources[2].image_dir is None
    assert spec.metadata.memory_limit == "3GB" and spec.captions.max_chars == 20_000


def test_check_paths_literal_dirs_with_glob_characters(tmp_path):
    """Plain directory paths are escaped before the glob rule: `[1]` is a name, not a class."""
    (tmp_path / "imgs[1]").mkdir()
    data = _minimal("imgs[1]")
    data["output_dir"] = "imgs[1]/export"
    with pytest.raises(SpecError, match="^spec error at output_dir:"):
        check_paths(parse_spec(data, tmp_path))
    data["output_dir"] = "imgs1/export"
    check_paths(parse_spec(data, tmp_path))


# paths relative to the spec file ---------------------------------------------------------------------


def _relative_spec() -> dict:
    """Every path field of the spec, relative."""
    return {
        "name": "rel", "output_dir": "out/export", "work_dir": "./out/work",
        "sources": [
            {"name": "wds", "kind": "webdataset", "paths": ["raw/shards/*.tar", "raw/extra/one.tar"]},
            {"name": "pq", "kind": "parquet", "path": "raw/pcb/meta.parquet", "image_dir": "raw/pcb/train"},
            {"name": "dir", "kind": "folder", "path": "raw/folder"},
            {"name": "web", "kind": "urls", "path": "raw/meta/*.parquet"},
        ],
        "captions": {"landing_dir": "../landing"},
    }


def _inputs(root: Path) -> None:
    _touch(root / "raw" / "shards" / "a.tar")
    _touch(root / "raw" / "shards" / "b.tar")
    _touch(root / "raw" / "extra" / "one.tar")
    _touch(root / "raw" / "pcb" / "meta.parquet")
    (root / "raw" / "pcb" / "train").mkdir()
    (root / "raw" / "folder").mkdir()
    _touch(root / "raw" / "meta" / "part-0.parquet")


def _write_spec(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _path_fields(spec) -> dict:
    wds, pq, folder, web = spec.sources
    return {"output_dir": spec.output_dir, "work_dir": spec.work_dir, "wds": wds.paths, "pq": pq.path,
            "pq.image_dir": pq.image_dir, "folder": folder.path, "web": web.path,
            "landing_dir": spec.captions.landing_dir}


def test_relative_paths_are_relative_to_the_spec_file_from_any_cwd(tmp_path, monkeypatch):
    root = (tmp_path / "project" / "data").resolve()
    _inputs(root)
    spec_path = _write_spec(root / "spec.yaml", _relative_spec())
    (tmp_path / "elsewhere").mkdir()
    loaded = []
    for cwd, given in ((tmp_path / "elsewhere", spec_path), (root, "spec.yaml"), (tmp_path, "project/data/spec.yaml"),
                       (Path("/"), spec_path)):
        monkeypatch.chdir(cwd)
        spec = load_spec(given)
        check_paths(spec)  # every input found, wherever the command runs
        loaded.append(spec)
    assert all(s == loaded[0] for s in loaded)
    assert _path_fields(loaded[0]) == {
        "output_dir": str(root / "out" / "export"), "work_dir": str(root / "out" / "work"),
        "wds": [str(root / "raw" / "shards" / "*.tar"), str(root / "raw" / "extra" / "one.tar")],
        "pq": str(root / "raw" / "pcb" / "meta.parquet"), "pq.image_dir": str(root / "raw" / "pcb" / "train"),
        "folder": str(root / "raw" / "folder"), "web": str(root / "raw" / "meta" / "*.parquet"),
        "landing_dir": str(root.parent / "landing"),
    }
    # The env var names the spec relative to cwd; the spec's paths stay relative to the file.
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setenv(SPEC_ENV_VAR, "data/spec.yaml")
    assert load_spec() == loaded[0]


def test_a_relative_glob_matches_under_the_spec_dir(tmp_path, monkeypatch):
    import glob

    root = tmp_path / "specdir"
    _touch(root / "shards" / "2024" / "a.tar")
    _touch(root / "shards" / "2025" / "b.tar")
    _touch(tmp_path / "cwd" / "shards" / "2024" / "decoy.tar")  # what a cwd-relative glob would find
    data = _wds(tmp_path, "shards/*/*.tar")
    data["sources"].append({"name": "web", "kind": "urls", "path": "shards/2024/*.tar"})
    spec_path = _write_spec(root / "spec.yaml", data)
    monkeypatch.chdir(tmp_path / "cwd")
    spec = load_spec(spec_path)
    check_paths(spec)
    (pattern,) = spec.sources[0].paths
    assert os.path.isabs(pattern)
    assert sorted(glob.glob(pattern)) == [str(root.resolve() / "shards" / y / f) for y, f in (("2024", "a.tar"), ("2025", "b.tar"))]
    assert glob.glob(spec.sources[1].path) == [str(root.resolve() / "shards" / "2024" / "a.tar")]


def test_a_spec_dir_with_glob_characters_stays_literal(tmp_path, monkeypatch):
    """The spec dir is joined to a relative glob escaped: `[1]` in its name is not a class."""
    import glob

    root = tmp_path / "run[1]"
    _touch(root / "shards" / "a.tar")
    (tmp_path / "run1" / "shards").mkdir(parents=True)  # what [1] as a class would match
    _touch(tmp_path / "run1" / "shards" / "decoy.tar")
    spec_path = _write_spec(root / "spec.yaml", _wds(tmp_path, "shards/*.tar"))
    monkeypatch.chdir(tmp_path)
    spec = load_spec(spec_path)
    check_paths(spec)
    assert glob.glob(spec.sources[0].paths[0]) == [str(root.resolve() / "shards" / "a.tar")]
    assert spec.output_dir == str(root.resolve() / "out")  # plain paths are not escaped


def test_absolute_and_home_paths_are_kept(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    inputs = tmp_path / "inputs"
    data = _relative_spec()
    data["output_dir"] = str(tmp_path / "abs" / "." / "export")
    data["work_dir"] = "~/work"
    data["sources"][0]["paths"] = [str(inputs / "*.tar"), "~/shards/*.tar", "local/*.tar"]
    data["sources"][2]["path"] = str(inputs / "folder")
    spec_path = _write_spec(tmp_path / "specdir" / "spec.yaml", data)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(spec_path)
    assert spec.output_dir == str(tmp_path / "abs" / "export")
    assert spec.work_dir == str(home / "work")
    assert spec.sources[0].paths == [str(inputs / "*.tar"), str(home / "shards" / "*.tar"),
                                     str(tmp_path.resolve() / "specdir" / "local" / "*.tar")]
    assert spec.sources[2].path == str(inputs / "folder")


def test_a_relative_path_and_its_absolute_spelling_are_the_same(tmp_path, monkeypatch):
    """Below the spec dir nothing is resolved through links: a relative path to a symlinked
    parquet stays the link (the reader refuses links), exactly as the absolute path does."""
    root = tmp_path.resolve() / "specdir"
    real = _touch(tmp_path / "elsewhere" / "real.parquet")
    (root / "imgs").mkdir(parents=True)
    (root / "meta.parquet").symlink_to(real)
    (root / "linked").symlink_to(root / "imgs")
    rel = {"name": "p", "kind": "parquet", "path": "meta.parquet", "image_dir": "linked/../imgs"}
    absolute = {"name": "p", "kind": "parquet", "path": str(root / "meta.parquet"),
                "image_dir": str(root / "linked" / ".." / "imgs")}
    a = _minimal()
    a["sources"] = [rel]
    b = _minimal()
    b.update(output_dir=str(root / "out"), work_dir=str(root / "work"), sources=[absolute])
    b["captions"] = {"landing_dir": str(root / "data" / "captions")}
    monkeypatch.chdir(tmp_path)
    sa, sb = load_spec(_write_spec(root / "a.yaml", a)), load_spec(_write_spec(root / "b.yaml", b))
    assert sa == sb
    assert sa.sources[0].path == str(root / "meta.parquet")


def test_a_missing_relative_source_names_the_resolved_path(tmp_path, monkeypatch):
    root = tmp_path / "specdir"
    (tmp_path / "cwd" / "images").mkdir(parents=True)  # only a cwd-relative path would find it
    spec_path = _write_spec(root / "spec.yaml", _minimal("images"))
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(SpecError) as ei:
        check_paths(load_spec(spec_path))
    resolved = str(root.resolve() / "images")
    assert str(ei.value) == f"spec error at sources[0].path: directory {resolved} does not exist"

    data = _wds(tmp_path, "shards/*.tar")
    data["sources"].append({"name": "pq", "kind": "parquet", "path": "m/x.parquet", "image_dir": "imgs"})
    _write_spec(spec_path, data)
    with pytest.raises(SpecError, match=rf"^spec error at sources\[0\]\.paths\[0\]: no file matches "
                                        rf"{re.escape(str(root.resolve() / 'shards' / '*.tar'))}$"):
        check_paths(load_spec(spec_path))
    _touch(root / "shards" / "a.tar")
    with pytest.raises(SpecError, match=rf"^spec error at sources\[1\]\.path: file "
                                        rf"{re.escape(str(root.resolve() / 'm' / 'x.parquet'))} does not exist$"):
        check_paths(load_spec(spec_path))


def test_overlap_errors_name_resolved_paths(tmp_path, monkeypatch):
    root = (tmp_path / "specdir").resolve()
    (root / "images").mkdir(parents=True)
    data = _minimal()
    data["output_dir"] = "images/export"
    spec_path = _write_spec(root / "spec.yaml", data)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as ei:
        check_paths(load_spec(spec_path))
    assert str(ei.value) == (f"spec error at output_dir: {root / 'images' / 'export'} overlaps the input "
                             f"sources[0] ({root / 'images'})")


def test_missing_spec_file_names_the_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as ei:
        load_spec("conf/spec.yaml")
    assert str(ei.value) == (f"spec error: spec file {tmp_path.resolve() / 'conf' / 'spec.yaml'} "
                             "(given as conf/spec.yaml) does not exist")


def test_env_dir_overrides_stay_relative_to_cwd(tmp_path, monkeypatch):
    """BUCKET_ASSETS_OUTPUT_DIR / _WORK_DIR are command-line settings: relative to cwd, while the
    spec's own paths are relative to the spec file."""
    from bucket_assets.definitions import OUTPUT_DIR_ENV, WORK_DIR_ENV, dataset_resource

    root = (tmp_path / "specdir").resolve()
    spec_path = _write_spec(root / "spec.yaml", _minimal())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(OUTPUT_DIR_ENV, "shared/export")
    monkeypatch.delenv(WORK_DIR_ENV, raising=False)
    spec = dataset_resource(str(spec_path)).load()
    assert spec.output_dir == str(tmp_path.resolve() / "shared" / "export")
    assert spec.work_dir == str(root / "work") and spec.sources[0].path == str(root / "images")


def test_the_sample_spec_builds_from_any_cwd(tmp_path, monkeypatch, sample_root):
    """data/spec.yaml's paths are relative to data/: a copy beside the sample data checks out
    from the repo root, from its own dir and from /."""
    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    data.mkdir()
    (data / "spec.yaml").write_bytes((repo / "data" / "spec.yaml").read_bytes())
    for d in ("raw", "captions"):
        (data / d).symlink_to(sample_root / d)
    specs = []
    for cwd, given in ((tmp_path, "data/spec.yaml"), (data, "spec.yaml"), (Path("/"), str(data / "spec.yaml"))):
        monkeypatch.chdir(cwd)
        specs.append(load_spec(given))
        check_paths(specs[-1])
    assert specs[0] == specs[1] == specs[2]
    base = tmp_path.resolve() / "data"
    assert specs[0].output_dir == str(base / "export") and specs[0].work_dir == str(base / "work")
    assert specs[0].captions.landing_dir == str(base / "captions")
