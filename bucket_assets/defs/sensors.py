"""Sensors that keep an export fresh when caption sources land.

1. `caption_landing_sensor` watches `captions.landing_dir`. A complete pair (`<name>.parquet` +
   `<name>.json`) whose content is not what the caption table holds is validated; a bad one is
   moved to `<landing_dir>/rejected/` with `<name>.reason.txt`; good ones trigger one run of
   `caption_table` + `selected_captions`.
2. `caption_change_sensor` sees that run's `selected_captions` materialization, asks the
   metadata DB which buckets' written captions now differ, and requests `bucket_shards` for
   exactly those partitions (stored JPEG bytes, nothing decoded or encoded); when they have all
   finished it requests `export_manifest` + `dataset_card`.

Every run carries tags saying why it happened; the UI also shows the sensor that launched it.
"""

import hashlib
import json
import os
import stat
from pathlib import Path

import dagster as dg
import duckdb

from bucket_assets.core.captions import (
    CaptionSourceError,
    VariantNotSelected,
    changed_buckets,
    check_landing_captions,
    discover_landing,
    landing_captions_sql,
    landing_file_stat,
    landing_fingerprint,
    landing_query,
    load_landing_source,
    scan_path,
    printable,
)
from bucket_assets.core.db import table_exists
from bucket_assets.defs.resources import DatasetResource

UPDATE_TAG = "bucket_assets/caption_update"
SOURCES_TAG = "bucket_assets/caption_sources"
REASON_TAG = "bucket_assets/reason"
SHARDS_TAG = "bucket_assets/reshard"
REJECTED_DIR = "rejected"


def reject_source(landing_dir: str, name: str, parquet: Path, meta: Path, reason: str) -> Path:
    """Move a bad pair aside with its reason; the json goes first so the pair is never half-complete.
    Entries of any kind move (a directory, FIFO or dangling symlink too, never opened); where
    rejected/ already holds that name and os.replace cannot overwrite it (a directory on
    either side), the entry gets a numbered name."""
    dest = Path(landing_dir) / REJECTED_DIR
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{name}.reason.txt").write_text(reason + "\n", encoding="utf-8", errors="backslashreplace")
    for p in (meta, parquet):
        if not os.path.lexists(p):
            continue
        target, n = dest / p.name, 0
        while os.path.lexists(target) and (_is_dir(p) or _is_dir(target)):
            n += 1
            target = dest / f"{p.name}.{n}"
        os.replace(p, target)
    return dest


def _is_dir(p: Path) -> bool:
    return stat.S_ISDIR(os.lstat(p).st_mode)


def _reject(context: dg.SensorEvaluationContext, landing_dir: str, name: str, parquet: Path, meta: Path, reason: str) -> None:
    try:
        dest = reject_source(landing_dir, name, parquet, meta, reason)
    except OSError as exc:  # the pair stays and is tried again next tick; the other sources go on
        context.log.error(f"rejected {printable(name)}: {reason} (could not move it to {REJECTED_DIR}/: {exc})")
        return
    context.log.error(f"rejected {printable(name)}: {reason} (moved to {dest})")


def _registered(dataset: DatasetResource) -> dict[str, str]:
    """Landing sources the caption table was last built from: name -> fingerprint."""
    spec = dataset.load()
    if not spec.db_path.exists():
        return {}
    with dataset.db() as con:
        if not table_exists(con, "caption_sources"):
            return {}
        return dict(con.execute("SELECT name, fingerprint FROM caption_sources WHERE kind = 'landing'").fetchall())


