"""Shared fixtures. Environment for the tools is set before anything imports them."""

from __future__ import annotations

import os
import tempfile

_home = tempfile.mkdtemp(prefix="pcbmerge-tests-")
for key, value in {
    "PCBMERGE_HOME": _home,
    "PREFECT_HOME": os.path.join(_home, "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": os.path.join(_home, "hf"),
    "MPLCONFIGDIR": os.path.join(_home, "mpl"),
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_generate_tests(metafunc):
    """Tests taking a `device` argument run on CPU, and on CUDA too where it exists."""
    if "device" in metafunc.fixturenames:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        metafunc.parametrize("device", devices)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (~10 s to start), for the tests that run flows and
    tasks through the real engine; `PREFECT_HOME` is a temporary folder (above), so no cache record leaks in
    from another session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A tiny random Llama base and three fine-tunes (float32), saved as HF folders."""
    from builders import build_tiny_zoo

    return build_tiny_zoo(tmp_path_factory.mktemp("tinyzoo"))


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """The micro model zoo (trained base, four experts, lm-eval tasks), built once per session (~20 s)."""
    from pipeline.zoo import build_zoo, load_zoo

    return load_zoo(build_zoo(tmp_path_factory.mktemp("microzoo") / "zoo", size="micro", seed=0))
