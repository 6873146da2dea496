"""Beyond one machine, what can be tested here: executor choice, the deploy/ configs, a multiprocess run,
and (where PostgreSQL's initdb and dagster-postgres are installed) a whole `corpus run` on Postgres storage.

dagster-celery, dagster-k8s and dagster-postgres are optional installs (deploy/requirements-distributed.txt):
the tests that need them skip when they are absent, and everything else runs offline.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config
from test_crash import crash_manifest  # pytest's default (prepend) import mode puts tests/ on sys.path

from corpus.lake import MANIFEST, read_version
from corpus.release import latest_release
from orchestration import cli
from orchestration.definitions import ENV_EXECUTOR, ENV_EXECUTOR_CONFIG, PHASES, build_definitions, build_executor

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PG_ENV = ("DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_HOST", "DAGSTER_PG_DB")


def executor_schema(executor: dg.ExecutorDefinition) -> object:
    return executor.config_schema.as_field().config_type  # type: ignore[union-attr]


def test_deploy_dagster_yaml_is_a_valid_instance_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PG_ENV:
        monkeypatch.setenv(name, "x")
    config, instance_class = dagster_instance_config(str(DEPLOY))
    assert instance_class is None
    db = config["storage"]["postgres"]["postgres_db"]
    assert db["username"] == {"env": "DAGSTER_PG_USERNAME"} and db["port"] == 5432
    assert config["run_queue"]["max_concurrent_runs"] == 8


def test_deploy_dagster_yaml_with_a_typo_is_refused(tmp_path: Path) -> None:
    text = (DEPLOY / "dagster.yaml").read_text().replace("postgres_db:", "postgres_database:")
    (tmp_path / "dagster.yaml").write_text(text)
    with pytest.raises(DagsterInvalidConfigError, match="postgres_database"):
        dagster_instance_config(str(tmp_path))


def test_executor_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    manifest = crash_manifest(tmp_path)
    monkeypatch.delenv(ENV_EXECUTOR, raising=False)
    monkeypatch.delenv(ENV_EXECUTOR_CONFIG, raising=False)
    assert build_definitions(manifest, tmp_path / "lake").resolve_job_def("ingest").executor_def.name == "in_process"
    monkeypatch.setenv(ENV_EXECUTOR, "multiprocess")
    monkeypatch.setenv(ENV_EXECUTOR_CONFIG, str(DEPLOY / "executor-multiprocess.yaml"))
    job = build_definitions(manifest, tmp_path / "lake").resolve_job_def("ingest")
    assert job.executor_def.name == "multiprocess"
    monkeypatch.setenv(ENV_EXECUTOR, "threads")
    with pytest.raises(ValueError, match=r"\$CORPUS_EXECUTOR='threads' is not an executor; choose one of in_process"):
        build_executor()
    monkeypatch.setenv(ENV_EXECUTOR, "in_process")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    monkeypatch.setenv(ENV_EXECUTOR_CONFIG, str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match=r"bad\.yaml: executor config must be a mapping"):
        build_executor()


@pytest.mark.parametrize(("name", "module", "requirement"), [("celery", "dagster_celery", "dagster-celery==0.29.27")])
def test_distributed_executor_without_its_library_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, name: str, module: str, requirement: str
) -> None:
    try:
        __import__(module)
    except ImportError:
        pass
    else:
        pytest.skip(f"{module} is installed")
    monkeypatch.setenv(ENV_EXECUTOR, name)
    monkeypatch.delenv(ENV_EXECUTOR_CONFIG, raising=False)
    with pytest.raises(ValueError, match=f"needs {requirement}: pip install"):
        build_executor()


def test_deploy_multiprocess_config_fits_the_executor() -> None:
    config = yaml.safe_load((DEPLOY / "executor-multiprocess.yaml").read_text())
    assert process_config(executor_schema(dg.multiprocess_executor), config).success


@pytest.mark.parametrize(
    ("module", "attribute", "file"),
    [
        ("dagster_celery", "celery_executor", "executor-celery.yaml"),
        ("dagster_k8s", "k8s_job_executor", "executor-k8s.yaml"),
    ],
)
def test_deploy_distributed_configs_fit_their_executors(
    monkeypatch: pytest.MonkeyPatch, module: str, attribute: str, file: str
) -> None:
    executor = getattr(pytest.importorskip(module), attribute)
    monkeypatch.setenv("CORPUS_CELERY_BROKER", "redis://broker:6379/0")
    monkeypatch.setenv("CORPUS_CELERY_BACKEND", "redis://broker:6379/1")
    result = process_config(executor_schema(executor), yaml.safe_load((DEPLOY / file).read_text()))
    assert result.success, result.errors


def run_step(monkeypatch: pytest.MonkeyPatch, manifest: Path, lake: Path, executor: str) -> cli.StepOutcome:
    home = lake / "dagster_home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(cli.DAGSTER_YAML)
    for name, value in (("DAGSTER_HOME", home), ("CORPUS_SOURCES", manifest), ("CORPUS_LAKE", lake)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv(ENV_EXECUTOR, executor)
    monkeypatch.delenv(ENV_EXECUTOR_CONFIG, raising=False)
    cli._definitions.cache_clear()
    try:
        return cli.execute_step("ingest", "books")
    finally:
        cli._definitions.cache_clear()


def test_multiprocess_run_of_a_source_partition_gives_the_in_process_versions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    manifest = crash_manifest(tmp_path)
    outcomes = {}
    for executor in ("in_process", "multiprocess"):
        outcomes[executor] = run_step(monkeypatch, manifest, tmp_path / executor, executor)
        assert outcomes[executor].ok, outcomes[executor].message
    instance = dg.DagsterInstance.from_config(str(tmp_path / "multiprocess" / "dagster_home"))
    run = instance.get_run_by_id(outcomes["multiprocess"].run_id or "")
    assert run is not None and run.tags["dagster/partition"] == "books"
    steps = [e for e in instance.all_logs(run.run_id) if e.is_dagster_event and e.dagster_event.is_step_success]
    assert {e.step_key for e in steps} == {"raw_documents", "heuristic_documents"}
    assert os.getpid() not in {e.dagster_event.pid for e in steps}  # each step ran in a process of its own
    for asset in ("raw_documents", "heuristic_documents"):
        found = {ex: sorted((tmp_path / ex / asset / "books").glob(f"*/{MANIFEST}")) for ex in outcomes}
        assert len(found["in_process"]) == 1 and [p.parent.name for p in found["multiprocess"]] == [
            p.parent.name for p in found["in_process"]
        ]
        a, b = (read_version(found[ex][0]) for ex in outcomes)
        for name in a.files:
            assert (a.path / name).read_bytes() == (b.path / name).read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def postgres() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL server on 127.0.0.1 (skips where initdb or dagster-postgres is missing)."""
    pytest.importorskip("dagster_postgres")
    initdb, pg_ctl, createdb = (shutil.which(name) for name in ("initdb", "pg_ctl", "createdb"))
    if not initdb or not pg_ctl or not createdb or (os.geteuid() == 0 and not shutil.which("runuser")):
        pytest.skip("PostgreSQL server binaries not found")
    # initdb refuses to run as root: there the server runs as `nobody`, in a directory it can reach.
    prefix = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="corpus-pg-"))
    root.chmod(0o755)
    data, log = root / "data", root / "server.log"
    data.mkdir()
    log.touch()
    if prefix:
        for path in (data, log):
            shutil.chown(path, "nobody")
    port = free_port()
    try:
        subprocess.run(
            [*prefix, initdb, "-D", str(data), "-U", "corpus", "--auth=trust"], check=True, capture_output=True
        )
        options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
        start = [*prefix, pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]
        subprocess.run(start, check=True, capture_output=True)
        try:
            create = [*prefix, createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "corpus", "dagster"]
            subprocess.run(create, check=True, capture_output=True)
            yield {
                "DAGSTER_PG_USERNAME": "corpus",
                "DAGSTER_PG_PASSWORD": "",
                "DAGSTER_PG_HOST": "127.0.0.1",
                "DAGSTER_PG_DB": "dagster",
                "port": str(port),
            }
        finally:
            subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_corpus_run_on_postgres_instance_storage(
    postgres: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    manifest = crash_manifest(tmp_path / "corpus")
    lake = tmp_path / "lake"
    home = lake / "dagster_home"
    home.mkdir(parents=True)
    text = (DEPLOY / "dagster.yaml").read_text().replace("port: 5432", f"port: {postgres['port']}")
    (home / "dagster.yaml").write_text(text.replace("/var/lib/dagster/compute_logs", str(tmp_path / "logs")))
    for name in PG_ENV:
        monkeypatch.setenv(name, postgres[name])
    started = time.monotonic()
    assert cli.main(["run", "--sources", str(manifest), "--lake", str(lake), "--workers", "2"]) == 0
    instance = dg.DagsterInstance.from_config(str(home))
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"corpus/cli": "run"}))
    assert len(runs) == sum(4 if phase.partitioned else 1 for phase in PHASES)
    assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
    assert latest_release(lake).version, f"run took {time.monotonic() - started:.0f} s"


