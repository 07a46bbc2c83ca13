"""`bucket-assets`: build an export through Dagster, verify an export, write the sample dataset."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from bucket_assets.spec import SPEC_ENV_VAR, SpecError, check_paths, load_spec, resolve_spec_path


def _fail(msg: str, code: int = 2) -> int:
    print(f"bucket-assets: {msg.splitlines()[0] if msg else 'failed'}", file=sys.stderr)
    return code


# The project's dagster.yaml (a test keeps the two equal): the instance settings, and where the
# instance of DAGSTER_HOME=<project root> stores everything (.dagster_home/, relative paths).
DEFAULT_INSTANCE_YAML = """\
storage:
  sqlite:
    base_dir: .dagster_home
local_artifact_storage:
  module: dagster._core.storage.root
  class: LocalArtifactStorage
  config:
    base_dir: .dagster_home
compute_logs:
  module: dagster._core.storage.local_compute_log_manager
  class: LocalComputeLogManager
  config:
    base_dir: .dagster_home/storage
telemetry:
  enabled: false
nux:
  enabled: false
run_queue:
  max_concurrent_runs: 2
  tag_concurrency_limits:
    - key: dagster/code_location
      value:
        applyLimitPerUniqueValue: true
      limit: 1
"""

# Keys of an instance config that say where the instance stores things: a seeded home keeps its
# storage in itself (Dagster's defaults), whatever the file it was seeded from says.
_STORAGE_KEYS = ("storage", "run_storage", "event_log_storage", "schedule_storage", "compute_logs",
                 "local_artifact_storage")


def _instance_config(path: Path) -> dict:
    import yaml

    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _relative_storage_dirs(config: dict) -> list[str]:
    """The base_dir values of `config` that are relative paths (resolved against the cwd)."""
    out = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "base_dir" and isinstance(value, str) and not os.path.isabs(value):
                    out.append(value)
                else:
                    walk(value)

    for key in _STORAGE_KEYS:
        walk(config.get(key))
    return out


def ensure_dagster_home() -> Path:
    """The Dagster instance the build records in (and sets as $DAGSTER_HOME):

    - $DAGSTER_HOME when set; a home without dagster.yaml is seeded with the settings of
      ./dagster.yaml or, when the home is new, the project's (DEFAULT_INSTANCE_YAML), never with
      storage paths;
    - else the cwd when ./dagster.yaml says where its storage goes (the project root: storage in
      ./.dagster_home, the instance the README's `DAGSTER_HOME=$PWD dg dev` shows);
    - else ./.dagster_home, seeded as above.

    A home whose config keeps storage at relative paths is used only from that directory, so
    every process finds the same files (else a one-line error, exit 2)."""
    import yaml

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        if _relative_storage_dirs(_instance_config(Path("dagster.yaml"))):
            home = str(Path.cwd())
        else:
            home = str(Path.cwd() / ".dagster_home")
        os.environ["DAGSTER_HOME"] = home
    p = Path(home)
    created = not p.exists()
    p.mkdir(parents=True, exist_ok=True)
    target = p / "dagster.yaml"
    if not target.exists():
        if Path("dagster.yaml").is_file():
            settings = _instance_config(Path("dagster.yaml"))
        elif created:
            # A home we just made gets the project's instance settings (as in ./dagster.yaml).
            settings = yaml.safe_load(DEFAULT_INSTANCE_YAML)
        else:
            return p
        text = yaml.safe_dump({k: v for k, v in settings.items() if k not in _STORAGE_KEYS},
                              sort_keys=False).encode()
        # Whole or not at all: a build of another spec may be opening this home right now.
        tmp = p / f".dagster.yaml.{os.getpid()}.tmp"
        tmp.write_bytes(text)
        os.replace(tmp, target)
    relative = _relative_storage_dirs(_instance_config(target))
    if relative and Path.cwd().resolve() != p.resolve():
        raise SystemExit(_fail(
            f"DAGSTER_HOME={home} keeps its storage at paths relative to the directory commands run in "
            f"({', '.join(relative)}): run bucket-assets build in {home}, or give another DAGSTER_HOME"))
    return p


def _failed_checks(result) -> list[str]:
    """'name: its own message' of every failed asset check of the run with ERROR severity (a
    WARN check's finding reaches the console as a warning, from the manifest)."""
    import dagster as dg

    out = []
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            data = event.event_specific_data
            if not data.passed and data.severity != dg.AssetCheckSeverity.WARN:
                desc = (getattr(data, "description", None) or "").strip()
                out.append(f"{data.check_name}: {desc.splitlines()[0]}" if desc else data.check_name)
    return out


def _first_error(result) -> str:
    checks = _failed_checks(result)
    for event in result.all_events:
        if event.is_step_failure or event.event_type_value == "RUN_FAILURE":
            err = event.event_specific_data and getattr(event.event_specific_data, "error", None)
            if err is not None:
                cause = err
                while getattr(cause, "cause", None) is not None:
                    cause = cause.cause
                message = re.sub(r"^(?:[A-Za-z_]\w*\.)+(\w+: )", r"\1", cause.message.strip().splitlines()[0])
                if "blocking asset check" in message and checks:
                    # Dagster's own line ends at "...failed with ERROR severity:"; say which and why.
                    message = f"{message.rstrip(': ')}: {'; '.join(checks)}"
                return f"{event.step_key or 'run'}: {message}"
            return event.message or "run failed"
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            data = event.event_specific_data
            if not data.passed and data.check_name in {c.split(":")[0] for c in checks}:
                return f"check {data.check_name} failed: {data.description or ''}"
    return "run failed"


def _progress_listener(stream, interval: float = 5.0):
    """A tqdm bar per stage on a terminal; elsewhere (CI logs, pipes) a plain line every
    `interval` seconds and one when the stage ends."""
    import time

    state: dict = {"stage": None, "bar": None, "last": 0.0}
    tty = stream.isatty()

    def listen(stage: str, done: int, total: int) -> None:
        if stage != state["stage"]:
            if state["bar"] is not None:
                state["bar"].close()
            state.update(stage=stage, bar=None, last=time.monotonic())
            if tty:
                from tqdm import tqdm

                state["bar"] = tqdm(total=total, desc=stage, unit="item", file=stream, leave=False, dynamic_ncols=True)
        if state["bar"] is not None:
            state["bar"].n = done
            state["bar"].refresh()
            if done >= total:
                state["bar"].close()
                state["bar"] = None
            return
        now = time.monotonic()
        if total and (done >= total or now - state["last"] >= interval) and done > 0:
            state["last"] = now
            print(f"{stage}: {done}/{total} ({100 * done // total}%)", file=stream, flush=True)

    return listen


def cmd_build(args: argparse.Namespace) -> int:
    spec_path = resolve_spec_path(args.spec)
    os.environ[SPEC_ENV_VAR] = spec_path  # the definitions module reads its spec from here
    try:
        from bucket_assets.definitions import OUTPUT_DIR_ENV, WORK_DIR_ENV
        from bucket_assets.defs.resources import DatasetResource

        # The dirs the build will really use ($BUCKET_ASSETS_OUTPUT_DIR / _WORK_DIR replace the
        # spec's), so an overlap with an input is refused before any work.
        spec = DatasetResource(spec_path=spec_path, output_dir=os.environ.get(OUTPUT_DIR_ENV) or None,
                               work_dir=os.environ.get(WORK_DIR_ENV) or None).load()
        check_paths(spec)
    except SpecError as exc:
        return _fail(str(exc))

    from bucket_assets import definitions
    from bucket_assets.core.buildlock import BuildLock, BuildLockBusy

    # One build per work_dir at a time (two would prune each other's store packs), decided before
    # anything is touched: the Dagster instance, the output dir, the metadata DB.
    lock = BuildLock(definitions.dataset_resource(spec_path).load().work_dir)
    try:
        lock.acquire()
    except BuildLockBusy as exc:
        return _fail(str(exc), 1)
    except OSError as exc:
        return _fail(f"cannot take the build lock {lock.path}: {exc.strerror or exc}")
    try:
        return _build(args, spec, spec_path)
    finally:
        lock.release()


def _build(args: argparse.Namespace, spec, spec_path: str) -> int:
    """The build itself; the caller holds the spec's build lock."""
    import dagster as dg

    from bucket_assets import definitions
    from bucket_assets.core.buckets import bucket_table
    from bucket_assets.core.buildlock import instance_creation_lock
    from bucket_assets.core.publish import output_dir_problem

    problem = output_dir_problem(definitions.dataset_resource(spec_path).load().output_dir)
    if problem:
        return _fail(problem)

    home = ensure_dagster_home()

    from bucket_assets.core import progress

    progress.set_listener(_progress_listener(sys.stderr))
    ids = [b.id for b in bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible)]
    tags = {"dagster/asset_partition_range_start": ids[0], "dagster/asset_partition_range_end": ids[-1]}
    with instance_creation_lock(home):
        instance = dg.DagsterInstance.get()
    with instance:
        # The full event log lives in the instance (and the UI); the console gets it only with -v.
        level = "DEBUG" if args.verbose else "CRITICAL"
        result = dg.execute_job(
            dg.reconstructable(definitions.build_job),
            instance=instance,
            tags=tags,
            run_config={"loggers": {"console": {"config": {"log_level": level}}}},
        )
        ok = result.success
        failed_checks = _failed_checks(result)
        if not ok:
            return _fail(f"build failed: {_first_error(result)} (run {result.run_id}, DAGSTER_HOME={home})", 1)
        if failed_checks:
            return _fail(f"build finished but checks failed: {', '.join(failed_checks)} (run {result.run_id})", 1)
    out_dir = definitions.dataset_resource(spec_path).load().output_dir
    print(f"built {out_dir} (run {result.run_id}; DAGSTER_HOME={home})")
    return _report(out_dir, args.strict)


def _report(out_dir: str, strict: bool) -> int:
    """The build's summary from the manifest it published; its warnings last, on stderr too.
    With --strict a warning fails the build (exit 1)."""
    from bucket_assets.core.accounting import build_report
    from bucket_assets.core.publish import read_manifest

    manifest = read_manifest(Path(out_dir) / "manifest.json")
    if manifest is None:
        return _fail(f"build finished but {out_dir}/manifest.json is unreadable", 1)
    for line in build_report(manifest):
        print(f"  {line}")
    warnings = manifest.get("warnings") or []
    for w in warnings:
        print(f"bucket-assets: warning: {w}", file=sys.stderr)
    if warnings and strict:
        return _fail(f"{len(warnings)} warning(s) and --strict: failing the build", 1)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from bucket_assets.core.manifest import VerifyError, verify_export

    try:
        rep = verify_export(args.export_dir)
    except VerifyError as exc:
        return _fail(f"verify failed: {exc}", 1)
    print(f"ok: {rep.buckets} buckets, {rep.shards} shards, {rep.samples} samples")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from bucket_assets.sample import generate

    counts = generate(args.root)
    print("wrote sample data under " + args.root + ": " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bucket-assets", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="materialize every asset and bucket partition through Dagster")
    b.add_argument("--spec", help=f"spec YAML (default ${SPEC_ENV_VAR} or data/spec.yaml)")
    b.add_argument("-v", "--verbose", action="store_true", help="print Dagster's event log to the console")
    b.add_argument("--strict", action="store_true",
                   help="exit 1 when the build has warnings (a selector matching no caption variant, a rejected caption source)")
    b.set_defaults(fn=cmd_build)
    v = sub.add_parser("verify", help="check an export against its manifest")
    v.add_argument("export_dir")
    v.set_defaults(fn=cmd_verify)
    s = sub.add_parser("sample", help="write the sample dataset (raw sources + caption sources)")
    s.add_argument("--root", default="data")
    s.set_defaults(fn=cmd_sample)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
