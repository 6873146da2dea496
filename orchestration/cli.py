"""The `corpus` command. `run` goes through Dagster (runs show in the UI); the rest read the lake directly."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import functools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpus.config import ManifestError, load_manifest
from corpus.lake import LakeError
from corpus.metrics import MetricsError
from orchestration.resources import (
    ENV_LAKE,
    ENV_SOURCES,
    REPO_ROOT,
    LakePaths,
    default_lake,
    default_sources,
    lake_path,
)

DAGSTER_YAML = "telemetry:\n  enabled: false\n"
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
CLI_TAGS = {"corpus/cli": "run"}
PARTITION_TAG = "dagster/partition"


class CliError(RuntimeError):
    """A user-facing failure: printed as one line, exit status 1."""


@contextlib.contextmanager
def run_lock(lake: Path, wait: bool) -> Iterator[None]:
    """One `corpus run` per lake at a time: a second one waits (--wait) or fails clearly."""
    lake.mkdir(parents=True, exist_ok=True)
    path = lake / ".run.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise CliError(
                f"another `corpus run` (pid {holder}) is writing to {lake}; wait for it or pass --wait"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_library_noise(warning: warnings.WarningMessage) -> bool:
    """Deprecation chatter from Dagster and friends; the pipeline's own warnings are shown."""
    return issubclass(warning.category, DeprecationWarning) or "dagster" in warning.filename