def test_a_failed_blocking_check_is_reported_with_its_reason() -> None:
    """Dagster's step failure names the check only; `corpus run` adds its description (or its values)."""

    @dg.asset(check_specs=[dg.AssetCheckSpec("share_ok", asset="thing", blocking=True)])
    def thing() -> dg.MaterializeResult:
        check = dg.AssetCheckResult(
            check_name="share_ok", passed=False, metadata={"share": 0.9}, description="90% dropped, ceiling 50%"
        )
        return dg.MaterializeResult(check_results=[check])

    @dg.asset(check_specs=[dg.AssetCheckSpec("bare", asset="other", blocking=True)])
    def other() -> dg.MaterializeResult:
        return dg.MaterializeResult(
            check_results=[dg.AssetCheckResult(check_name="bare", passed=False, metadata={"n": 3})]
        )

    message = cli._failure_message(dg.materialize([thing], raise_on_error=False))
    assert "check share_ok on thing failed: 90% dropped, ceiling 50%" in message
    assert "check bare on other failed: n=3" in cli._failure_message(dg.materialize([other], raise_on_error=False))


def test_a_version_that_failed_a_blocking_check_is_not_built_upon(tmp_path: Path) -> None:
    """Dagster stops only the run a blocking check failed in; the next run must not read that version."""
    from assets._common import upstream_version
    from corpus.lake import Lake
    from corpus.metrics import MetricsStore
    from orchestration.resources import PipelineResource

    lake = tmp_path / "lake"
    with Lake(lake).writer("mixed_tokens") as writer:
        writer.path("x.bin").write_bytes(b"x")
        version = writer.commit(code_version="1", config={})
    pipeline = PipelineResource(sources=str(tmp_path / "sources.yaml"), lake=str(lake))
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization("mixed_tokens", metadata={"version": version.version})
        )
        (record,) = instance.fetch_materializations(dg.AssetKey("mixed_tokens"), limit=1).records
        context = dg.build_asset_context(instance=instance)
        assert upstream_version(context, pipeline, "mixed_tokens") == version  # nothing recorded: readable
        key = {"asset": "mixed_tokens", "partition": "_all", "version": version.version, "run_id": record.run_id}
        row = {"check_name": "share_ok", "passed": False, "blocking": True, "description": "0.55 pp > 0.5 pp"}
        MetricsStore(lake / "metrics.duckdb").write(key, {"asset_checks": [{**row, "metadata": "{}"}]})
        with pytest.raises(
            dg.Failure,
            match=r"upstream mixed_tokens version .{12} failed its blocking check "
            r"share_ok \(0\.55 pp > 0\.5 pp\) in run .*: fix the cause and materialize mixed_tokens",
        ):
            upstream_version(context, pipeline, "mixed_tokens")
        row = {**row, "blocking": False}
        MetricsStore(lake / "metrics.duckdb").write(key, {"asset_checks": [{**row, "metadata": "{}"}]})
        assert upstream_version(context, pipeline, "mixed_tokens") == version  # a warning check does not block


def test_code_versions_carry_the_manifest_settings_so_the_ui_sees_an_edit(tmp_path: Path) -> None:
    """Editing sources.yaml then reloading marks assets stale ('code version changed') in the Dagster UI."""
    manifest = crash_manifest(tmp_path)

    def versions() -> dict[str, str]:
        defs = build_definitions(manifest, tmp_path / "lake")
        return {k.to_user_string(): v for a in defs.assets for k, v in a.code_versions_by_key.items()}

    before = versions()
    assert before["raw_documents"].startswith("raw_documents/") and "+settings." in before["raw_documents"]
    manifest.write_text(manifest.read_text().replace("  max_length: 32\n", "  max_length: 48\n"))
    after = versions()
    assert after["raw_documents"] == before["raw_documents"]  # reads the source specs only
    assert all(after[name] != before[name] for name in before if name != "raw_documents")
    manifest.write_text(manifest.read_text().replace("profile: prose}", "profile: code}", 1))
    assert versions()["raw_documents"] != before["raw_documents"]
