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


def save_with_added_tokens(source: Path, folder: Path, tokens: list[str], seed: int = 0) -> Path:
    """`source` (a Hugging Face folder with a tokenizer) saved at `folder` with `tokens` added to its tokenizer
    and seeded random rows for them in its embeddings and head: a fine-tune that brings its own vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    rows = model.get_input_embeddings().num_embeddings
    tokenizer.add_tokens(tokens)
    model.resize_token_embeddings(rows + len(tokens), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[rows:] = torch.randn(len(tokens), weight.shape[1], generator=gen)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_lora_adapter(model: Path, folder: Path, seed: int, r: int = 2, alpha: float = 4.0, scale: float = 0.2) -> Path:
    """A peft LoRA adapter folder for `model` (a Llama): seeded random factors on every layer's q_proj and v_proj."""
    import json

    from safetensors.torch import save_file

    from pcbcore.checkpoint import CheckpointReader

    reader = CheckpointReader(model)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, info in reader.tensors.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")):
            out_features, in_features = info.shape
            prefix = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{prefix}.lora_A.weight"] = scale * torch.randn(r, in_features, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = scale * torch.randn(out_features, r, generator=gen)
    reader.close()
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": str(model)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def random_models(seed: int, n: int, shapes=((3, 5), (7,), (2, 2, 3))):
    """A random base state dict and `n` fine-tunes of it (base + 0.1·noise), for the method property tests."""
    gen = torch.Generator().manual_seed(seed)
    base = {f"t{k}": torch.randn(s, generator=gen) for k, s in enumerate(shapes)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(n)]
    return base, models


def run(method, params, base, models, per_model=None):
    """`merge_state_dicts` of `models` around `base` with `method`, its top-level and per-model parameters."""
    from pcbcore.config import parse_merge_config
    from pcbcore.executor import merge_state_dicts

    entries = [{"model": f"m{i}", "parameters": (per_model[i] if per_model else {})} for i in range(len(models))]
    config = parse_merge_config({"merge_method": method, "base_model": "base", "models": entries, "parameters": params})
    return merge_state_dicts(config, base, models, device="cpu")
