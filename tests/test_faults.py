"""Fault injection: processes killed with SIGKILL at several points, then a plain re-run (or `--resume`).

After every kill and re-run: the same bytes as an uninterrupted run, no temporary folder left beside any
target, no MLflow run left RUNNING, and one registered version per content. Each scenario runs the real
`pcbmerge` command in its own process group with its own working folder (MLflow SQLite store, Prefect
home), and kills the whole group, as the OOM killer or a pre-empted node would. Run alone with
`pytest -m faults`.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

pytestmark = pytest.mark.faults


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_PROFILE"}}
    env.update({"PCBMERGE_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "PCBMERGE_MALLOC_TUNING": "0"})
    return env


def _start(args: list[str], home: Path, log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`pcbmerge ARGS` in its own process group; stdout to `<log>.out`, stderr to `<log>.log` under `home`;
    `env` is added to the environment."""
    home.mkdir(parents=True, exist_ok=True)
    out, err = (home / f"{log}.out").open("wb"), (home / f"{log}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "pcbmerge", *args], env={**_env(home), **(env or {})}, stdout=out, stderr=err, start_new_session=True)


def _run(args: list[str], home: Path, log: str, timeout: float = 300, env: dict[str, str] | None = None) -> str:
    """Run to the end; returns what it printed on stdout."""
    proc = _start(args, home, log, env)
    assert proc.wait(timeout=timeout) == 0, (home / f"{log}.log").read_text()[-3000:]
    return (home / f"{log}.out").read_text()


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    """SIGKILL the process group as soon as `ready()` holds (or fail, naming `what`, if it never does)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _client(home: Path, uri: str | None = None):
    """A client on the run's store: the SQLite file in `home`, or the tracking server at `uri`."""
    from mlflow import MlflowClient

    uri = uri or f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(home: Path, experiment: str = "pcbmerge", uri: str | None = None) -> list:
    client = _client(home, uri)
    found = client.get_experiment_by_name(experiment) if uri or (home / "mlflow.db").is_file() else None
    return client.search_runs([found.experiment_id]) if found else []


def _versions(home: Path, name: str, uri: str | None = None) -> list[int]:
    if not uri and not (home / "mlflow.db").is_file():
        return []
    return sorted(int(v.version) for v in _client(home, uri).search_model_versions(f"name = '{name}'"))


def _logged_models(home: Path, experiment: str = "pcbmerge") -> dict:
    """model id -> LoggedModel, every logged model of the experiment."""
    client = _client(home)
    found = client.get_experiment_by_name(experiment)
    return {m.model_id: m for m in client.search_logged_models([found.experiment_id])} if found else {}


def _model_files(model) -> list[str]:
    """The files a logged model holds in a local artifact store (none once its folder is gone)."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    folder = Path(local_file_uri_to_path(model.artifact_location))
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _prefect_state(home: Path, flow_run_id: str) -> str | None:
    """The state a flow run was left in, read from the Prefect home's own database."""
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        row = db.execute("SELECT state_type FROM flow_run WHERE id = ?", (flow_run_id,)).fetchone()
    return row[0] if row else None


def _merge_finished(merges: Path) -> bool:
    """A merge renamed into place in the cache (not one still being written into its hidden folder)."""
    return merges.is_dir() and any((m / "model.safetensors").is_file() for m in merges.iterdir() if not m.name.startswith("."))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def big_zoo(tmp_path_factory) -> Path:
    """A base and three models of one 20M-entry tensor (80 MB each): a merge takes long enough to be killed
    while it writes."""
    root = tmp_path_factory.mktemp("bigzoo")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5000, 4096, generator=gen)
    for name, tensor in [("base", base)] + [(f"m{i}", base + 0.01 * torch.randn(5000, 4096, generator=gen)) for i in range(3)]:
        (root / name).mkdir()
        save_file({"w": tensor.contiguous(), "b": tensor[0, :16].clone()}, str(root / name / "model.safetensors"))
    config = {"merge_method": "ties", "base_model": str(root / "base"), "models": [{"model": str(root / f"m{i}")} for i in range(3)]}
    config["parameters"] = {"density": 0.3}
    (root / "ties.yml").write_text(yaml.safe_dump(config))
    return root


