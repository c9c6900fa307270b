"""Prefect tasks of the CMA-ES search: one candidate scored (`pipeline.candidates`), and the search state
saved to and read from the flow's result storage after every round, so a resumed search goes on exactly."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.candidates import candidate_key, score_candidate
from pipeline.search_state import CandidateRequest, CandidateScore, SearchState

STATE_PREFIX = "pcbmerge-search-state-"


def _candidate_cache_key(context, parameters) -> str:
    return candidate_key(parameters["request"])


# No `timeout_seconds`: candidates run in worker threads (local threads, or a Dask worker's thread), where
# Prefect cannot interrupt a blocking evaluation and only logs a warning per candidate.
@task(cache_key_fn=_candidate_cache_key, persist_result=True, task_run_name="candidate {label}")
def evaluate_candidate(request: CandidateRequest, label: str = "") -> CandidateScore:
    """Build one candidate in memory from the stored components and score it on the search split."""
    return score_candidate(request)


def _storage():
    """The flow's result storage (a Prefect filesystem block: local by default, S3/GCS/... if configured)."""
    from prefect.results import get_default_result_storage, get_result_store

    return get_result_store().result_storage or get_default_result_storage(_sync=True)


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, task_run_name="save search state")
def save_search_state(state: SearchState) -> None:
    """Write the state (JSON, the CMA-ES pickle in base64) into the flow's result storage, keyed by the search."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    result = _storage().write_path(STATE_PREFIX + state.key, state.model_dump_json().encode())
    if hasattr(result, "__await__"):
        run_coro_as_sync(result)


def load_search_state(key: str) -> SearchState | None:
    """The state saved by the last finished round of the search `key`, or None if there is none."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    try:
        content = _storage().read_path(STATE_PREFIX + key)
        if hasattr(content, "__await__"):
            content = run_coro_as_sync(content)
    except (ValueError, OSError):  # LocalFileSystem: ValueError "path does not exist"
        return None
    return SearchState.model_validate_json(content)
