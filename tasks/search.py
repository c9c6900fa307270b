"""Prefect tasks of the CMA-ES search: one candidate scored (`pipeline.candidates`), and the search state
saved to and read from the flow's result storage after every round, so a resumed search goes on exactly."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.candidates import candidate_key, score_candidate
from pipeline.search_state import CandidateRequest, CandidateScore, SearchState
from tasks.saved_state import read_state, write_state

STATE_PREFIX = "pcbmerge-search-state-"


def _candidate_cache_key(context, parameters) -> str:
    return candidate_key(parameters["request"])


# No `timeout_seconds`: candidates run in worker threads (local threads, or a Dask worker's thread), where
# Prefect cannot interrupt a blocking evaluation and only logs a warning per candidate.
@task(cache_key_fn=_candidate_cache_key, persist_result=True, task_run_name="candidate {label}")
def evaluate_candidate(request: CandidateRequest, label: str = "") -> CandidateScore:
    """Build one candidate in memory from the stored components and score it on the search split."""
    return score_candidate(request)


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, task_run_name="save search state")
def save_search_state(state: SearchState) -> None:
    """Write the state (JSON, the CMA-ES pickle in base64) into the flow's result storage, keyed by the search."""
    write_state(STATE_PREFIX + state.key, state.model_dump_json().encode())


def load_search_state(key: str) -> SearchState | None:
    """The state saved by the last finished round of the search `key`, or None if there is none."""
    content = read_state(STATE_PREFIX + key)
    return None if content is None else SearchState.model_validate_json(content)
