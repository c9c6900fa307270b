"""Prefect tasks of the tuner (`flows.tune`): its state saved to and read from the flow's result storage after
every stage and CMA-ES round, its candidates and leaderboard tracked in MLflow, and the leaderboard
published as Prefect artifacts. Candidates themselves are the search's task (`tasks.search.evaluate_candidate`)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline import tuning
from pipeline.tuning import LeaderboardRow, TuneState
from tasks.saved_state import read_state, write_state
from tasks.track import TRACKING

STATE_PREFIX = "pcbmerge-tune-state-"
LEADERBOARD_ARTIFACT = "tune-leaderboard"  # Prefect artifact keys: lowercase letters, digits and dashes


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, task_run_name="save tune state")
def save_tune_state(state: TuneState) -> None:
    """Write the tuner's progress (JSON) into the flow's result storage, keyed by the tuning run."""
    write_state(STATE_PREFIX + state.key, state.model_dump_json().encode())


def load_tune_state(key: str) -> TuneState | None:
    """The progress saved by the last finished stage or round of the tuning run `key`, or None."""
    content = read_state(STATE_PREFIX + key)
    return None if content is None else TuneState.model_validate_json(content)


@task(name="track-tune-candidates", **TRACKING)
def track_tune_candidates(run_id: str, label: str, stage: str, step: int, candidates: list[dict[str, Any]]) -> None:
    """A nested MLflow run per candidate of one stage, and the stage's best and mean fitness."""
    tuning.log_candidates(run_id, label, stage, step, candidates)


@task(name="publish-leaderboard", **TRACKING)
def publish_leaderboard(run_id: str, rows: list[LeaderboardRow], split: str) -> str:
    """The leaderboard as Prefect artifacts (a table and a markdown page, key `tune-leaderboard`) and as
    MLflow artifacts under `tune/`; returns the plain-text table."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown, text = tuning.leaderboard_markdown(rows, split), tuning.format_leaderboard(rows)
    winner = next(r.method for r in rows if r.winner)
    create_table_artifact(table=tuning.leaderboard_table(rows), key=LEADERBOARD_ARTIFACT, description=f"tuned merges; winner: {winner}")
    create_markdown_artifact(markdown=markdown, key=f"{LEADERBOARD_ARTIFACT}-page", description=f"tuned merges; winner: {winner}")
    tuning.log_leaderboard(run_id, [r.model_dump(mode="json") for r in rows], markdown, text)
    return text