def test_a_merge_killed_mid_write_leaves_what_its_rerun_removes(big_zoo, tmp_path):
    target = tmp_path / "out"
    proc = _start(["merge", str(big_zoo / "ties.yml"), str(target), "--device", "cpu"], tmp_path / "home", "killed")
    _kill_when(proc, lambda: any(p.name.startswith(".out.tmp-") and any(p.iterdir()) for p in tmp_path.iterdir()), "the merge started writing")
    assert not target.exists() and _leftovers(tmp_path), "a SIGKILL cannot clean up: the temporary folder stays"

    _run(["merge", str(big_zoo / "ties.yml"), str(target), "--device", "cpu"], tmp_path / "home", "rerun")
    assert _leftovers(tmp_path) == []  # the dead writer's folder went with the re-run
    _run(["merge", str(big_zoo / "ties.yml"), str(tmp_path / "straight"), "--device", "cpu"], tmp_path / "home", "straight")
    assert (target / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()


def test_a_live_writers_folder_is_never_removed(tmp_path):
    from pcbcore.scratch import owned_folder, remove_leftovers

    mine = owned_folder(tmp_path, "out")
    gone = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pcbcore.scratch import owned_folder; from pathlib import Path; import sys; print(owned_folder(Path(sys.argv[1]), 'out'))",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = Path(gone.stdout.strip())
    assert dead.is_dir() and mine.is_dir()
    assert remove_leftovers(tmp_path, "other") == []  # another target's folders are not this target's business
    assert remove_leftovers(tmp_path, "out") == [dead] and mine.is_dir() and not dead.exists()


# ---------------------------------------------------------------- run: evaluation, registration, concurrency


def _pipeline_config(zoo, path: Path, name: str, lam: float) -> Path:
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo.base),
        "models": [{"model": str(zoo.experts[t])} for t in zoo.tasks[:2]],
        "parameters": {"lambda": lam},
        "evaluation": {"tasks": zoo.tasks[:2], "include_path": str(zoo.task_dir), "limit": 20},
        "register_as": name,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_runs_killed_in_evaluation_and_after_registration_leave_no_zombie_and_no_second_version(micro_zoo, tmp_path):
    home = tmp_path / "home"
    first = _pipeline_config(micro_zoo, tmp_path / "first.yml", "faulty", 0.3)

    # Killed while evaluating: the merge is written, the MLflow run is open, nothing is registered.
    proc = _start(["run", str(first)], home, "eval-killed")
    merges = home / "cache" / "merges"
    _kill_when(proc, lambda: _merge_finished(merges), "the merge was written")
    (zombie,) = _runs(home)
    assert zombie.info.status == "RUNNING" and _versions(home, "faulty") == []

    _run(["run", str(first)], home, "eval-rerun")
    runs = {run.info.run_id: run for run in _runs(home)}
    assert runs[zombie.info.run_id].info.status == "KILLED" and "pcbmerge.killed" in runs[zombie.info.run_id].data.tags
    assert sorted(run.info.status for run in runs.values()) == ["FINISHED", "KILLED"]
    assert _prefect_state(home, zombie.data.tags["prefect.flow_run_id"]) == "CRASHED"
    assert _versions(home, "faulty") == [1]

    # Killed just after registering another merge: its re-run finds the version by content.
    second = _pipeline_config(micro_zoo, tmp_path / "second.yml", "faulty", 0.6)
    proc = _start(["run", str(second)], home, "register-killed")
    _kill_when(proc, lambda: _versions(home, "faulty") == [1, 2], "version 2 was registered")
    _run(["run", str(second)], home, "register-rerun")
    assert _versions(home, "faulty") == [1, 2]
    assert "RUNNING" not in {run.info.status for run in _runs(home)}
    assert _leftovers(home) == []

    # Two identical runs at once: one merge, one version.
    third = _pipeline_config(micro_zoo, tmp_path / "third.yml", "faulty", 0.9)
    both = [_start(["run", str(third)], home, f"concurrent-{i}") for i in range(2)]
    assert [proc.wait(timeout=300) for proc in both] == [0, 0], (home / "concurrent-0.log").read_text()[-2000:]
    assert _versions(home, "faulty") == [1, 2, 3]
    assert "RUNNING" not in {run.info.status for run in _runs(home)}


