"""Start and stop a local Prefect server and MLflow tracking server, with their state in one folder.

`pcbmerge up` calls `start_servers`, `pcbmerge down` calls `stop_servers`. The folder (default
`$PCBMERGE_HOME/servers`) holds

    servers.json          what was started: pid, process start time, command line, URL, log file
    prefect/              PREFECT_HOME of the server (its SQLite database unless PostgreSQL is given)
    mlflow.db             MLflow's SQLite backend store (unless PostgreSQL is given)
    mlartifacts/          MLflow's artifact store, served through the tracking server (`mlflow-artifacts:/`)
    prefect-server.log, mlflow-server.log

Both servers bind to 127.0.0.1 unless a host is given explicitly. A port that is taken is refused before
anything starts, naming the process that holds it where the OS tells us. `stop_servers` stops only the
processes recorded in `servers.json`, and only when the pid still belongs to the process that was
started (same start time): a pid recycled by the OS for another program is left alone.

PostgreSQL: `database_url="postgresql://USER:PASSWORD@HOST:PORT"` puts both stores on that server, in two
databases `prefect` and `mlflow` (created when missing). Prefect and MLflow each keep their schema
version in a table named `alembic_version`, so they cannot share one database. Prefect reaches it through
asyncpg (`PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...`), MLflow through psycopg 3
(`--backend-store-uri postgresql+psycopg://...`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pcbcore.errors import MergeInputError

log = logging.getLogger(__name__)

STATE_FILE = "servers.json"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
# Each server is ready in 7-16 s on an idle two-core machine; a loaded one (a test suite beside it) needs more.
DEFAULT_STARTUP_TIMEOUT = 180.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WILDCARD = {"0.0.0.0", "::"}


@dataclass
class ServerProcess:
    """One started server: enough to find it again and to be sure it is still the same process."""

    name: str
    pid: int
    create_time: float
    url: str
    health_url: str
    log: str
    cmdline: list[str]


@dataclass
class Servers:
    workdir: str
    host: str
    prefect: ServerProcess
    mlflow: ServerProcess

    @property
    def prefect_api_url(self) -> str:
        return self.prefect.url.rstrip("/") + "/api"

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.mlflow.url

    def environment(self) -> dict[str, str]:
        """The settings a client (CLI, `pcbmerge serve`, a worker) needs to use these servers."""
        return {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri}


# ---------------------------------------------------------------- ports


def check_port_free(host: str, port: int, what: str) -> None:
    """Refuse a port that something already listens on (or that cannot be bound), naming the holder."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the servers do: a port whose last connections linger in TIME_WAIT is free; a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            holder = port_holder(port)
            by = f" by {holder}" if holder else ""
            raise MergeInputError(f"{what} port {port} on {host} is taken{by} ({exc.strerror}); choose another with --{what.lower()}-port") from None


def port_holder(port: int) -> str | None:
    """`'name (pid N)'` of the process listening on `port`, when the OS lets us see it."""
    import psutil

    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, PermissionError):
        return None
    for conn in connections:
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            try:
                return f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
            except psutil.Error:
                return f"pid {conn.pid}"
    return None


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port nothing listens on now (for tests and examples)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- PostgreSQL


def database_urls(database_url: str | None, workdir: Path) -> tuple[str, str]:
    """(Prefect's connection URL, MLflow's backend store URI) for SQLite files in `workdir` or a PostgreSQL server."""
    if database_url is None:
        return f"sqlite+aiosqlite:///{workdir / 'prefect' / 'prefect.db'}", f"sqlite:///{workdir / 'mlflow.db'}"
    parts = urlsplit(database_url)
    if parts.scheme not in {"postgresql", "postgres"} or not parts.hostname:
        raise MergeInputError(f"--database-url '{redact(database_url)}' must look like postgresql://USER:PASSWORD@HOST:PORT")
    server = parts._replace(scheme="postgresql", path="", query="", fragment="")
    ensure_databases(urlunsplit(server._replace(scheme="postgresql+psycopg", path="/postgres")), ["prefect", "mlflow"], shown=redact(database_url))
    prefect = urlunsplit(server._replace(scheme="postgresql+asyncpg", path="/prefect"))
    mlflow = urlunsplit(server._replace(scheme="postgresql+psycopg", path="/mlflow"))
    return prefect, mlflow


