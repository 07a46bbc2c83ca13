"""Asset checks: the export verifies, every raw record is accounted once, JPEG sizes match."""


import dagster as dg
from PIL import Image

from bucket_assets.core.accounting import check_balance, summary
from bucket_assets.core.manifest import VerifyError, verify_export
from bucket_assets.defs.resources import DatasetResource


def build_checks(filtered_images, export_manifest) -> list:
    @dg.asset_check(asset=export_manifest, name="export_verifies", blocking=True)
    def export_verifies(dataset: DatasetResource) -> dg.AssetCheckResult:
        """Every shard listed exists with its sha256, sample count, members and decodable JPEGs."""
        try:
            rep = verify_export(dataset.load().output_dir)
        except VerifyError as exc:
            return dg.AssetCheckResult(passed=False, description=str(exc))
        return dg.AssetCheckResult(passed=True, metadata={"shards": rep.shards, "samples": rep.samples})

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
        """Every stored JPEG of an exported sample has its bucket's target size (re-encode mode)."""
        spec = dataset.load()
        with dataset.db() as con:
            rows = con.execute(
                """SELECT p.path, a.target_w, a.target_h, a.src_w, a.src_h, p.bucket_id, p.key
                   FROM processed_images p
                   JOIN bucket_assignments a ON a.image_id = p.image_id AND a.bucket_id = p.bucket_id
                   JOIN shard_samples s ON s.bucket_id = p.bucket_id AND s.key = p.key"""
            ).fetchall()
        bad = []
        for path, tw, th, sw, sh, bucket, key in rows:
            with Image.open(path) as im:
                size = im.size
            want = (tw, th) if spec.image.mode == "reencode_jpeg" else None
            if want and size != want:
                bad.append(f"{bucket}/{key}: {size[0]}x{size[1]} != {tw}x{th}")
        return dg.AssetCheckResult(
            passed=not bad, metadata={"checked": len(rows), "mismatches": len(bad)}, description="; ".join(bad[:5]) or None
        )

    return [export_verifies, one_decision_per_raw_record, summary_accounts_for_every_image, jpeg_sizes_match_targets]
