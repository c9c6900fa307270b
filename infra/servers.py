"""Start and stop a local Prefect server and MLflow tracking server, with their state in one folder.

`pcbmerge up` calls `start_servers`, `pcbmerge down` calls `stop_servers`. The folder (default
`$PCBMERGE_HOME/servers`) holds

    servers.json          what was started: pid, process start time, command line, URL, log file
    prefect/              PREFECT_HOME of the server (its SQLite database unless PostgreSQL is given)
    mlflow.db             MLflow's SQLite backend store (unless PostgreSQL is given)
    mlartifacts/          MLflow's artifact store, served through the tracking server (`mlflow-artifacts:/`)
    prefect-server.log, mlflow-server.log

Both servers bind to 127.0.0.1 unless a host is given explicitly. Ports are checked first (`infra.ports`),
the stores may live on PostgreSQL (`infra.postgres`), the processes are supervised by `infra.processes`
and recorded in the state file (`infra.server_state`): `stop_servers` stops only what is recorded there.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from infra.ports import DEFAULT_HOST, check_port_free
from infra.postgres import database_urls
from infra.processes import ServerProcess, is_ours, spawn, stop_process, wait_healthy
from infra.server_state import STATE_FILE, Servers, read_state, write_state
from pcbcore.errors import MergeInputError

log = logging.getLogger(__name__)

DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
# Each server is ready in 7-16 s on an idle two-core machine; a loaded one (a test suite beside it) needs more.
DEFAULT_STARTUP_TIMEOUT = 180.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WILDCARD = {"0.0.0.0", "::"}


def start_servers(
    workdir: str | Path,
    host: str = DEFAULT_HOST,
    prefect_port: int = DEFAULT_PREFECT_PORT,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    database_url: str | None = None,
    timeout: float = DEFAULT_STARTUP_TIMEOUT,
) -> Servers:
    """Start both servers in the background, wait until both answer their health checks, record them.

    On any failure, whatever was started is stopped again and the log tail is in the message.
    """
    workdir = Path(workdir).expanduser().resolve()
    previous = read_state(workdir)
    if previous is not None and (is_ours(previous.prefect) or is_ours(previous.mlflow)):
        raise MergeInputError(
            f"servers from {workdir / STATE_FILE} are still running (Prefect {previous.prefect.url}, MLflow {previous.mlflow.url}); run `pcbmerge down` first"
        )
    if prefect_port == mlflow_port:
        raise MergeInputError(f"--prefect-port and --mlflow-port are both {prefect_port}; give two different ports")
    check_port_free(host, prefect_port, "Prefect")
    check_port_free(host, mlflow_port, "MLflow")
    (workdir / "prefect").mkdir(parents=True, exist_ok=True)
    (workdir / "mlartifacts").mkdir(parents=True, exist_ok=True)
    prefect_db, mlflow_db = database_urls(database_url, workdir)

    # Bound to every interface: others reach the servers by this machine's name (the UI's API calls too).
    shown_host = socket.getfqdn() if host in WILDCARD else host
    url_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    if host not in LOOPBACK:
        log.warning("binding %s: both servers are reachable from the network, without authentication", host)
    started: list[ServerProcess] = []
    try:
        started.append(__spawn_prefect(workdir, host, url_host, prefect_port, prefect_db))
        started.append(__spawn_mlflow(workdir, host, url_host, mlflow_port, mlflow_db))
        if host in WILDCARD:  # check health on loopback: this machine's name may not resolve to itself
            for record in started:
                record.health_url = record.health_url.replace(f"//{url_host}:", "//127.0.0.1:", 1)
        deadline = time.monotonic() + timeout
        for record in started:
            wait_healthy(record, deadline)
    except BaseException:
        for record in started:
            stop_process(record, grace=10)
        raise
    servers = Servers(workdir=str(workdir), host=host, prefect=started[0], mlflow=started[1])
    write_state(servers)
    return servers


def stop_servers(workdir: str | Path, grace: float = 20.0) -> list[str]:
    """Stop the servers recorded in `workdir`; returns one line per server saying what was done."""
    workdir = Path(workdir).expanduser().resolve()
    servers = read_state(workdir)
    if servers is None:
        return [f"no servers recorded in {workdir / STATE_FILE}; nothing stopped"]
    lines = []
    for record in (servers.prefect, servers.mlflow):
        if stop_process(record, grace):
            lines.append(f"stopped {record.name} (pid {record.pid}, {record.url})")
        else:
            lines.append(f"{record.name} (pid {record.pid}) was no longer running; nothing stopped")
    (workdir / STATE_FILE).unlink(missing_ok=True)
    return lines


def _bin(name: str) -> str:
    """The console script installed beside this Python (the venv's), else whatever is on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # A client setting inherited from the caller's shell must not point a server at another server.
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_PROFILE"):
        env.pop(key, None)
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"})
    env.update(extra)
    return env


def __spawn_prefect(workdir: Path, host: str, url_host: str, port: int, database: str) -> ServerProcess:
    url = f"http://{url_host}:{port}"
    env = _server_env(
        {
            "PREFECT_HOME": str(workdir / "prefect"),
            "PREFECT_API_DATABASE_CONNECTION_URL": database,
            # The UI in a browser calls the API at this address; it must be the one we bind.
            "PREFECT_UI_API_URL": f"{url}/api",
        }
    )
    cmd = [_bin("prefect"), "server", "start", "--host", host, "--port", str(port), "--no-background", "--analytics-off"]
    return spawn("prefect", cmd, env, workdir / "prefect-server.log", url, f"{url}/api/health")


def __spawn_mlflow(workdir: Path, host: str, url_host: str, port: int, backend: str) -> ServerProcess:
    url = f"http://{url_host}:{port}"
    # Job execution starts a pool of extra processes (2.5 GB, 16 s instead of 8 s) that nothing here uses.
    # The store URI goes in the environment, not the command line: a PostgreSQL password would show in `ps`.
    env = _server_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_BACKEND_STORE_URI": backend})
    cmd = [
        _bin("mlflow"), "server",
        "--host", host, "--port", str(port),
        "--artifacts-destination", str(workdir / "mlartifacts"),
        "--workers", "1",
    ]  # fmt: skip
    return spawn("mlflow", cmd, env, workdir / "mlflow-server.log", url, f"{url}/health")
