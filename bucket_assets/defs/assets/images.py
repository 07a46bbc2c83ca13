"""Stage 4: processed images, partitioned by bucket (decode, resize, crop, encode, store)."""


from pathlib import Path

import dagster as dg
import pyarrow as pa

from bucket_assets.core.atomic import remove_stale_temps
from bucket_assets.core.db import replace_partitions, table_exists
from bucket_assets.core.parallel import resolve_workers
from bucket_assets.core.failpoints import failpoint
from bucket_assets.core.progress import Progress
from bucket_assets.core.processing import (
    JOURNAL_NAME,
    Journal,
    RenderParams,
    RenderTask,
    close_store_packs,
    compact,
    is_pack,
    journal_path,
    needs_compaction,
    read_journal,
    record_present,
    store_dir,
)
from bucket_assets.defs.assets.assignment import bucket_assignments
from bucket_assets.defs.metadata import md_counts
from bucket_assets.defs.resources import ComputeResource, DatasetResource

PROCESSED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()), ("bucket_id", pa.string()), ("key", pa.string()), ("path", pa.string()),
        ("pack_offset", pa.int64()), ("fingerprint", pa.string()), ("status", pa.string()), ("error", pa.string()), ("bytes", pa.int64()),
        ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("subsampling", pa.int8()),
    ]
)


def processed_images_asset(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name="processed_images",
        group_name="images",
        deps=[bucket_assignments],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"torch", "pillow"},
    )
    def processed_images(
        context: dg.AssetExecutionContext, dataset: DatasetResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        """Each planned sample of the bucket rendered once to its final JPEG bytes in the store
        (append-only packs under `work_dir/processed/<bucket>/`); unchanged samples are not
        rendered again."""
        spec = dataset.load()
        buckets = list(context.partition_keys)
        params = RenderParams(
            spec.image.mode, spec.image.jpeg.quality, spec.image.jpeg.subsampling,
            spec.image.jpeg.adaptive_threshold, spec.image.max_pixels,
            spec.filters.blank_std_threshold if spec.filters.drop_blank else None,
            spec.image.dct_downscale,
        )
        with dataset.db() as con:
            plan = con.execute(
                """SELECT a.image_id, a.bucket_id, a.key, r.sha256, r.location, r.member, r.data_offset,
                          r.byte_size, a.scale, a.resized_w, a.resized_h, a.crop_left, a.crop_top,
                          a.target_w, a.target_h, r.orientation, r.width, r.height
                   FROM bucket_assignments a
                   JOIN filtered_images f ON f.image_id = a.image_id AND f.decision = 'keep'
                   JOIN raw_index r ON r.row_id = f.row_id
                   WHERE a.status = 'ok' AND list_contains(?, a.bucket_id)
                   ORDER BY a.bucket_id, a.key""",
                [buckets],
            ).fetchall()
            previous = {}
            if table_exists(con, "processed_images"):
                for row in con.execute(
                    "SELECT * FROM processed_images WHERE list_contains(?, bucket_id)", [buckets]
                ).to_arrow_table().to_pylist():
                    previous[(row["bucket_id"], row["key"])] = row
        for b in buckets:  # rows a killed run finished but never recorded in the DB
            for key, row in read_journal(journal_path(spec.processed_dir, b)).items():
                previous[(b, key)] = row
        tasks = [
            RenderTask(*row[:15], store_dir=store_dir(spec.processed_dir, row[1]), params=params,
                       orientation=row[15], src_w=row[16], src_h=row[17], store_token=context.run.run_id)
            for row in plan
        ]
        results: dict[int, dict] = {}
        todo = []
        pack_sizes: dict[str, int] = {}
        for i, t in enumerate(tasks):
            prev = previous.get((t.bucket_id, t.key))
            if prev and prev["fingerprint"] == t.fingerprint() and (
                prev["status"] != "ok" or record_present(prev["path"], prev.get("pack_offset"), prev["bytes"], pack_sizes)
            ):
                results[i] = prev
            else:
                todo.append(i)
        workers = resolve_workers(spec.image.workers)
        context.log.info(f"{len(tasks)} samples in {len(buckets)} bucket(s); rendering {len(todo)}, reusing {len(tasks) - len(todo)} ({workers} workers)")
        journal = Journal(spec.processed_dir)
        progress = Progress("processed_images: images rendered", len(todo), context.log.info)
        try:
            for i, res in zip(todo, compute.engine(workers).map("render", [tasks[i] for i in todo])):
                results[i] = res
                journal.append(res)
                failpoint("rendered")
                progress.advance()
        finally:
            journal.close()
            close_store_packs()
        progress.close()
        rows = _compact(spec.processed_dir, buckets, [results[i] for i in range(len(tasks))])
        with dataset.db() as con:
            replace_partitions(con, "processed_images", pa.Table.from_pylist(rows, schema=PROCESSED_SCHEMA), buckets)
        for b in buckets:
            journal_path(spec.processed_dir, b).unlink(missing_ok=True)
        _prune_store(spec.processed_dir, buckets, {r["path"] for r in rows if r["status"] == "ok"})
        rendered = {tasks[i].bucket_id for i in todo}
        per_bucket: dict[str, dict[str, int]] = {b: {} for b in buckets}
        for r in rows:
            st = per_bucket[r["bucket_id"]]
            st[r["status"]] = st.get(r["status"], 0) + 1
        n_rendered: dict[str, int] = {}
        for i in todo:
            n_rendered[tasks[i].bucket_id] = n_rendered.get(tasks[i].bucket_id, 0) + 1
        # Each partition's materialization carries its own numbers; what is run-wide says so.
        for b in buckets:
            n = sum(per_bucket[b].values())
            context.add_asset_metadata(
                {"samples": n, "rendered": n_rendered.get(b, 0), "reused": n - n_rendered.get(b, 0),
                 "statuses": md_counts(sorted(per_bucket[b].items())),
                 "status": f"{n:,} samples" if n else "empty: no sample is assigned to this bucket"},
                partition_key=b,
            )
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        return dg.MaterializeResult(
            metadata={
                "run_samples": len(rows),
                "run_rendered": len(todo),
                "run_reused": len(tasks) - len(todo),
                "run_buckets_rendered": len(rendered),
                "run_statuses": md_counts(sorted(statuses.items())),
            }
        )

    return processed_images


def _compact(processed_dir: Path, buckets: list[str], rows: list[dict]) -> list[dict]:
    """Rows with the records of buckets whose packs are mostly garbage (or too many) moved
    into one new pack each."""
    by_bucket: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_bucket.setdefault(r["bucket_id"], []).append(i)
    out = list(rows)
    for b in buckets:
        d = Path(processed_dir) / b
        if not d.is_dir():
            continue
        packs = {str(p): p.stat().st_size for p in d.iterdir() if is_pack(p.name)}
        idx = by_bucket.get(b, [])
        mine = [rows[i] for i in idx]
        if packs and needs_compaction(mine, packs):
            for i, r in zip(idx, compact(str(d), mine)):
                out[i] = r
    return out


def _prune_store(processed_dir: Path, buckets: list[str], keep: set[str]) -> None:
    """Remove the packs (and any older per-image files) of these buckets that no committed row
    references."""
    for b in buckets:
        d = Path(processed_dir) / b
        if not d.is_dir():
            continue
        remove_stale_temps(d)
        for p in d.iterdir():
            if str(p) not in keep and p.name != JOURNAL_NAME:
                p.unlink()
        if not any(d.iterdir()):
            d.rmdir()
