"""The state file of `pcbmerge up` (`servers.json` in its folder): what was started — pid, process start
time, command line, URL, log file — so `pcbmerge down` stops exactly that, and clients find the URLs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from infra.processes import ServerProcess

STATE_FILE = "servers.json"


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


def read_state(workdir: Path) -> Servers | None:
    path = Path(workdir) / STATE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Servers(workdir=data["workdir"], host=data["host"], prefect=ServerProcess(**data["prefect"]), mlflow=ServerProcess(**data["mlflow"]))


def write_state(servers: Servers) -> None:
    """Write the state file atomically (temp file + rename)."""
    workdir = Path(servers.workdir)
    state = {"workdir": servers.workdir, "host": servers.host, "prefect": asdict(servers.prefect), "mlflow": asdict(servers.mlflow)}
    tmp = workdir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(workdir / STATE_FILE)