# ---------------------------------------------------------------- search: killed between rounds, resumed


def test_a_search_killed_between_rounds_resumes_to_the_uninterrupted_lambdas(micro_zoo, tmp_path):
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(micro_zoo.base),
        "models": [{"model": str(micro_zoo.experts[t])} for t in micro_zoo.tasks[:2]],
        "evaluation": {"tasks": micro_zoo.tasks[:2], "include_path": str(micro_zoo.task_dir), "limit": 8},
        "search": {"budget": 6, "popsize": 2, "seed": 0, "sigma0": 0.3, "workers": 1},
        "register_as": "searched-faulty",
    }
    config = tmp_path / "search.yml"
    config.write_text(yaml.safe_dump(data))
    straight = json.loads(_run(["search", str(config), "--json"], tmp_path / "straight", "straight").strip().splitlines()[-1])

    home = tmp_path / "killed"
    proc = _start(["search", str(config), "--json"], home, "killed")

    def parents() -> list:
        return [run for run in _runs(home) if "mlflow.parentRunId" not in run.data.tags]

    def one_round_saved() -> bool:
        runs = parents()
        return bool(runs) and bool(_client(home).get_metric_history(runs[0].info.run_id, "best_fitness"))

    _kill_when(proc, one_round_saved, "the first round was saved")
    assert [run.info.status for run in parents()] == ["RUNNING"]
    resumed = json.loads(_run(["search", str(config), "--resume", "--json"], home, "resumed").strip().splitlines()[-1])
    assert resumed["lambdas"] == straight["lambdas"] and resumed["evaluations"] == straight["evaluations"]
    assert [run.info.status for run in parents()] == ["FINISHED"]
    assert _versions(home, "searched-faulty") == [1]


# ---------------------------------------------------------------- corrupt caches, full disk


