"""Process supervision for the servers we start: spawn one in its own session with its log file, wait until
its health URL answers, and stop it only while its pid still belongs to the process we started (same start
time): a pid recycled by the OS for another program is left alone."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from infra.postgres import redact

log = logging.getLogger(__name__)


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


def is_ours(record: ServerProcess) -> bool:
    """True while `record.pid` is still the process we started (not a recycled pid)."""
    import psutil

    try:
        return abs(psutil.Process(record.pid).create_time() - record.create_time) < 0.01
    except psutil.Error:
        return False


def spawn(name: str, cmd: list[str], env: dict[str, str], log_path: Path, url: str, health_url: str) -> ServerProcess:
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


def wait_healthy(record: ServerProcess, deadline: float) -> None:
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
            raise RuntimeError(f"{record.name} server exited during startup; last lines of {record.log}:\n{log_tail(record.log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{record.name} server did not answer {record.health_url} in time; last lines of {record.log}:\n{log_tail(record.log)}")
        time.sleep(0.5)


def log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(record: ServerProcess, grace: float) -> bool:
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