def _validate(dataset: DatasetResource, name: str, parquet: Path, meta: Path) -> tuple[int, int]:
    """Validate a landing pair; returns (unknown image ids, captions). CaptionSourceError if bad."""
    spec = dataset.load()
    sel, cap = spec.captions.selectors, spec.captions.max_chars
    if not spec.db_path.exists():
        with duckdb.connect() as con:  # no build yet: nothing to compare ids with
            src = load_landing_source(con, name, parquet, meta, sel, cap)
            return 0, check_landing_captions(con, src, cap)
    with dataset.db() as con:
        src = load_landing_source(con, name, parquet, meta, sel, cap)
        if not table_exists(con, "raw_index"):
            return 0, check_landing_captions(con, src, cap)
        unknown, total = landing_query(
            con, src,
            f"""SELECT count(*) FILTER (WHERE image_id NOT IN (SELECT image_id FROM raw_index)), count(*)
                FROM ({landing_captions_sql(con, src)})""",
            {"path": scan_path(src), "max_chars": cap},
            fetch=lambda r: r.fetchone(),
        )
    return int(unknown), int(total)


@dg.sensor(
    name="caption_landing_sensor",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=["caption_table", "selected_captions"],
    description="Registers new or changed caption sources in captions.landing_dir and rebuilds the caption selection; rejects bad ones.",
)
def caption_landing_sensor(context: dg.SensorEvaluationContext, dataset: DatasetResource):
    spec = dataset.load()
    landing_dir = spec.captions.landing_dir
    # Cursor: per file stat -> fingerprint cache, so unchanged files are not re-hashed each tick.
    cache: dict = json.loads(context.cursor) if context.cursor else {}
    registered = _registered(dataset)
    new_cache, changed, present = {}, [], set()
    unselected = "unselected:" + hashlib.sha256(json.dumps(list(spec.captions.selectors)).encode()).hexdigest()[:16]
    try:
        pairs = discover_landing(landing_dir)
    except CaptionSourceError as exc:  # the directory itself: skip, rather than see every source removed
        return dg.SensorResult(skip_reason=str(exc), cursor=context.cursor)
    for name, parquet, meta in pairs:
        # Every step below raises only CaptionSourceError for whatever the files are or hold,
        # so one bad pair is set aside and the others still go into this tick's run.
        try:
            st = (landing_file_stat(name, parquet), landing_file_stat(name, meta))
            stat_key = f"{st[0].st_size}:{st[0].st_mtime_ns}:{st[1].st_size}:{st[1].st_mtime_ns}"
            cached = cache.get(name)
            fp = cached[1] if cached and cached[0] == stat_key else landing_fingerprint(parquet, meta)
            if registered.get(name) == fp:
                new_cache[name] = [stat_key, fp]
                present.add(name)
                continue
            if cached and cached[:2] == [stat_key, fp] and len(cached) > 2 and cached[2] == unselected:
                new_cache[name] = cached  # still a variant no selector names; said once
                continue
            if cached and cached[1] == fp and cached[0] == stat_key and len(cached) > 2 and cached[2] == "validated":
                # Already validated and requested; the run has not registered it yet.
                new_cache[name] = cached
                present.add(name)
                changed.append((name, fp))
                continue
            unknown, total = _validate(dataset, name, parquet, meta)
            if total and unknown == total:
                raise CaptionSourceError(f"caption source {printable(name)}: none of its {total} image ids is in the raw index")
        except VariantNotSelected as exc:
            # Not a bad file: a selector added (or a misspelled one fixed) makes it count. Left
            # where it is; the next build lists it as rejected, with this reason.
            context.log.warning(f"{exc}; left in {landing_dir}: name its variant in captions.selectors to use it")
            new_cache[name] = [stat_key, fp, unselected]
            continue
        except CaptionSourceError as exc:
            _reject(context, landing_dir, name, parquet, meta, str(exc))
            continue
        if unknown:
            context.log.warning(f"caption source {name}: {unknown} of {total} image ids are not in the raw index")
        context.log.info(f"caption source {name} is new or changed ({total} captions)")
        new_cache[name] = [stat_key, fp, "validated"]
        present.add(name)
        changed.append((name, fp))
    removed = sorted(set(registered) - present)
    for name in removed:
        context.log.info(f"caption source {name} was removed from {landing_dir}")
    if not changed and not removed:
        return dg.SensorResult(skip_reason="no new caption sources", cursor=json.dumps(new_cache, sort_keys=True))
    key = hashlib.sha256(json.dumps([sorted(changed), removed]).encode()).hexdigest()[:16]
    names = [n for n, _ in sorted(changed)]
    why = "; ".join(
        ([f"new or changed caption source(s): {', '.join(names)}"] if names else [])
        + ([f"removed: {', '.join(removed)}"] if removed else [])
    )
    request = dg.RunRequest(
        run_key=f"captions-{key}",
        asset_selection=[dg.AssetKey("caption_table"), dg.AssetKey("selected_captions")],
        tags={UPDATE_TAG: key, SOURCES_TAG: ",".join(names + removed)[:200], REASON_TAG: why[:200]},
    )
    return dg.SensorResult(run_requests=[request], cursor=json.dumps(new_cache, sort_keys=True))