def test_a_truncated_result_cache_entry_is_recomputed(micro_zoo, tmp_path):
    from pipeline.evaluation import evaluate_path

    kwargs = {"include_path": micro_zoo.task_dir, "split": "validation", "limit": 4, "device": "cpu", "cache_dir": tmp_path}
    first = evaluate_path(micro_zoo.base, micro_zoo.tasks[:1], **kwargs)
    (entry,) = tmp_path.glob("*.json")
    entry.write_text(entry.read_text()[: len(entry.read_text()) // 2])  # a write cut short
    again = evaluate_path(micro_zoo.base, micro_zoo.tasks[:1], **kwargs)
    assert again == first and json.loads(entry.read_text())["score"]  # recomputed and rewritten whole


def test_a_full_disk_while_storing_components_leaves_nothing(tiny_zoo, tmp_path):
    base, models = tiny_zoo
    script = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)); "
        "from pcbcore.config import parse_merge_config; from pcbcore.components import compute_components; "
        "from pcbcore.errors import MergeInputError\n"
        "config = parse_merge_config({'merge_method': 'pcb', 'base_model': sys.argv[1], 'models': [{'model': m} for m in sys.argv[3:]],"
        " 'parameters': {'ratio': 0.1}})\n"
        "try:\n    compute_components(config, sys.argv[2], device='cpu')\nexcept MergeInputError as exc:\n    print(exc); sys.exit(2)\n"
    )
    out = tmp_path / "components"
    proc = subprocess.run([sys.executable, "-c", script, str(base), str(out), *map(str, models)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip().startswith(f"cannot write output folder '{out}'") and "nothing was left behind" in proc.stdout
    assert not out.exists() and _leftovers(tmp_path) == []


def test_an_unreachable_tracking_server_is_retried_then_one_sentence(micro_zoo, tmp_path):
    """The MLflow server down (killed, restarting): the tracking calls are retried, then the command ends
    with one sentence naming the store, exit status 3, and no merge output."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    config = _pipeline_config(micro_zoo, tmp_path / "run.yml", "unreachable", 0.3)
    home = tmp_path / "home"
    home.mkdir()
    env = {**_env(home), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pcbmerge", "run", str(config)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: a service did not answer after retries"), proc.stderr[-3000:]
    assert f"http://127.0.0.1:{port}" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - started >= 12  # the tracking task's retry delays, 2 s then 10 s
    assert not (home / "cache" / "merges").exists()


def test_two_watches_of_one_source_at_once_make_one_merge_and_one_version(micro_zoo, tmp_path):
    import shutil

    source = tmp_path / "incoming"
    for task in micro_zoo.tasks[:2]:
        shutil.copytree(micro_zoo.experts[task], source / task)
    config = tmp_path / "watch.yml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(micro_zoo.base), "register_as": "watched-twice"}))
    home = tmp_path / "home"
    both = [_start(["watch", str(config), "--source", str(source), "--json"], home, f"watch-{i}") for i in range(2)]
    assert [proc.wait(timeout=300) for proc in both] == [0, 0], (home / "watch-0.log").read_text()[-2000:]
    outcomes = [json.loads((home / f"watch-{i}.out").read_text().strip().splitlines()[-1]) for i in range(2)]
    assert {o["model"] for o in outcomes if o["merged"]} == {"models:/watched-twice/1"}
    assert _versions(home, "watched-twice") == [1]
    assert len([m for m in (home / "cache" / "merges").iterdir() if not m.name.startswith(".")]) == 1  # one merge folder
    assert "RUNNING" not in {run.info.status for run in _runs(home)} and _leftovers(home) == []


def test_a_watch_killed_while_merging_is_finished_by_its_next_run(micro_zoo, tmp_path):
    import shutil

    source = tmp_path / "incoming"
    for task in micro_zoo.tasks[:2]:
        shutil.copytree(micro_zoo.experts[task], source / task)
    config = tmp_path / "watch.yml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(micro_zoo.base), "register_as": "watched-killed"}))
    home, merges = tmp_path / "home", tmp_path / "home" / "cache" / "merges"
    proc = _start(["watch", str(config), "--source", str(source), "--json"], home, "killed")
    _kill_when(
        proc, lambda: merges.is_dir() and any(p.name.startswith(".") or (p / "model.safetensors").is_file() for p in merges.iterdir()), "the merge began"
    )
    again = json.loads(_run(["watch", str(config), "--source", str(source), "--json"], home, "again").strip().splitlines()[-1])
    # Either the killed run had registered already (nothing new) or the next run merges and registers.
    assert again["model"] in (None, "models:/watched-killed/1") and _versions(home, "watched-killed") == [1]
    assert "RUNNING" not in {run.info.status for run in _runs(home)} and _leftovers(home) == []


# ---------------------------------------------------------------- the tracking server killed, a full disk while registering


def test_a_tracking_server_killed_mid_run_ends_it_in_one_sentence_and_the_rerun_after_restart_succeeds(micro_zoo, tmp_path):
    """`pcbmerge up`'s MLflow server SIGKILLed while a run evaluates: the run's next tracking call is retried,
    then the command ends with one sentence (exit status 3); after `pcbmerge down` / `up` a plain re-run
    succeeds: the killed run's MLflow run is reaped, one version, the bytes of a merge that was never
    interrupted."""
    from infra.ports import free_port

    home, workdir = tmp_path / "home", tmp_path / "servers"
    up = ["up", "--workdir", str(workdir), "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()), "--json"]
    info = json.loads(_run(up, home, "up").strip().splitlines()[-1])
    uri = info["MLFLOW_TRACKING_URI"]
    # MLflow's own HTTP retries (7, up to minutes) off: the tracking task's retries are what is under test.
    env = {"PREFECT_API_URL": info["PREFECT_API_URL"], "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    config = _pipeline_config(micro_zoo, tmp_path / "run.yml", "server-killed", 0.3)
    try:
        proc = _start(["run", str(config)], home, "killed", env)
        merges = home / "cache" / "merges"

        deadline = time.monotonic() + 240
        while not _merge_finished(merges):  # the run is open on the server, and now evaluates
            assert proc.poll() is None and time.monotonic() < deadline, (home / "killed.log").read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(info["mlflow_pid"], signal.SIGKILL)
        assert proc.wait(timeout=240) == 3, (home / "killed.log").read_text()[-3000:]
        stderr = (home / "killed.log").read_text()
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: a service did not answer after retries") and uri in errors[0], stderr[-3000:]
        assert "Traceback" not in stderr

        _run(["down", "--workdir", str(workdir)], home, "down")
        _run(up, home, "up-again")  # the same ports, the same stores
        rerun = _run(["run", str(config)], home, "rerun", env=env)
        assert _versions(home, "server-killed", uri) == [1]
        statuses = sorted(run.info.status for run in _runs(home, uri=uri))
        assert statuses == ["FINISHED", "KILLED"]  # the killed run could not close its run; the re-run reaped it
        folder = Path(rerun.split("merged model: ", 1)[1].split()[0])
        (registered,) = (workdir / "mlartifacts").rglob("models/*/artifacts/model.safetensors")
        merge_config = {k: v for k, v in yaml.safe_load(config.read_text()).items() if k not in {"evaluation", "register_as"}}
        (tmp_path / "merge.yml").write_text(yaml.safe_dump(merge_config))
        _run(["merge", str(tmp_path / "merge.yml"), str(tmp_path / "straight"), "--device", "cpu"], home, "straight")
        assert registered.read_bytes() == (folder / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()
        assert _leftovers(home) == []
    finally:
        _run(["down", "--workdir", str(workdir)], home, "down-at-end")


@pytest.fixture(scope="module")
def wide_zoo(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A base and two fine-tunes of a Llama with a wide vocabulary: 8 MB each, larger than the run's own stores."""
    from builders import save_tiny_llama

    root = tmp_path_factory.mktemp("widezoo")
    base = save_tiny_llama(root / "base", seed=0, vocab_size=8192, hidden_size=128, intermediate_size=128)
    return base, [save_tiny_llama(root / f"ft{i}", seed=i + 1, base=base, vocab_size=8192, hidden_size=128, intermediate_size=128) for i in range(2)]


def test_a_full_disk_while_registering_leaves_no_version_and_no_partial_copy(wide_zoo, tmp_path, monkeypatch):
    """The run's files may not grow past 4 MB (RLIMIT_FSIZE, set on the running process once its merge is
    written) when it copies the 8 MB merge into the artifact store: one sentence, exit status 2, no version,
    the logged model FAILED without files. The re-run with the limit gone registers one version."""
    import hashlib
    import resource

    from pipeline.locks import exclusive

    base, models = wide_zoo
    home = tmp_path / "home"
    config = tmp_path / "run.yml"
    config.write_text(
        yaml.safe_dump({"merge_method": "linear", "base_model": str(base), "models": [{"model": str(m)} for m in models], "register_as": "full-disk"})
    )
    for key in ("MLFLOW_TRACKING_URI", "PCBMERGE_CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PCBMERGE_HOME", str(home))
    merges = home / "cache" / "merges"
    # Registration waits for this lock while the test holds it: the limit is in place before the copy begins.
    with exclusive(f"registry\nsqlite:///{home / 'mlflow.db'}\nfull-disk"):
        proc = _start(["run", str(config)], home, "full")
        deadline = time.monotonic() + 240
        while not _merge_finished(merges):
            assert proc.poll() is None and time.monotonic() < deadline, (home / "full.log").read_text()[-3000:]
            time.sleep(0.05)
        limit = 4 << 20
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    assert proc.wait(timeout=240) == 2, (home / "full.log").read_text()[-3000:]
    stderr = (home / "full.log").read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot register ") and "file too large" in errors[0], stderr[-3000:]
    assert "nothing was left behind" in errors[0] and "Traceback" not in stderr
    assert _versions(home, "full-disk") == [] and _client(home).search_registered_models() == []
    (failed,) = _logged_models(home).values()
    assert failed.status.value == "FAILED" and "pcbmerge.discarded" in failed.tags and _model_files(failed) == []
    assert [run.info.status for run in _runs(home)] == ["FAILED"]

    _run(["run", str(config)], home, "space-freed")
    assert _versions(home, "full-disk") == [1]
    version = _client(home).get_model_version("full-disk", "1")
    (merged,) = [m for m in merges.iterdir() if not m.name.startswith(".")]
    registered = _logged_models(home)[version.source.removeprefix("models:/")]
    assert _model_files(registered) == sorted(p.name for p in merged.iterdir() if p.is_file())
    assert (
        hashlib.sha256((Path(registered.artifact_location.removeprefix("file://")) / "model.safetensors").read_bytes()).digest()
        == hashlib.sha256((merged / "model.safetensors").read_bytes()).digest()
    )
    assert "RUNNING" not in {run.info.status for run in _runs(home)} and _leftovers(home) == []


# ---------------------------------------------------------------- a run killed while registering: its logged models

_KILLED_WHILE_REGISTERING = """
import os, signal, sys
from pathlib import Path
from mlflow.entities import LoggedModelStatus
from pipeline import registry, tracking

folder = Path(sys.argv[1])
run_id = tracking.start_run("pcbmerge", "killed while registering", {}, {})
client = tracking.client()
experiment = tracking.experiment_id("pcbmerge")
# A version registered by this run: its model stays.
kept = registry.register_model(run_id, "pcbmerge", str(folder), "kept", {"method": "linear", "fingerprint": "f0", "inputs": []})
# Killed after the copy, before the version: READY, no version.
ready = client.create_logged_model(experiment, name="orphan", source_run_id=run_id, tags={"pcbmerge.method": "linear"})
client.log_model_artifacts(ready.model_id, str(folder))
client.finalize_logged_model(ready.model_id, LoggedModelStatus.READY)
# Killed mid-copy: PENDING, some files written.
pending = client.create_logged_model(experiment, name="orphan", source_run_id=run_id, tags={"pcbmerge.method": "linear"})
client.log_model_artifacts(pending.model_id, str(folder / "part"))
print(run_id, client.get_model_version("kept", kept["version"]).source.removeprefix("models:/"), ready.model_id, pending.model_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_logged_models_of_a_run_killed_while_registering_are_discarded_by_the_next_run(micro_zoo, tmp_path):
    home = tmp_path / "home"
    folder = tmp_path / "weights"
    (folder / "part").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(1 << 16))
    (folder / "part" / "model.safetensors").write_bytes(os.urandom(1 << 10))
    home.mkdir()
    proc = subprocess.run([sys.executable, "-c", _KILLED_WHILE_REGISTERING, str(folder)], env=_env(home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run_id, kept, ready, pending = proc.stdout.split()
    models = _logged_models(home)
    assert models[ready].status.value == "READY" and models[pending].status.value == "PENDING" and _model_files(models[pending])

    config = tmp_path / "run.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "base_model": str(micro_zoo.base),
                "models": [{"model": str(micro_zoo.experts[micro_zoo.tasks[0]])}],
                "register_as": "after-orphans",
            }
        )
    )
    _run(["run", str(config)], home, "next")
    models = _logged_models(home)
    for orphan in (ready, pending):
        assert models[orphan].status.value == "FAILED" and "was killed before registering" in models[orphan].tags["pcbmerge.discarded"]
        assert _model_files(models[orphan]) == [] and not Path(models[orphan].artifact_location.removeprefix("file://")).parent.exists()
    assert models[kept].status.value == "READY" and _model_files(models[kept]) == ["model.safetensors", "part/model.safetensors"]
    runs = {run.info.run_id: run.info.status for run in _runs(home)}
    assert runs.pop(run_id) == "KILLED" and list(runs.values()) == ["FINISHED"]
    assert _versions(home, "kept") == [1] and _versions(home, "after-orphans") == [1]
