"""`pcbmerge up` / `pcbmerge down`: a local Prefect server and MLflow tracking server, started and stopped together."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a local Prefect server and MLflow tracking server in the background")
    p.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port (default 4200)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port (default 5000)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes both servers to the network)")
    p.add_argument(
        "--database-url",
        default=None,
        help="postgresql://USER:PASSWORD@HOST:PORT: keep both stores on this PostgreSQL server (databases 'prefect' and 'mlflow') "
        "instead of SQLite files in the working folder",
    )
    p.add_argument("--workdir", type=Path, default=None, help="state, databases, artifacts and logs (default $PCBMERGE_HOME/servers)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for both servers to answer (default 180)")
    p.add_argument("--json", action="store_true", help="print the URLs and pids as JSON")
    p.set_defaults(func=up)

    p = sub.add_parser("down", help="stop the servers `pcbmerge up` started (only those)")
    p.add_argument("--workdir", type=Path, default=None, help="the folder given to `pcbmerge up` (default $PCBMERGE_HOME/servers)")
    p.set_defaults(func=down)


def default_workdir() -> Path:
    from pipeline.settings import load_settings

    return load_settings().home / "servers"


def up(args: argparse.Namespace) -> int:
    from infra.servers import start_servers

    workdir = args.workdir or default_workdir()
    servers = start_servers(workdir, args.host, args.prefect_port, args.mlflow_port, args.database_url, timeout=args.timeout)
    if args.json:
        print(json.dumps({**servers.environment(), "prefect_pid": servers.prefect.pid, "mlflow_pid": servers.mlflow.pid, "workdir": servers.workdir}))
        return 0
    print(f"Prefect UI and API: {servers.prefect.url}  (pid {servers.prefect.pid}, log {servers.prefect.log})")
    print(f"MLflow UI and API:  {servers.mlflow.url}  (pid {servers.mlflow.pid}, log {servers.mlflow.log})")
    print("Point the CLI, `pcbmerge serve` and workers at them with:")
    for key, value in servers.environment().items():
        print(f"  export {key}={value}")
    print(f"Stop them with: pcbmerge down{'' if args.workdir is None else f' --workdir {servers.workdir}'}")
    return 0


def down(args: argparse.Namespace) -> int:
    from infra.servers import stop_servers

    for line in stop_servers(args.workdir or default_workdir()):
        print(line)
    return 0
