"""Environment settings, read in one place and passed down.

| variable | default | meaning |
|---|---|---|
| `PCBMERGE_HOME` | `./.pcbmerge` | working folder: MLflow store, caches, Prefect home |
| `PCBMERGE_CACHE_DIR` | `$PCBMERGE_HOME/cache` | evaluation results, fingerprints, components |
| `MLFLOW_TRACKING_URI` | `sqlite:///$PCBMERGE_HOME/mlflow.db` | MLflow tracking store |
| `PCBMERGE_DEVICE` | `auto` | `auto`, `cpu`, `cuda`, `cuda:N` |
| `PCBMERGE_DASK_ADDRESS` | unset | a Dask scheduler (`tcp://host:8786`) for search candidates; unset: threads in the flow's process |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    cache_dir: Path
    tracking_uri: str
    device: str
    dask_address: str | None = None

    @property
    def artifact_dir(self) -> Path:
        return self.home / "mlartifacts"


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    home = Path(env.get("PCBMERGE_HOME", ".pcbmerge")).expanduser().resolve()
    cache_dir = Path(env.get("PCBMERGE_CACHE_DIR", home / "cache")).expanduser().resolve()
    tracking_uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    return Settings(
        home=home,
        cache_dir=cache_dir,
        tracking_uri=tracking_uri,
        device=env.get("PCBMERGE_DEVICE", "auto"),
        dask_address=env.get("PCBMERGE_DASK_ADDRESS") or None,
    )
