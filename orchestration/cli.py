"""The `corpus` command. `run` goes through Dagster (runs show in the UI); the rest read the lake directly."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from corpus.config import ManifestError, load_manifest
from corpus.lake import LakeError
from corpus.metrics import MetricsError
from orchestration.resources import ENV_LAKE, ENV_SOURCES, LakePaths, default_lake, default_sources

DAGSTER_YAML = "telemetry:\n  enabled: false\n"


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
    return "\n".join(lines) or "run failed (see the Dagster UI for the event log)"


def cmd_run(args: argparse.Namespace) -> int:
    sources = Path(args.sources).expanduser().resolve() if args.sources else default_sources()
    lake = Path(args.lake).expanduser().resolve() if args.lake else default_lake()
    manifest = load_manifest(sources)  # a bad manifest fails here, before any work
    paths = LakePaths(lake)
    with run_lock(lake, args.wait):
        paths.dagster_home.mkdir(parents=True, exist_ok=True)
        if not (paths.dagster_home / "dagster.yaml").exists():
            (paths.dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
        os.environ.update({"DAGSTER_HOME": str(paths.dagster_home), ENV_SOURCES: str(sources), ENV_LAKE: str(lake)})
        import dagster as dg

        from orchestration.definitions import PHASES, build_definitions

        defs = build_definitions(sources, lake)
        instance = dg.DagsterInstance.get()
        quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
        started = time.monotonic()
        since = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)  # metrics timestamps are naive UTC
        print(f"corpus run: {len(manifest.sources)} sources from {sources}\n  lake: {lake}")
        steps = [(phase, key) for phase in PHASES for key in (manifest.source_names if phase.partitioned else [None])]
        for number, (phase, key) in enumerate(steps, start=1):
            label = f"{phase.job}" + (f"[{key}]" if key else "")
            print(f"[{number}/{len(steps)}] {label:<24} {phase.description} ...", end="", flush=True)
            t0 = time.monotonic()
            job = defs.resolve_job_def(phase.job)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = job.execute_in_process(
                    instance=instance,
                    partition_key=key,
                    run_config=quiet,
                    raise_on_error=False,
                    tags={"corpus/cli": "run"},
                )
            notes = dict.fromkeys(str(w.message) for w in caught if not _is_library_noise(w))
            if not result.success:
                print(" FAILED")
                raise CliError(f"{label} failed (run {result.run_id}):\n{_failure_message(result)}")
            print(f" {time.monotonic() - t0:6.1f} s")
            for note in notes:
                print(f"      warning: {note}")
        print(f"done in {time.monotonic() - started:.1f} s")
        from corpus.lineage_export import emit_openlineage_quietly

        print(emit_openlineage_quietly(lake, since, {a: phase.job for phase in PHASES for a in phase.assets}))
    from corpus.report import build_report, format_summary

    print(format_summary(build_report(lake)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from corpus.report import build_report, format_report

    report = build_report(Path(args.lake).expanduser().resolve() if args.lake else default_lake())
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_report(report))
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    from corpus.report import iter_decoded_stream

    lake = Path(args.lake).expanduser().resolve() if args.lake else default_lake()
    try:
        for chunk in iter_decoded_stream(lake, args.split):
            sys.stdout.write(chunk)
        sys.stdout.flush()
    except BrokenPipeError:  # `corpus cat | head` is a normal way to read it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from corpus.audit import verify

    lake = Path(args.lake).expanduser().resolve() if args.lake else default_lake()
    target = Path(args.manifest).expanduser().resolve() if args.manifest else None
    key = Path(args.public_key).expanduser() if args.public_key else None
    signature = Path(args.signature).expanduser() if args.signature else None
    # Problems are printed as they are found: on a large lake the first one shows long before the end.
    result = verify(lake, target, public_key=key, signature=signature, on_problem=None if args.json else print)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        status = "OK" if result.ok else f"FAILED ({len(result.problems)} problems)"
        signed = f", signed by key {result.signed_by}" if result.signed_by else ""
        print(f"{status}: {result.versions} versions, {result.files} files, {result.bytes:,} bytes re-hashed{signed}")
        if result.merkle_root:
            print(f"release {result.release}, Merkle root {result.merkle_root}")
    return 0 if result.ok else 1


def cmd_trace(args: argparse.Namespace) -> int:
    from corpus import audit

    lake = Path(args.lake).expanduser().resolve() if args.lake else default_lake()
    if args.kind == "sample":
        if len(args.args) != 2:
            raise CliError("usage: corpus trace sample SHARD INDEX  (SHARD: train-00000.bin or packed:train)")
        if args.replay:
            out = audit.replay_sample(lake, args.args[0], int(args.args[1]))
            print(json.dumps(out, indent=2, sort_keys=True, default=str))
            return 0 if out["equal"] else 1
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
    lake = Path(args.lake).expanduser().resolve() if args.lake else default_lake()
    target = Path(args.manifest).expanduser().resolve() if args.manifest else None
    path, record = signing.sign_release(lake, Path(args.key).expanduser(), target)
    print(f"signed release {record['release']} (Merkle root {record['merkle_root']}) with key {record['key_id']}")
    print(f"signature: {path}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from corpus.diff import diff_releases, format_diff, resolve_release

    lake = Path(args.lake).expanduser().resolve() if args.lake else default_lake()
    out = diff_releases(resolve_release(args.old, lake), resolve_release(args.new, lake))
    print(json.dumps(out, indent=2, sort_keys=True) if args.json else format_diff(out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from corpus import lineage_export

    lake = Path(args.lake).expanduser().resolve() if args.lake else default_lake()
    out = Path(args.out).expanduser() if args.out else None
    if args.format == "openlineage":
        path, count = lineage_export.emit_openlineage(lake, out=out, parent_jobs=_phase_jobs())
        print(f"{count} OpenLineage run events appended to {path}")
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

    lake = Path(args.lake).expanduser().resolve() if args.lake else default_lake()
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
    verify.add_argument("--lake", help=lake_help)
    verify.add_argument("--json", action="store_true", help="machine-readable JSON")
    verify.add_argument("--public-key", help="Ed25519 public key (PEM or OpenSSH): the release must be signed by it")
    verify.add_argument(
        "--signature", help="signature file (default: <lake>/releases/signatures/<release>/<key id>.json)"
    )
    verify.set_defaults(func=cmd_verify)

    trace = sub.add_parser("trace", help="where a sample came from, what became of a document or a raw file")
    trace.add_argument("kind", choices=["sample", "document", "file"])
    trace.add_argument("args", nargs="+", help="sample: SHARD INDEX; document: DOC_ID; file: PATH")
    trace.add_argument("--lake", help=lake_help)
    trace.add_argument(
        "--replay", action="store_true", help="sample: re-derive its tokens from the raw files; exit 1 unless equal"
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
