"""Process-wide settings of the third-party tools we drive (Prefect, MLflow, HF datasets, tokenizers):
offline-friendly, quiet defaults that explicit user settings override, and where HF datasets writes."""

from __future__ import annotations

import os
from pathlib import Path


def quiet_defaults() -> None:
    """Offline-friendly defaults for the tools we drive; explicit user settings win."""
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        # Artifact downloads draw tqdm bars on stderr; they only add noise to our CLI output.
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }.items():
        os.environ.setdefault(key, value)


def point_datasets_cache(path: Path) -> None:
    """Send HF datasets' Arrow cache into our cache folder rather than `$HF_HOME` (process-wide setting)."""
    import datasets.config

    path.mkdir(parents=True, exist_ok=True)
    datasets.config.HF_DATASETS_CACHE = path
    datasets.config.DOWNLOADED_DATASETS_PATH = path / "downloads"
    datasets.config.EXTRACTED_DATASETS_PATH = path / "downloads" / "extracted"
