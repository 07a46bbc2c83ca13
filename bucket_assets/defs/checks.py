"""Asset checks: the export verifies, every raw record is accounted once, JPEG sizes match."""

import json
import uuid
from pathlib import Path

import dagster as dg

from bucket_assets.core.accounting import check_balance, summary
from bucket_assets.core.atomic import atomic_write_text
from bucket_assets.core.captions import caption_warnings
from bucket_assets.core.manifest import VerifyError, verify_export
from bucket_assets.core.shard_writer import TrustedJpegs
from bucket_assets.defs.assets.captions import selected_captions
from bucket_assets.defs.resources import DatasetResource

VERIFIED_CACHE = "verified_shards.json"


def build_checks(filtered_images, export_manifest) -> list:
    @dg.asset_check(asset=export_manifest, name="export_verifies", blocking=True)
    def export_verifies(dataset: DatasetResource) -> dg.AssetCheckResult:
        """Every shard listed exists with its sha256, sample count, members and decodable JPEGs.
        Shards unchanged (size, mtime, inode, sha256) since their last full check are not re-read,
        and JPEG members whose bytes the image stage encoded at the target size are hashed, not
        decoded, so a caption update verifies only what it rewrote. `bucket-assets verify`
        re-reads and decodes everything."""
        spec = dataset.load()
        cache = Path(spec.work_dir) / VERIFIED_CACHE
        try:
            known = json.loads(cache.read_text()) if cache.is_file() else {}
        except (OSError, json.JSONDecodeError):
            known = {}
        # JPEGs the image stage encoded and measured at their target size, per shard read.
        trusted = TrustedJpegs(dataset.db, Path(spec.work_dir) / "tmp", uuid.uuid4().hex)
        try:
            with trusted:
                rep = verify_export(spec.output_dir, known, trusted if spec.image.mode == "reencode_jpeg" else frozenset())
        except VerifyError as exc:
            cache.unlink(missing_ok=True)
            return dg.AssetCheckResult(passed=False, description=str(exc))
        atomic_write_text(cache, json.dumps(rep.verified, sort_keys=True))
        return dg.AssetCheckResult(
            passed=True, metadata={"shards": rep.shards, "samples": rep.samples, "shards_read": rep.reverified}
        )

    @dg.asset_check(asset=filtered_images, name="one_decision_per_raw_record", blocking=True)
    def one_decision_per_raw_record(dataset: DatasetResource) -> dg.AssetCheckResult:
        """Each raw record has exactly one filter decision: nothing disappears without a row."""
        with dataset.db() as con:
            raw, decided, distinct = con.execute(
                """SELECT (SELECT count(*) FROM raw_index), count(*), count(DISTINCT row_id)
                   FROM filtered_images WHERE row_id IN (SELECT row_id FROM raw_index)"""
            ).fetchone()
        ok = raw == decided == distinct
        return dg.AssetCheckResult(passed=ok, metadata={"raw_records": raw, "decisions": decided, "distinct": distinct})

    @dg.asset_check(asset=export_manifest, name="summary_accounts_for_every_image")
    def summary_accounts_for_every_image(dataset: DatasetResource) -> dg.AssetCheckResult:
        """images_seen == images_exported + every skip reason, and images_seen == raw records."""
        with dataset.db() as con:
            s = summary(con, {})
            raw = con.execute("SELECT count(*) FROM raw_index").fetchone()[0]
            not_built = s.get("skipped_not_built", 0)
        ok = check_balance(s) and s["images_seen"] == raw and not_built == 0
        return dg.AssetCheckResult(passed=ok, metadata={"images_seen": s["images_seen"], "raw_records": raw, "not_built": not_built})

    @dg.asset_check(asset=export_manifest, name="jpeg_sizes_match_targets")
    def jpeg_sizes_match_targets(dataset: DatasetResource) -> dg.AssetCheckResult:
        """Every exported sample's JPEG, as encoded (re-encode mode), has its bucket's target size.
        Sizes are those measured on the encoded array; export_verifies decodes the shards."""
        spec = dataset.load()
        if spec.image.mode != "reencode_jpeg":
            return dg.AssetCheckResult(passed=True, description="passthrough: source sizes are kept")
        with dataset.db() as con:
            checked, bad = con.execute(
                """SELECT count(*), list(p.bucket_id || '/' || p.key || ': ' || p.width || 'x' || p.height
                                         || ' != ' || a.target_w || 'x' || a.target_h)
                                    FILTER (WHERE p.width <> a.target_w OR p.height <> a.target_h)
                   FROM processed_images p
                   JOIN bucket_assignments a ON a.image_id = p.image_id AND a.bucket_id = p.bucket_id
                   JOIN shard_samples s ON s.bucket_id = p.bucket_id AND s.key = p.key"""
            ).fetchone()
        bad = bad or []
        return dg.AssetCheckResult(
            passed=not bad, metadata={"checked": checked, "mismatches": len(bad)}, description="; ".join(bad[:5]) or None
        )

    @dg.asset_check(asset=selected_captions, name="every_selector_matches_a_source")
    def every_selector_matches_a_source(dataset: DatasetResource) -> dg.AssetCheckResult:
        """Every captions.selectors entry names the variant of some caption source, and no
        landing source was rejected. A warning, not a failure: a selector may name captions
        that have not landed yet (`bucket-assets build --strict` fails on it)."""
        spec = dataset.load()
        with dataset.db() as con:
            warnings = caption_warnings(con, list(spec.captions.selectors))
        return dg.AssetCheckResult(
            passed=not warnings, severity=dg.AssetCheckSeverity.WARN,
            description="; ".join(warnings) or None, metadata={"warnings": len(warnings)},
        )

    return [export_verifies, one_decision_per_raw_record, summary_accounts_for_every_image, jpeg_sizes_match_targets,
            every_selector_matches_a_source]
