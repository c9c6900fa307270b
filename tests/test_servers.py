"""`pcbmerge up` / `down` with real servers on loopback, and a deployment triggered the way the UI does it.

The servers start once for the module (their startup is the cost: ~10-40 s each on two busy cores).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from infra.servers import ServerProcess, Servers, check_port_free, free_port, read_state, stop_servers
from pcbcore.errors import MergeInputError
from pcbmerge.cli import main

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("servers")
    argv = ["up", "--workdir", str(workdir), "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()), "--json"]
    out = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    info = json.loads(out.getvalue())
    info["startup_seconds"] = time.monotonic() - started
    state = read_state(workdir)
    yield {"info": info, "state": state, "workdir": workdir}
    stop_servers(workdir)
    for record in (state.prefect, state.mlflow):
        assert not psutil.pid_exists(record.pid) or psutil.Process(record.pid).status() == psutil.STATUS_ZOMBIE


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_up_starts_both_servers_on_loopback(servers):
    info, state = servers["info"], servers["state"]
    print(f"both servers ready in {info['startup_seconds']:.1f} s")
    assert info["PREFECT_API_URL"] == f"{state.prefect.url}/api" and info["MLFLOW_TRACKING_URI"] == state.mlflow.url
    assert json.loads(_get(f"{info['PREFECT_API_URL']}/health")) is True
    assert _get(f"{info['MLFLOW_TRACKING_URI']}/health") == b"OK"
    for record in (state.prefect, state.mlflow):
        port = int(record.url.rsplit(":", 1)[1])
        family = [psutil.Process(record.pid), *psutil.Process(record.pid).children(recursive=True)]
        listening = {c.laddr.ip for p in family for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}, f"{record.name} listens on {listening}"
        assert record.create_time == psutil.Process(record.pid).create_time()
    assert (servers["workdir"] / "prefect" / "prefect.db").is_file() and (servers["workdir"] / "mlflow.db").is_file()


def test_up_refuses_taken_port_naming_it(servers, tmp_path):
    port = int(servers["state"].mlflow.url.rsplit(":", 1)[1])
    with pytest.raises(MergeInputError, match=rf"MLflow port {port} on 127.0.0.1 is taken by .*\(pid \d+\)"):
        check_port_free("127.0.0.1", port, "MLflow")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["up", "--workdir", str(tmp_path), "--prefect-port", str(free_port()), "--mlflow-port", str(port)]) == 2
    assert f"MLflow port {port}" in err.getvalue()
    assert not (tmp_path / "servers.json").exists()


def test_up_refuses_while_its_servers_run(servers):
    with pytest.raises(MergeInputError, match="still running"):
        from infra.servers import start_servers

        start_servers(servers["workdir"], prefect_port=free_port(), mlflow_port=free_port())


def test_down_never_stops_a_process_it_did_not_start(tmp_path):
    """A recorded pid whose start time differs (the OS recycled it) is left alone."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = psutil.Process(stranger.pid).create_time()
        fake = ServerProcess("prefect", stranger.pid, created - 100.0, "http://127.0.0.1:1", "", "", [])
        state = Servers(str(tmp_path), "127.0.0.1", fake, ServerProcess("mlflow", 2**22 + 7, 0.0, "http://127.0.0.1:2", "", "", []))
        from dataclasses import asdict

        (tmp_path / "servers.json").write_text(json.dumps({"workdir": state.workdir, "host": state.host, "prefect": asdict(fake), "mlflow": asdict(state.mlflow)}))
        lines = stop_servers(tmp_path)
        assert all("no longer running" in line for line in lines)
        assert stranger.poll() is None, "down stopped a process it did not start"
    finally:
        stranger.kill()
        stranger.wait(10)
