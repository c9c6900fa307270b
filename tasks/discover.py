"""`discover_checkpoints`: what a watched source holds now (`pipeline.discovery.discover`), looked up
afresh on every run and retried on transient errors."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from pipeline.discovery import DiscoveredCheckpoint, discover
from pipeline.retry import is_transient, retry_when


@task(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=retry_when(is_transient),
    cache_policy=NO_CACHE,  # the whole point is to look again
    task_run_name="discover {source}",
)
def discover_checkpoints(source: str, cache_dir: str) -> list[DiscoveredCheckpoint]:
    """The checkpoints in `source` now, sorted by ref."""
    return discover(source, cache_dir)
