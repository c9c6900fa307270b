"""Test builders: tiny Llama checkpoints (a base and fine-tunes that differ by random task vectors), and a
served `pcbmerge serve` process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_llama(folder: Path, seed: int, base: Path | None = None, scale: float = 0.05, dtype=torch.float32, **config) -> Path:
    """Save a tiny Llama at `folder`: random weights, or `base`'s weights plus a seeded random task vector."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config))
    if base is not None:
        base_model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), base_model.named_parameters()):
                p.copy_(q + scale * torch.randn(q.shape, generator=gen))
    model.to(dtype).save_pretrained(folder)
    return folder


def build_tiny_zoo(root: Path, n_models: int = 3, dtype=torch.float32) -> tuple[Path, list[Path]]:
    base = save_tiny_llama(root / "base", seed=0, dtype=dtype)
    models = [save_tiny_llama(root / f"ft{i}", seed=i + 1, base=base, dtype=dtype) for i in range(n_models)]
    return base, models


@contextlib.contextmanager
def serving(config: Path, info: dict, folder: Path, **extra_env: str):
    """`pcbmerge serve --config CONFIG` in its own process (working in `folder`), pointed at the servers
    `pcbmerge up --json` described in `info`; yields (process, log file) and stops it at the end — before the
    servers are stopped: a runner whose server is gone hangs on SIGTERM."""
    env = {
        **os.environ,
        "PREFECT_API_URL": info["PREFECT_API_URL"],
        "MLFLOW_TRACKING_URI": info["MLFLOW_TRACKING_URI"],
        "PCBMERGE_HOME": str(folder / "home"),
        "PREFECT_HOME": str(folder / "prefect"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        **extra_env,
    }
    log = folder / "serve.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pcbmerge.cli", "serve", "--config", str(config)],
            env=env, cwd=folder, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield proc, log
    finally:
        proc.terminate()  # the runner pauses its deployments and exits
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
