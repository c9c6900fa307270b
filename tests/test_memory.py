"""The malloc tuning of `pcbcore.memory`: a merging command restarts once with glibc's start-up settings,
which its own environment then drops so that processes it starts keep glibc's defaults."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc malloc tuning only")

PROBE = """
import json, os, subprocess, sys
from pcbcore import memory
memory.restart_with_malloc_settings("probe", sys.argv[1:])
child = subprocess.run([sys.executable, "-c", "import os; print('MALLOC_MMAP_THRESHOLD_' in os.environ)"], capture_output=True, text=True)
print(json.dumps({
    "pid": os.getpid(),
    "args": sys.argv[1:],
    "started_with": b"MALLOC_MMAP_THRESHOLD_=1073741824" in open("/proc/self/environ", "rb").read(),
    "in_environ": "MALLOC_MMAP_THRESHOLD_" in os.environ or memory.ADDED in os.environ,
    "tuned": memory.keep_freed_memory(),
    "child_sees": child.stdout.strip(),
}))
"""


def run_probe(tmp_path, **env):
    (tmp_path / "probe.py").write_text(PROBE)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and not k.startswith("PCBMERGE_MALLOC")}
    clean["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    proc = subprocess.Popen([sys.executable, "-m", "probe", "a", "--b"], cwd=tmp_path, env={**clean, **env}, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    return proc.pid, json.loads(out.strip().splitlines()[-1])


def test_restarts_once_in_place_with_the_settings_and_children_do_not_inherit_them(tmp_path):
    pid, seen = run_probe(tmp_path)
    assert seen == {"pid": pid, "args": ["a", "--b"], "started_with": True, "in_environ": False, "tuned": True, "child_sees": "False"}


def test_switched_off(tmp_path):
    pid, seen = run_probe(tmp_path, PCBMERGE_MALLOC_TUNING="0")
    assert seen["pid"] == pid and not seen["started_with"] and not seen["tuned"]
