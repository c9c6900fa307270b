"""Task-runner settings for the coefficient search: local threads, a local Dask cluster, or a Dask scheduler.

Dask worker processes run Prefect tasks and need a Prefect API. Without a server each worker would start
its own temporary one (measured: a 4-task map took 44 s that way, 18 s against one server), so when no
`PREFECT_API_URL` is set, `shared_prefect_api()` starts one local Prefect server for the flow and its
workers (the workers inherit `PREFECT_API_URL` from the environment when the cluster spawns them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.task_runners import ThreadPoolTaskRunner

from pcbmerge.search_config import SearchSettings
from pcbmerge.settings import load_settings


def task_runner(search: SearchSettings):
    """Threads by default; `DaskTaskRunner` on a `LocalCluster` (`dask_workers`) or at `dask_address`
    (the config's, else the `PCBMERGE_DASK_ADDRESS` setting)."""
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


def settings_task_runner(max_workers: int):
    """The task runner a flow gets when it runs as a deployment: a Dask scheduler when `PCBMERGE_DASK_ADDRESS`
    is set on the serving process or worker, else `max_workers` threads. Read when the flow module is
    imported, which is when a served run or a worker loads it."""
    address = load_settings().dask_address
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=max_workers)


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
