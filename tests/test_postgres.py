"""`pcbmerge up --database-url postgresql://...`: both stores on a real PostgreSQL server started here.

The server comes from Debian's `postgresql` package (`/usr/lib/postgresql/*/bin`; `.ci/run` installs it in
CI). Where none can be started (no binaries, no unprivileged user to run it as root, no driver) the test
skips and says why.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from infra.ports import free_port
from infra.postgres import redact
from infra.server_state import read_state
from infra.servers import start_servers, stop_servers

pytestmark = pytest.mark.timeout(600)
PASSWORD = "pg-test-secret"


def _postgres_bin() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[3]) if Path(p).parts[3].isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("postgres")
    return Path(found).parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 with password authentication; yields its URL."""
    pytest.importorskip("psycopg", reason="psycopg (MLflow's PostgreSQL driver) is not installed")
    pytest.importorskip("asyncpg", reason="asyncpg (Prefect's PostgreSQL driver) is not installed")
    bindir = _postgres_bin()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("no PostgreSQL server binaries (Debian package 'postgresql'; `.ci/run` installs it when CI=true)")
    as_user = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            as_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")

    def demote():
        if as_user is not None:
            os.setgid(as_user.pw_gid)
            os.setuid(as_user.pw_uid)

    root = Path(tempfile.mkdtemp(prefix="pcbmerge-pg-"))
    data, pwfile, log = root / "data", root / "pwfile", root / "postgres.log"
    pwfile.write_text(PASSWORD + "\n")
    if as_user is not None:
        os.chown(root, as_user.pw_uid, as_user.pw_gid)
        os.chown(pwfile, as_user.pw_uid, as_user.pw_gid)
    port = free_port()
    proc = None
    try:
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "pcbmerge", f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
            preexec_fn=demote, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {(init.stderr or init.stdout).strip().splitlines()[-1:]}")
        with open(log, "wb") as handle:
            proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={root}", "-c", "fsync=off"],
                preexec_fn=demote, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        url = f"postgresql://pcbmerge:{PASSWORD}@127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        import psycopg

        while True:
            try:
                psycopg.connect(f"{url}/postgres", connect_timeout=3).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"the PostgreSQL server did not start: {log.read_text()[-500:]}")
                time.sleep(0.5)
        yield url
    finally:
        if proc is not None:
            proc.terminate()  # "smart" shutdown; fast with no clients left
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def test_both_servers_keep_their_state_in_postgresql(postgres, tmp_path):
    import psycopg
    from mlflow import MlflowClient
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.monotonic()
    servers = start_servers(tmp_path / "servers", prefect_port=free_port(), mlflow_port=free_port(), database_url=postgres)
    try:
        print(f"servers on PostgreSQL ready in {time.monotonic() - started:.1f} s")
        # The password appears in neither the recorded state nor a command line (`ps` shows those).
        state = (tmp_path / "servers" / "servers.json").read_text()
        assert PASSWORD not in state and redact(postgres) == postgres.replace(PASSWORD, "***")
        recorded = read_state(tmp_path / "servers")
        import psutil

        for record in (recorded.prefect, recorded.mlflow):
            assert PASSWORD not in " ".join(psutil.Process(record.pid).cmdline())
        assert not (tmp_path / "servers" / "mlflow.db").exists() and not (tmp_path / "servers" / "prefect" / "prefect.db").exists()

        mlflow_client = MlflowClient(tracking_uri=servers.mlflow_tracking_uri)
        experiment = mlflow_client.create_experiment("pg-check")
        run = mlflow_client.create_run(experiment)
        mlflow_client.log_metric(run.info.run_id, "score", 0.5)

        @flow(name="pg-check-flow")
        def pg_check_flow() -> int:
            return 7

        with temporary_settings(updates={PREFECT_API_URL: servers.prefect_api_url}):
            assert pg_check_flow() == 7
            from prefect.events.worker import EventsWorker

            EventsWorker.drain_all(timeout=30)  # deliver the run's events before the server goes away

        with psycopg.connect(f"{postgres}/mlflow") as conn, conn.cursor() as cur:
            cur.execute("SELECT name FROM experiments WHERE name = 'pg-check'")
            assert cur.fetchall() == [("pg-check",)]
        with psycopg.connect(f"{postgres}/prefect") as conn, conn.cursor() as cur:
            cur.execute("SELECT name FROM flow WHERE name = 'pg-check-flow'")
            assert cur.fetchall() == [("pg-check-flow",)]
    finally:
        stop_servers(tmp_path / "servers")


def test_unreachable_postgresql_is_one_sentence(tmp_path):
    from pcbcore.errors import MergeInputError

    url = f"postgresql://someone:{PASSWORD}@127.0.0.1:{free_port()}"
    with pytest.raises(MergeInputError, match=r"cannot reach PostgreSQL at postgresql://someone:\*\*\*@127\.0\.0\.1") as info:
        start_servers(tmp_path, prefect_port=free_port(), mlflow_port=free_port(), database_url=url)
    assert PASSWORD not in str(info.value)
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) in ('["mlartifacts", "prefect"]', "[]")