def ensure_databases(maintenance_url: str, names: list[str], shown: str) -> None:
    """Create the databases that do not exist yet on the server `maintenance_url` points to."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(maintenance_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            existing = {row[0] for row in conn.execute(sqlalchemy.text("SELECT datname FROM pg_database"))}
            for name in names:
                if name not in existing:
                    conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise MergeInputError(f"cannot reach PostgreSQL at {shown}: {reason}") from None
    finally:
        engine.dispose()


def redact(url: str) -> str:
    """A URL with its password replaced by `***` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# ---------------------------------------------------------------- start / stop


def read_state(workdir: Path) -> Servers | None:
    path = Path(workdir) / STATE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Servers(workdir=data["workdir"], host=data["host"], prefect=ServerProcess(**data["prefect"]), mlflow=ServerProcess(**data["mlflow"]))


def is_ours(record: ServerProcess) -> bool:
    """True while `record.pid` is still the process we started (not a recycled pid)."""
    import psutil

    try:
        return abs(psutil.Process(record.pid).create_time() - record.create_time) < 0.01
    except psutil.Error:
        return False


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
        started.append(_spawn_prefect(workdir, host, url_host, prefect_port, prefect_db))
        started.append(_spawn_mlflow(workdir, host, url_host, mlflow_port, mlflow_db))
        if host in WILDCARD:  # check health on loopback: this machine's name may not resolve to itself
            for record in started:
                record.health_url = record.health_url.replace(f"//{url_host}:", "//127.0.0.1:", 1)
        deadline = time.monotonic() + timeout
        for record in started:
            _wait_healthy(record, deadline)
    except BaseException:
        for record in started:
            _stop(record, grace=10)
        raise
    servers = Servers(workdir=str(workdir), host=host, prefect=started[0], mlflow=started[1])
    state = {"workdir": servers.workdir, "host": host, "prefect": asdict(servers.prefect), "mlflow": asdict(servers.mlflow)}
    tmp = workdir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(workdir / STATE_FILE)
    return servers


def stop_servers(workdir: str | Path, grace: float = 20.0) -> list[str]:
    """Stop the servers recorded in `workdir`; returns one line per server saying what was done."""
    workdir = Path(workdir).expanduser().resolve()
    servers = read_state(workdir)
    if servers is None:
        return [f"no servers recorded in {workdir / STATE_FILE}; nothing stopped"]
    lines = []
    for record in (servers.prefect, servers.mlflow):
        if _stop(record, grace):
            lines.append(f"stopped {record.name} (pid {record.pid}, {record.url})")
        else:
            lines.append(f"{record.name} (pid {record.pid}) was no longer running; nothing stopped")
    (workdir / STATE_FILE).unlink(missing_ok=True)
    return lines


def _bin(name: str) -> str:
    """The console script installed beside this Python (the venv's), else whatever is on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _spawn(name: str, cmd: list[str], env: dict[str, str], log_path: Path, url: str, health_url: str) -> ServerProcess:
    import psutil

    handle = log_path.open("ab")
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=log_path.parent)
    finally:
        handle.close()
    shown = [redact(part) for part in cmd]
    record = ServerProcess(name, proc.pid, psutil.Process(proc.pid).create_time(), url, health_url, str(log_path), shown)
    log.info("started %s: pid %d, %s", name, proc.pid, " ".join(shown))
    return record


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # A client setting inherited from the caller's shell must not point a server at another server.
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_PROFILE"):
        env.pop(key, None)
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"})
    env.update(extra)
    return env


def _spawn_prefect(workdir: Path, host: str, url_host: str, port: int, database: str) -> ServerProcess:
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
    return _spawn("prefect", cmd, env, workdir / "prefect-server.log", url, f"{url}/api/health")


def _spawn_mlflow(workdir: Path, host: str, url_host: str, port: int, backend: str) -> ServerProcess:
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
    return _spawn("mlflow", cmd, env, workdir / "mlflow-server.log", url, f"{url}/health")


def _wait_healthy(record: ServerProcess, deadline: float) -> None:
    import psutil

    while True:
        try:
            with urllib.request.urlopen(record.health_url, timeout=5) as response:
                if response.status == 200:
                    log.info("%s ready at %s", record.name, record.url)
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        try:
            alive = psutil.Process(record.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            raise RuntimeError(f"{record.name} server exited during startup; last lines of {record.log}:\n{_tail(record.log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{record.name} server did not answer {record.health_url} in time; last lines of {record.log}:\n{_tail(record.log)}")
        time.sleep(0.5)


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(record: ServerProcess, grace: float) -> bool:
    """SIGTERM the recorded process and its children, SIGKILL what is left after `grace` seconds.

    Returns False (and touches nothing) when the pid is gone or now belongs to another process.
    """
    import psutil

    if not is_ours(record):
        return False
    parent = psutil.Process(record.pid)
    try:
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for proc in family:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return True
