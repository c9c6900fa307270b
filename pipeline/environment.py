"""Process-wide settings of the third-party tools we drive (Prefect, MLflow, HF datasets, tokenizers):
offline-friendly, quiet defaults that explicit user settings override, and where HF datasets writes."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

# Third-party progress bars and chatter, off unless asked for (`quiet_third_party`): tqdm reads `TQDM_*` when it
# is imported (lm-eval's "Running loglikelihood requests"), HF datasets and the Hub have their own switches,
# transformers' "Loading weights" / "Writing model shards" bars follow the Hub's.
QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables..." and the like
}
QUIET_LOGGERS = (
    "httpx",
    "lm_eval",
    "lm-eval",
    "mlflow",
    "alembic",
    "datasets",
    "filelock",
    "urllib3",
    "transformers",
    "matplotlib",
    "huggingface_hub",
    "fsspec",
)


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


def quiet_third_party(home: Path | None = None) -> None:
    """Silence what the tools we drive print on their own: progress bars, INFO chatter, lm-eval's
    `fatal: not a git repository` from the git it runs for a commit hash, matplotlib's font-cache notes.
    Explicit user settings win; call it before those libraries are imported."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if home is not None:  # a lasting matplotlib cache: its font list is built once, not once per temporary folder
        os.environ.setdefault("MPLCONFIGDIR", str(home / "matplotlib"))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    after_import("lm_eval.loggers.utils", _quiet_git_hash)
    after_import("tqdm.std", _quiet_tqdm)


def _quiet_tqdm(module) -> None:
    """Every tqdm bar off, even those whose caller passes `disable=False` (lm-eval's "Running generate_until
    requests"), which `TQDM_DISABLE` alone does not reach. Subclasses (tqdm.auto, the Hub's) inherit it."""
    cls = module.tqdm
    if getattr(cls.__init__, "_pcbmerge_quiet", False):
        return
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    __init__._pcbmerge_quiet = True
    cls.__init__ = __init__


def _quiet_git_hash(module) -> None:
    """lm-eval records the commit of the working folder with `git describe`, whose stderr reaches our console
    ("fatal: not a git repository", once per evaluation) when the folder is not a repository: the same call, quiet."""
    fallback = module.get_commit_from_path

    def get_git_commit_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return fallback(os.getcwd())

    module.get_git_commit_hash = get_git_commit_hash


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `hook(module)` once, right after `name` is first imported (before anyone copies its names)."""

    def __init__(self, name: str, hook) -> None:
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, hook = spec.loader, self.hook

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                hook(module)

        spec.loader = Loader()
        return spec


def after_import(name: str, hook) -> None:
    """`hook(module)` after `name` is imported: at once if it already is, else on its first import."""
    if name in sys.modules:
        hook(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, hook))


def point_datasets_cache(path: Path) -> None:
    """Send HF datasets' Arrow cache into our cache folder rather than `$HF_HOME` (process-wide setting)."""
    import datasets.config

    path.mkdir(parents=True, exist_ok=True)
    datasets.config.HF_DATASETS_CACHE = path
    datasets.config.DOWNLOADED_DATASETS_PATH = path / "downloads"
    datasets.config.EXTRACTED_DATASETS_PATH = path / "downloads" / "extracted"
