"""Task-runner settings for the coefficient search: local threads, a local Dask cluster, or a Dask scheduler.

Dask worker processes run Prefect tasks and need a Prefect API. Without a server each worker would start
its own temporary one (measured: a 4-task map took 44 s that way, 18 s against one server), so when no
`PREFECT_API_URL` is set, `shared_prefect_api()` starts one local Prefect server for the flow and its
workers (the workers inherit `PREFECT_API_URL` from the environment when the cluster spawns them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.search_config import SearchSettings
from pipeline.settings import load_settings


def task_runner(search: SearchSettings | None = None):
    """The search's task runner. With the config's search settings (the CLI): `DaskTaskRunner` at its
    `dask_address`, else on a `LocalCluster` of `dask_workers` processes, else the `PCBMERGE_DASK_ADDRESS`
    setting, else `workers` threads. Without (a deployment, read when the deployment is built by the
    serving process or loaded by a worker): the `PCBMERGE_DASK_ADDRESS` setting, else two threads."""
    search = search or SearchSettings()
    address = search.dask_address or (None if search.dask_workers else load_settings().dask_address)
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    if search.dask_workers:
        from prefect_dask import DaskTaskRunner

        # One thread per worker process: torch and lm-eval use the process's cores; parallelism comes
        # from the processes.
        return DaskTaskRunner(cluster_kwargs={"n_workers": search.dask_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"})
    return ThreadPoolTaskRunner(max_workers=search.workers)


def uses_dask(search: SearchSettings) -> bool:
    return bool(search.dask_address or search.dask_workers or load_settings().dask_address)


@contextmanager
def shared_prefect_api() -> Iterator[str]:
    """A Prefect API that this process and the Dask workers it spawns share (see the module docstring)."""
    import prefect.settings
    from prefect.server.api.server import SubprocessASGIServer

    url = prefect.settings.PREFECT_API_URL.value()
    before = os.environ.get("PREFECT_API_URL")
    server = None
    if not url:
        server = SubprocessASGIServer()
        server.start(timeout=prefect.settings.PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        url = server.api_url
    os.environ["PREFECT_API_URL"] = url  # for the worker processes
    try:
        with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: url}):
            yield url
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before
        if server is not None:
            server.stop()


def run_search(config, resume: bool = False, stop_after_rounds: int | None = None):
    """Run `search_flow` on the task runner the config asks for (Dask workers share one Prefect API)."""
    from flows.search import search_flow

    with shared_prefect_api() if uses_dask(config.search) else nullcontext():
        return search_flow.with_options(task_runner=task_runner(config.search))(config, resume=resume, stop_after_rounds=stop_after_rounds)
