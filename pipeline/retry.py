"""Which failures are worth another try (a dropped connection, a server restarting, a locked SQLite store),
and Prefect's `retry_condition_fn` built from such a predicate. Bad input is never retried."""

from __future__ import annotations

from collections.abc import Callable

from pcbcore.errors import MergeInputError


class TransientFetchError(RuntimeError):
    """A source that may answer on the next try (network hiccup, server restarting): retried."""


def is_transient_tracking_error(exc: BaseException) -> bool:
    """A tracking server that is restarting or a SQLite store locked by another writer: worth a retry."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        text = str(exc)
        # A server that is down or restarting: MLflow's HTTP client reports it as an INTERNAL_ERROR whose
        # message carries the connection failure.
        unreachable = text.startswith("API request to") and any(s in text for s in ("Max retries exceeded", "Connection refused", "Connection aborted"))
        return exc.error_code in {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"} or "database is locked" in text or unreachable
    try:
        import requests
    except ImportError:  # pragma: no cover - requests comes with mlflow
        return False
    return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))


def is_transient(exc: BaseException) -> bool:
    """Errors worth another try: connection trouble and server-side failures, never bad input."""
    if isinstance(exc, MergeInputError):
        return False
    if isinstance(exc, (TransientFetchError, ConnectionError, TimeoutError)):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    return is_transient_tracking_error(exc)


def retry_when(predicate: Callable[[BaseException], bool]) -> Callable:
    """A Prefect `retry_condition_fn(task, task_run, state)`: retry only when the failure satisfies `predicate`."""

    def condition(task, task_run, state) -> bool:
        exc = state.result(raise_on_failure=False)
        return isinstance(exc, BaseException) and predicate(exc)

    return condition
