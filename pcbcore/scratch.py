"""Temporary folders named by their owner, so a killed process's leftovers can be told from a live writer's.

A merge writes into a hidden folder beside its target and renames it into place when complete. A process
killed part-way (the OOM killer, a pre-empted node, SIGKILL) cannot remove that folder, and it holds up to a
model's worth of bytes. So every such folder carries its owner in its name,

    .<target>.tmp-<pid>-<start>-<random>      (also .old- while an existing target is being replaced)

where <start> is the owner's process start time (clock ticks since boot on Linux, from /proc/<pid>/stat;
else psutil's create time). A pid alone is not enough: the OS recycles pids, and a recycled pid must not make
a dead writer's folder look alive. `remove_leftovers` deletes the folders whose owner is gone and never one
whose owner still runs; the next write into the same target calls it first, so a re-run cleans up after
the run that was killed.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

_OWNED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+$")


def process_start(pid: int) -> int | None:
    """A number that identifies the process `pid` among all processes that ever had that pid (its start
    time), or None when no such process runs."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (not Linux): ask psutil
        try:
            import psutil

            return int(psutil.Process(pid).create_time() * 100)
        except (ImportError, psutil.Error):
            return None
    # The command name (field 2) may hold spaces and parentheses: the fields after its last ')' are fixed.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])  # field 22, starttime


def owner_tag() -> str:
    """`<pid>-<start>` of this process."""
    pid = os.getpid()
    return f"{pid}-{process_start(pid) or 0}"


def owner_alive(pid: int, start: int) -> bool:
    return process_start(pid) == start


def owned_folder(parent: Path, name: str, kind: str = "tmp") -> Path:
    """A new, empty hidden folder in `parent` for writing `name`, named by this process."""
    folder = parent / f".{name}.{kind}-{owner_tag()}-{secrets.token_hex(4)}"
    folder.mkdir(mode=0o700)
    return folder


def owned_path(parent: Path, name: str, kind: str = "old") -> Path:
    """A fresh hidden path (not created) in `parent` for `name`, named by this process."""
    return parent / f".{name}.{kind}-{owner_tag()}-{secrets.token_hex(4)}"


def remove_leftovers(parent: Path, name: str | None = None) -> list[Path]:
    """Delete the owned temporary folders in `parent` (for target `name`, or for every target) whose owner
    process is gone; return what was removed. Folders of live owners are never touched."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _OWNED.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if owner_alive(int(match["pid"]), int(match["start"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        log.info("removed %s, left by process %s which is gone", entry, match["pid"])
        removed.append(entry)
    return removed