@dg.sensor(
    name="caption_change_sensor",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=["bucket_shards", "export_manifest", "dataset_card"],
    description="After the caption selection changes, re-shards exactly the buckets whose captions changed, then refreshes the manifest and card.",
)
def caption_change_sensor(context: dg.SensorEvaluationContext, dataset: DatasetResource):
    state = json.loads(context.cursor) if context.cursor else {"last": 0, "pending": None}
    instance = context.instance
    requests: list[dg.RunRequest] = []
    export_keys = [dg.AssetKey("export_manifest"), dg.AssetKey("dataset_card")]

    pending = state.get("pending")
    if pending:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={SHARDS_TAG: pending["id"]}))
        if len(runs) < pending["runs"] or any(not r.is_finished for r in runs):
            return dg.SensorResult(skip_reason=f"waiting for {pending['runs']} re-shard run(s)", cursor=json.dumps(state))
        failed = [r.run_id for r in runs if r.status != dg.DagsterRunStatus.SUCCESS]
        if failed:
            context.log.error(f"re-shard run(s) failed: {failed}; refreshing the manifest from what is on disk")
        requests.append(
            dg.RunRequest(
                run_key=f"export-{pending['id']}",
                asset_selection=export_keys,
                tags={UPDATE_TAG: pending["id"], REASON_TAG: f"re-sharded {pending['runs']} bucket(s)"},
            )
        )
        state["pending"] = None

    records = instance.fetch_materializations(dg.AssetKey("selected_captions"), limit=1).records
    record = records[0] if records else None
    if record is not None and record.storage_id > state.get("last", 0) and state.get("pending") is None:
        state["last"] = record.storage_id
        run = instance.get_run_by_id(record.run_id)
        # A whole-job run (bucket-assets build) or one that also wrote shards is already consistent.
        in_full_build = run is not None and (
            not run.asset_selection or dg.AssetKey("bucket_shards") in run.asset_selection
        )
        if run is not None and not in_full_build:
            update = run.tags.get(UPDATE_TAG, run.run_id[:16])
            with dataset.db() as con:
                buckets = changed_buckets(con) if table_exists(con, "shard_samples") else []
            context.log.info(f"caption selection {update} changes {len(buckets)} bucket(s): {buckets}")
            if buckets:
                for b in buckets:
                    requests.append(
                        dg.RunRequest(
                            run_key=f"reshard-{update}-{b}",
                            partition_key=b,
                            asset_selection=[dg.AssetKey("bucket_shards")],
                            tags={UPDATE_TAG: update, SHARDS_TAG: update, REASON_TAG: f"captions changed in {b}"},
                        )
                    )
                state["pending"] = {"id": update, "runs": len(buckets)}
            else:
                requests.append(
                    dg.RunRequest(
                        run_key=f"export-{update}",
                        asset_selection=export_keys,
                        tags={UPDATE_TAG: update, REASON_TAG: "caption sources changed; no bucket's captions did"},
                    )
                )
    if not requests:
        return dg.SensorResult(skip_reason="no caption selection change", cursor=json.dumps(state))
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(state))