def _failure_message(result: object) -> str:
    lines = []
    for event in getattr(result, "all_events", []):
        if event.is_step_failure and event.step_failure_data is not None:
            error = event.step_failure_data.error
            message = error.message.strip() if error else "unknown error"
            if error and error.cause:
                message += f" (cause: {error.cause.message.strip()})"
            lines.append(f"{event.step_key}: {message}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            check = event.event_specific_data
            if check is not None and not check.passed:  # the step failure names it only; say why
                values = ", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in (check.metadata or {}).items())
                why = check.description or values
                lines.append(f"check {check.check_name} on {check.asset_key.to_user_string()} failed: {why}")
    return "\n".join(lines) or "run failed (see the Dagster UI for the event log)"


@dataclass(frozen=True)
class StepOutcome:
    """One Dagster run of a phase (for one source partition when the phase is partitioned)."""

    label: str
    ok: bool
    seconds: float
    run_id: str | None = None
    message: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


@functools.cache
def _definitions() -> Any:
    """This process's Definitions, built once from $CORPUS_SOURCES / $CORPUS_LAKE (set by cmd_run)."""
    from orchestration.definitions import build_definitions

    return build_definitions()


def execute_step(job: str, key: str | None) -> StepOutcome:
    """Run phase `job` (for partition `key`) as one Dagster run in this process's instance ($DAGSTER_HOME).

    With the default in_process executor the run executes here (`execute_in_process`); any other
    $CORPUS_EXECUTOR goes through `execute_job` on the job reconstructed from orchestration.definitions,
    so its steps can run in other processes (multiprocess) or on other machines (celery, k8s).
    """
    import dagster as dg

    from orchestration.definitions import executor_name

    label = job + (f"[{key}]" if key else "")
    t0 = time.monotonic()
    with dg.DagsterInstance.get() as instance, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if executor_name() == "in_process":
            result: Any = (
                _definitions()
                .resolve_job_def(job)
                .execute_in_process(
                    instance=instance, partition_key=key, run_config=QUIET, raise_on_error=False, tags=CLI_TAGS
                )
            )
        else:
            from dagster._core.definitions.reconstruct import ReconstructableRepository

            repository = ReconstructableRepository.for_module(
                "orchestration.definitions", "load_definitions", working_directory=str(REPO_ROOT)
            )
            tags = {**CLI_TAGS, **({PARTITION_TAG: key} if key else {})}
            result = dg.execute_job(
                repository.get_reconstructable_job(job), instance, run_config=QUIET, tags=tags, raise_on_error=False
            )
        message = "" if result.success else _failure_message(result)
    notes = tuple(dict.fromkeys(str(w.message) for w in caught if not _is_library_noise(w)))
    seconds = time.monotonic() - t0
    return StepOutcome(label, bool(result.success), seconds, result.run_id, message, notes)


def _die_with_parent(parent: int) -> None:
    """Worker start-up: exit when the `corpus run` that started this worker dies, even by SIGKILL.

    A worker that outlived its parent would keep writing into a lake whose run lock is already free.
    PR_SET_PDEATHSIG covers Linux; the watchdog thread covers the rest (and a reparented worker).
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="corpus-parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def default_workers() -> int:
    """The CPUs this process may use (its affinity mask, e.g. under taskset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class Progress:
    """The `[n/N] label description ... seconds` lines of `corpus run`, one per Dagster run."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def head(self, label: str, description: str) -> str:
        return f"[{self.done + 1}/{self.total}] {label:<24} {description} ..."

    def start(self, label: str, description: str) -> None:
        # One run at a time: its line shows before it starts, so a slow or stuck run shows where it is.
        print(self.head(label, description), end="", flush=True)

    def finish(self, outcome: StepOutcome, description: str, started: bool) -> None:
        status = f" {outcome.seconds:6.1f} s" if outcome.ok else " FAILED"
        print(status if started else self.head(outcome.label, description) + status, flush=True)
        for note in outcome.notes:
            print(f"      warning: {note}")
        self.done += 1


class StepRunner:
    """Runs the phases' Dagster runs: in this process, or a partitioned phase's runs side by side in workers.

    Each worker is a spawned process with its own Dagster run per partition, all sharing one Dagster
    instance (SQLite storage under the lake's DAGSTER_HOME; each run has its own event-log database and
    SQLite serialises the writes to the shared ones). Workers live for the whole `corpus run`, so Python,
    Dagster and the asset modules are imported once per worker, not once per partition.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> StepRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _pool(self, size: int) -> ProcessPoolExecutor:
        if self.pool is None:
            context = multiprocessing.get_context("spawn")  # never fork a process that holds Dagster/DuckDB state
            self.pool = ProcessPoolExecutor(
                max_workers=size, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),)
            )
        return self.pool

    def run(
        self, job: str, keys: Sequence[str | None], on_start: Callable[[str], None] | None = None
    ) -> Iterator[StepOutcome]:
        """The outcomes of `job` for each of `keys`, as they finish.

        With several keys and workers, at most `workers` runs go at once. On the first failure no further
        run starts; runs already going finish (each commits its versions whole or not at all), then every
        failure is reported. One run at a time, `on_start(label)` is called before each.
        """
        if self.workers <= 1 or len(keys) <= 1:
            for key in keys:
                if on_start is not None:
                    on_start(job + (f"[{key}]" if key else ""))
                outcome = execute_step(job, key)
                yield outcome
                if not outcome.ok:
                    return
            return
        pool = self._pool(min(self.workers, len(keys)))
        pending: dict[Future[StepOutcome], str | None] = {pool.submit(execute_step, job, key): key for key in keys}
        failed = False
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                label = job + (f"[{key}]" if key else "")
                if future.cancelled():
                    continue
                try:
                    outcome = future.result()
                except BrokenProcessPool as exc:
                    outcome = StepOutcome(label, False, 0.0, message=f"{label}: its worker process died ({exc})")
                except Exception as exc:  # raised in the worker outside the run, e.g. a bad $CORPUS_EXECUTOR
                    outcome = StepOutcome(label, False, 0.0, message=f"{label}: {type(exc).__name__}: {exc}")
                if not outcome.ok and not failed:
                    failed = True
                    for other in pending:
                        other.cancel()
                yield outcome


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """Set these environment variables (the run's Dagster home, manifest and lake: what Definitions loading
    and the worker processes read) for the block, then put back what was there, so that `main(["run", ...])`
    called in a process (tests, notebooks) leaves its environment as it found it."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cmd_run(args: argparse.Namespace) -> int:
    sources = Path(args.sources).expanduser().resolve() if args.sources else default_sources()
    lake = _lake(args)
    manifest = load_manifest(sources)  # a bad manifest fails here, before any work
    paths = LakePaths(lake)
    partitions = len(manifest.source_names)
    workers = min(args.workers or default_workers(), partitions)
    run_environ = {"DAGSTER_HOME": str(paths.dagster_home), ENV_SOURCES: str(sources), ENV_LAKE: str(lake)}
    with run_lock(lake, args.wait), scoped_environ(run_environ):
        paths.dagster_home.mkdir(parents=True, exist_ok=True)
        if not (paths.dagster_home / "dagster.yaml").exists():
            (paths.dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
        import dagster as dg

        from orchestration.definitions import PHASES, executor_name

        _definitions.cache_clear()  # this run's manifest and lake, not an earlier call's
        _definitions()  # a bad executor setting or asset graph fails here, before any run starts
        # Create the instance's storage here, once, before workers open it side by side.
        dg.DagsterInstance.get().get_runs(limit=1)
        started = time.monotonic()
        since = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)  # metrics timestamps are naive UTC
        print(
            f"corpus run: {partitions} sources from {sources}\n  lake: {lake}\n"
            f"  {workers} worker{'s' if workers > 1 else ''} for per-source phases, executor {executor_name()}"
        )
        progress = Progress(sum(partitions if phase.partitioned else 1 for phase in PHASES))
        with StepRunner(workers) as runner:
            for phase in PHASES:
                keys: list[str | None] = list(manifest.source_names) if phase.partitioned else [None]
                parallel = workers > 1 and len(keys) > 1
                if parallel:
                    print(f"      {phase.job}: {len(keys)} partitions, {min(workers, len(keys))} at a time", flush=True)
                failures: list[StepOutcome] = []
                announce = None if parallel else functools.partial(progress.start, description=phase.description)
                for outcome in runner.run(phase.job, keys, on_start=announce):
                    progress.finish(outcome, phase.description, started=not parallel)
                    if not outcome.ok:
                        failures.append(outcome)
                if failures:
                    heads = [f"{f.label} failed" + (f" (run {f.run_id})" if f.run_id else "") for f in failures]
                    details = [
                        f.message if f.message.startswith(f.label) else f"{f.label}: {f.message}" for f in failures
                    ]
                    raise CliError(f"{'; '.join(heads)}:\n" + "\n".join(details))
        print(f"done in {time.monotonic() - started:.1f} s")
        from corpus.lineage_export import emit_openlineage_quietly

        print(emit_openlineage_quietly(lake, since, {a: phase.job for phase in PHASES for a in phase.assets}))
    from corpus.report import build_report, format_summary

    print(format_summary(build_report(lake)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from corpus.report import build_report, format_report

    report = build_report(_lake(args))
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_report(report))
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    from corpus.report import iter_decoded_stream

    lake = _lake(args)
    try:
        for chunk in iter_decoded_stream(lake, args.split):
            sys.stdout.write(chunk)
        sys.stdout.flush()
    except BrokenPipeError:  # `corpus cat | head` is a normal way to read it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def _lake(args: argparse.Namespace) -> Path:
    """--lake (a path or file:// URL) or the default; another URL is refused naming what reads one."""
    if not args.lake:
        return default_lake()
    try:
        return lake_path(args.lake)
    except ValueError as exc:
        from corpus.remote import is_remote

        hint = (
            f"; `corpus {args.command}` works on a local lake (`corpus verify` reads a remote one, "
            f"`corpus pull {args.lake} --lake DIR` copies it here)"
            if is_remote(args.lake)
            else ""
        )
        raise CliError(f"--lake {exc}{hint}") from None


def cmd_verify(args: argparse.Namespace) -> int:
    from corpus.audit import verify
    from corpus.remote import is_remote, verify_remote

    on_problem = None if args.json else print  # printed as found: on a large lake the first shows long before the end
    if args.lake and is_remote(args.lake):
        if args.public_key or args.signature:
            raise CliError("--public-key is not supported for a remote lake yet: `corpus pull` it, then verify")
        result = verify_remote(args.lake, args.manifest, on_problem=on_problem)
    else:
        lake = _lake(args)
        target = Path(args.manifest).expanduser().resolve() if args.manifest else None
        key = Path(args.public_key).expanduser() if args.public_key else None
        signature = Path(args.signature).expanduser() if args.signature else None
        result = verify(lake, target, public_key=key, signature=signature, on_problem=on_problem)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        for what in result.not_checked:
            print(f"not checked: {what}")
        status = "OK" if result.ok else f"FAILED ({len(result.problems)} problems)"
        signed = f", signed by key {result.signed_by}" if result.signed_by else ""
        print(f"{status}: {result.versions} versions, {result.files} files, {result.bytes:,} bytes re-hashed{signed}")
        if result.merkle_root:
            print(f"release {result.release}, Merkle root {result.merkle_root}")
    return 0 if result.ok else 1


def cmd_push(args: argparse.Namespace) -> int:
    from corpus.remote import push_release

    lake = _lake(args)
    result = push_release(lake, args.to, args.manifest)
    print(result.summary("pushed", args.to))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from corpus.remote import pull_release

    lake = _lake(args)
    result = pull_release(args.url, lake)
    print(result.summary("pulled", str(lake)))
    print(f"now run `corpus verify --lake {lake}` for every check, structure included")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from corpus import audit

    lake = _lake(args)
    if args.kind == "sample":
        if len(args.args) != 2:
            raise CliError(
                "usage: corpus trace sample SHARD INDEX  "
                "(SHARD: train-00000.bin, packed:train or train/00000/tokens.npy)"
            )
        if args.replay:
            out = audit.replay_sample(lake, args.args[0], int(args.args[1]))
            print(json.dumps(out, indent=2, sort_keys=True, default=str))
            for change in out["raw_changed"]:
                print(
                    f"raw file {change['path']} changed since it was ingested: sha256 {change['now']}, "
                    f"ingested {change['ingested']}",
                    file=sys.stderr,
                )
            return 0 if out["ok"] else 1
        out = audit.trace_sample(lake, args.args[0], int(args.args[1]))
    elif args.kind == "document":
        if len(args.args) != 1:
            raise CliError("usage: corpus trace document DOC_ID")
        out = audit.trace_document(lake, args.args[0])
    else:
        if len(args.args) != 1:
            raise CliError("usage: corpus trace file PATH")
        out = audit.trace_file(lake, args.args[0])
    print(json.dumps(out, indent=2, sort_keys=True, default=str))
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from corpus import signing

    if args.generate_key:
        private, public, kid = signing.generate_keypair(Path(args.generate_key).expanduser())
        print(f"key {kid}: private key {private} (mode 0600, keep it secret), public key {public}")
        return 0
    if not args.key:
        raise CliError("usage: corpus sign [MANIFEST] --key PRIVATE_KEY.pem  (or --generate-key PATH)")
    lake = _lake(args)
    target = Path(args.manifest).expanduser().resolve() if args.manifest else None
    path, record = signing.sign_release(lake, Path(args.key).expanduser(), target)
    print(f"signed release {record['release']} (Merkle root {record['merkle_root']}) with key {record['key_id']}")
    print(f"signature: {path}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from corpus.diff import diff_releases, format_diff, resolve_release

    lake = _lake(args)
    out = diff_releases(resolve_release(args.old, lake), resolve_release(args.new, lake))
    print(json.dumps(out, indent=2, sort_keys=True) if args.json else format_diff(out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from corpus import lineage_export

    lake = _lake(args)
    out = Path(args.out).expanduser() if args.out else None
    if args.format == "openlineage":
        path, count = lineage_export.emit_openlineage(lake, out=out, parent_jobs=_phase_jobs())
        print(f"{count} OpenLineage run events appended to {path} (events already there are not repeated)")
    else:
        document = lineage_export.croissant(lake)
        # contentUrl values are relative to the lake root, so the default place makes the file loadable as is.
        path = out or lake / "croissant.json"
        path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        print(f"Croissant description of release {document['identifier']} written to {path}")
    return 0


def _phase_jobs() -> dict[str, str]:
    """asset -> the Dagster job (phase) that materializes it, for OpenLineage parent facets."""
    from orchestration.definitions import PHASES

    return {asset: phase.job for phase in PHASES for asset in phase.assets}


def cmd_gc(args: argparse.Namespace) -> int:
    from corpus.gc import collect, format_result

    lake = _lake(args)
    print(format_result(collect(lake, keep=args.keep, dry_run=args.dry_run)))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corpus", description="LLM training-data pipeline with provenance.")
    sub = parser.add_subparsers(dest="command", required=True)
    lake_help = "lake directory (default: $CORPUS_LAKE or data/lake)"

    run = sub.add_parser("run", help="materialize every asset through Dagster, with progress")
    run.add_argument("--sources", help="sources manifest (default: $CORPUS_SOURCES or data/sources.yaml)")
    run.add_argument("--lake", help=lake_help)
    run.add_argument("--wait", action="store_true", help="wait for another run on the same lake instead of failing")
    run.add_argument(
        "--workers",
        type=_positive_int,
        help="source partitions run side by side in per-source phases (default: usable CPUs, at most the "
        "number of sources; 1 = one after another in this process)",
    )
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="the latest run's figures, per stage")
    report.add_argument("--lake", help=lake_help)
    report.add_argument("--json", action="store_true", help="machine-readable JSON")
    report.set_defaults(func=cmd_report)

    cat = sub.add_parser("cat", help="the decoded training text, exactly what the model sees")
    cat.add_argument("--lake", help=lake_help)
    cat.add_argument("--split", choices=["train", "validation"], default="train")
    cat.set_defaults(func=cmd_cat)

    verify = sub.add_parser("verify", help="re-hash everything; exit non-zero on any mismatch")
    verify.add_argument("manifest", nargs="?", help="a manifest.json to verify with its lineage (default: latest)")
    verify.add_argument(
        "--lake",
        help=lake_help + "; or an fsspec URL a release was pushed to (s3://..., memory://...): hashes, manifests, "
        "counts and Merkle root checked in place (MANIFEST then relative to it)",
    )
    verify.add_argument("--json", action="store_true", help="machine-readable JSON")
    verify.add_argument("--public-key", help="Ed25519 public key (PEM or OpenSSH): the release must be signed by it")
    verify.add_argument(
        "--signature", help="signature file (default: <lake>/releases/signatures/<release>/<key id>.json)"
    )
    verify.set_defaults(func=cmd_verify)

    push = sub.add_parser("push", help="copy a release and its whole lineage to an fsspec URL (s3://, gs://, ...)")
    push.add_argument("manifest", nargs="?", help="a release manifest.json (default: the latest release)")
    push.add_argument("--to", required=True, help="destination URL, e.g. s3://bucket/corpus (fsspec)")
    push.add_argument("--lake", help=lake_help)
    push.set_defaults(func=cmd_push)

    pull = sub.add_parser("pull", help="copy the release a URL's releases/LATEST names into a local lake")
    pull.add_argument("url", help="source URL, e.g. s3://bucket/corpus (fsspec)")
    pull.add_argument("--lake", help=lake_help)
    pull.set_defaults(func=cmd_pull)

    trace = sub.add_parser("trace", help="where a sample came from, what became of a document or a raw file")
    trace.add_argument("kind", choices=["sample", "document", "file"])
    trace.add_argument("args", nargs="+", help="sample: SHARD INDEX; document: DOC_ID; file: PATH")
    trace.add_argument("--lake", help=lake_help)
    trace.add_argument(
        "--replay",
        action="store_true",
        help="sample: re-derive its tokens from the raw files; exit 1 unless equal and no raw file changed",
    )
    trace.set_defaults(func=cmd_trace)

    sign = sub.add_parser("sign", help="sign the latest release (or a release manifest) with an Ed25519 key")
    sign.add_argument("manifest", nargs="?", help="a release manifest.json (default: the latest release)")
    sign.add_argument("--lake", help=lake_help)
    sign.add_argument("--key", help="Ed25519 private key, PEM (passphrase from $CORPUS_SIGNING_PASSPHRASE)")
    sign.add_argument("--generate-key", metavar="PATH", help="write a new key pair to PATH and PATH.pub, then stop")
    sign.set_defaults(func=cmd_sign)

    diff = sub.add_parser("diff", help="what changed between two releases")
    diff.add_argument("old", help="release: manifest path, lake directory, latest, latest~N or version id (prefix)")
    diff.add_argument("new", help="release, as OLD")
    diff.add_argument("--lake", help=lake_help)
    diff.add_argument("--json", action="store_true", help="machine-readable JSON")
    diff.set_defaults(func=cmd_diff)

    export = sub.add_parser("export", help="lineage as OpenLineage events, or the dataset as Croissant JSON-LD")
    export.add_argument("format", choices=["openlineage", "croissant"])
    export.add_argument("--lake", help=lake_help)
    export.add_argument(
        "--out",
        help="openlineage: events file (default <lake>/lineage/openlineage.jsonl); croissant: <lake>/croissant.json",
    )
    export.set_defaults(func=cmd_export)

    gc = sub.add_parser("gc", help="remove versions no kept release needs (keeps the last N releases' lineage)")
    gc.add_argument("--lake", help=lake_help)
    gc.add_argument("--keep", type=_positive_int, default=3, help="releases to keep, newest first (default: 3)")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    gc.set_defaults(func=cmd_gc)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, ManifestError, LakeError, MetricsError, FileNotFoundError, ValueError, IndexError) as exc:
        print(f"corpus {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
