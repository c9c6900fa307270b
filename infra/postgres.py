"""PostgreSQL for the servers' stores: `postgresql://USER:PASSWORD@HOST:PORT` becomes two databases, `prefect`
and `mlflow` (created when missing). Prefect and MLflow each keep their schema version in a table named
`alembic_version`, so they cannot share one database. Prefect reaches it through asyncpg
(`postgresql+asyncpg://...`), MLflow through psycopg 3 (`postgresql+psycopg://...`)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pcbcore.errors import MergeInputError


def database_urls(database_url: str | None, workdir: Path) -> tuple[str, str]:
    """(Prefect's connection URL, MLflow's backend store URI) for SQLite files in `workdir` or a PostgreSQL server."""
    if database_url is None:
        return f"sqlite+aiosqlite:///{workdir / 'prefect' / 'prefect.db'}", f"sqlite:///{workdir / 'mlflow.db'}"
    parts = urlsplit(database_url)
    if parts.scheme not in {"postgresql", "postgres"} or not parts.hostname:
        raise MergeInputError(f"--database-url '{redact(database_url)}' must look like postgresql://USER:PASSWORD@HOST:PORT")
    server = parts._replace(scheme="postgresql", path="", query="", fragment="")
    ensure_databases(urlunsplit(server._replace(scheme="postgresql+psycopg", path="/postgres")), ["prefect", "mlflow"], shown=redact(database_url))
    prefect = urlunsplit(server._replace(scheme="postgresql+asyncpg", path="/prefect"))
    mlflow = urlunsplit(server._replace(scheme="postgresql+psycopg", path="/mlflow"))
    return prefect, mlflow


def ensure_databases(maintenance_url: str, names: list[str], shown: str) -> None:
    """Create the databases that do not exist yet on the server `maintenance_url` points to."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(maintenance_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            existing = {row[0] for row in conn.execute(sqlalchemy.text("SELECT datname FROM pg_database"))}
            for name in names:
                if name not in existing:
                    conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise MergeInputError(f"cannot reach PostgreSQL at {shown}: {reason}") from None
    finally:
        engine.dispose()


def redact(url: str) -> str:
    """A URL with its password replaced by `***` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
