"""The flows as deployments run them: the search with the task runner the environment's settings give
(a Dask scheduler at `PCBMERGE_DASK_ADDRESS`, else threads; `infra/task_runners.py`). `infra/prefect.yaml` names
these entrypoints, so a worker applies its own settings when it loads the flow."""

from flows.merge import merge_flow
from flows.search import search_flow as _search_flow
from flows.watch import watch_flow
from infra.task_runners import task_runner

search_flow = _search_flow.with_options(task_runner=task_runner())

__all__ = ["merge_flow", "search_flow", "watch_flow"]
