"""Parity of pcbmerge with mergekit 0.1.5 on a corpus of real mergekit YAML configs.

For every config in `bench/mergekit_configs/` and every zoo dtype, the same merge is run twice — by
mergekit (`mergekit-yaml`, installed into a side venv) and by `pcbmerge merge` — on tiny synthetic Llama
models, and the two outputs are compared tensor by tensor in units in the last place (ulp) of the
output dtype. One row per (config, dtype):

    agree           every tensor bit-identical, or at most 1 ulp apart
    differ          same tensors and shapes, values further apart (max / mean ulp, fraction, worst tensor)
    refused         pcbmerge refused the config (its one-line message)
    mergekit-failed mergekit itself failed (its last line)
    pcbmerge-failed pcbmerge crashed rather than refusing (its last line)
    shape-mismatch  different tensor names, shapes, dtypes, layer count or tokenizer size
    error           the harness itself could not run the row (the exception's first line)

The corpus keeps each config's original model names; they are mapped onto the zoo by position (see
`bench/mergekit_configs/README.md`): the base model (or, without one, the first model named) becomes the
zoo's `base`, every other model in order of first mention `ft1` … `ft5`, the last of them `ft-vocab` (a
fine-tune with 8 added tokens) when the config asks for `tokenizer_source: union`, and each LoRA named in a
`model+lora` reference `lora1` … `lora7`. Layer ranges written for a bigger model are scaled onto the
zoo's layer count.

Run from the repository root (the side venv and zoos are built on first use, then reused):

    .venv/bin/python bench/mergekit_parity.py                         # whole corpus, fp32 and bf16
    .venv/bin/python bench/mergekit_parity.py --configs 'absa-ties*' --dtypes fp32,bf16,fp16 --keep
    .venv/bin/python bench/mergekit_parity.py --working-dtype float32   # mergekit computing in fp32 too

Prints a markdown table and writes `bench/out/parity.json`.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "bench" / "mergekit_configs"
OUT = ROOT / "bench" / "out"
PCBMERGE = ROOT / ".venv" / "bin" / "pcbmerge"

MERGEKIT_VERSION = "0.1.5"
# torch first and alone: it is a CPU wheel on this machine's disk, while mergekit's bare `torch`
# requirement would otherwise fetch a multi-GB CUDA build. transformers and safetensors are pinned to
# the project's own versions so both tools read and write the zoo with the same libraries.
SIDE_VENV_STEPS = (
    ["torch==2.13.0"],
    [f"mergekit=={MERGEKIT_VERSION}", "transformers==5.23.0", "safetensors==0.8.0"],
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The zoo: tiny Llamas, big enough for GQA, gradients over layers and slices, small enough that a
# merge takes about a second. Bump ZOO_VERSION whenever anything below changes.
ZOO_VERSION = 2
N_LAYERS = 8  # a five-point gradient like t: [0, 0.5, 0.3, 0.7, 1] still lands between layers
HIDDEN = 32
INTERMEDIATE = 64
N_HEADS = 4
N_KV_HEADS = 2  # grouped-query attention, as in Llama 3 and Mistral
VOCAB = 384
N_FINETUNES = 5  # the most fine-tunes any corpus config names besides its base
ADDED_TOKENS = ["<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<tool>", "</tool>", "<think>"]
N_LORAS = 7  # the most distinct adapters a corpus config names (six, plus one on its base)
LORA_RANK = 4
LORA_TARGETS = ("q_proj", "v_proj")

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",  # tiny tensors: threads only add noise on a shared two-core machine
    "TOKENIZERS_PARALLELISM": "false",
}


# --------------------------------------------------------------------------------------------------
# The side venv with mergekit


def install_mergekit(venv: Path) -> Path:
    """Create `venv` with mergekit 0.1.5 unless it is already there; return the `mergekit-yaml` path."""
    python, mergekit_yaml = venv / "bin" / "python", venv / "bin" / "mergekit-yaml"
    if not (mergekit_yaml.exists() and installed_version(python, "mergekit") == MERGEKIT_VERSION):
        log(f"installing mergekit {MERGEKIT_VERSION} into {venv} (a few minutes)")
        if not python.exists():
            subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
        for requirements in SIDE_VENV_STEPS:
            subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True, env=ENV)
    subprocess.run([str(mergekit_yaml), "--help"], check=True, capture_output=True, env=ENV)
    return mergekit_yaml


def installed_version(python: Path, package: str) -> str | None:
    if not python.exists():
        return None
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=ENV)
    return done.stdout.strip() if done.returncode == 0 else None


# --------------------------------------------------------------------------------------------------
# The zoo of tiny models


def build_zoo(zoo: Path, dtype_name: str) -> Path:
    """Write base, ft1…ft5, ft-vocab and lora1…lora3 in `dtype_name` under `zoo/<dtype>`, once."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = zoo / dtype_name
    stamp = root / "zoo.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == ZOO_VERSION:
        return root
    log(f"building the {dtype_name} zoo in {root}")
    shutil.rmtree(root, ignore_errors=True)
    dtype = DTYPES[dtype_name]

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()

    def tokenizer(extra: list[str]) -> PreTrainedTokenizerFast:
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        tok.add_tokens(extra)  # fresh wrapper each time: add_tokens changes the backend it wraps
        return tok

    def config(vocab_size: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_KV_HEADS,
            max_position_embeddings=128,
            tie_word_embeddings=False,  # an explicit lm_head, so both tools have it to merge
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )

    generator = torch.Generator().manual_seed(20260101)
    base = {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in LlamaForCausalLM(config(VOCAB)).state_dict().items()}
    base = {k: (torch.ones_like(v) + 0.1 * v if k.endswith("norm.weight") else v) for k, v in base.items()}

    def finetune(scale: float) -> dict[str, torch.Tensor]:
        # A fine-tune's task vector: dense small noise plus a sparse set of larger moves, so that the
        # magnitude trimming of TIES and friends has a real top-k to find.
        out = {}
        for k, v in base.items():
            noise = torch.randn(v.shape, generator=generator) * scale
            spikes = (torch.rand(v.shape, generator=generator) < 0.05) * torch.randn(v.shape, generator=generator) * scale * 8
            out[k] = v + noise + spikes
        return out

    def save_model(name: str, weights: dict[str, torch.Tensor], extra_tokens: list[str]) -> None:
        path = root / name
        model = LlamaForCausalLM(config(VOCAB + len(extra_tokens)))
        model.load_state_dict(weights)
        model.to(dtype).save_pretrained(path)
        tokenizer(extra_tokens).save_pretrained(path)

    save_model("base", base, [])
    for i in range(1, N_FINETUNES + 1):
        save_model(f"ft{i}", finetune(0.002 * i), [])
    vocab_ft = finetune(0.003)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        new_rows = torch.randn(len(ADDED_TOKENS), HIDDEN, generator=generator) * 0.05
        vocab_ft[key] = torch.cat([vocab_ft[key], new_rows])
    save_model("ft-vocab", vocab_ft, ADDED_TOKENS)
    for i in range(1, N_LORAS + 1):
        write_lora(root / f"lora{i}", root / "base", dtype, generator)

    for path in root.rglob("*.safetensors"):
        path.chmod(0o644)  # safetensors writes 0600 whatever the umask
    stamp.write_text(json.dumps({"version": ZOO_VERSION, "dtype": dtype_name}))
    return root


def write_lora(path: Path, base: Path, dtype: torch.dtype, generator: torch.Generator) -> None:
    """A peft-style LoRA adapter for the zoo's base: adapter_config.json + adapter_model.safetensors."""
    path.mkdir(parents=True)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": LORA_RANK,
        "lora_alpha": 2 * LORA_RANK,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    head_dim = HIDDEN // N_HEADS
    out_features = {"q_proj": N_HEADS * head_dim, "v_proj": N_KV_HEADS * head_dim}
    weights = {}
    for layer in range(N_LAYERS):
        for target in LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            # Both factors non-zero (peft starts B at zero), so the adapter really moves the weights.
            weights[f"{prefix}.lora_A.weight"] = (torch.randn(LORA_RANK, HIDDEN, generator=generator) * 0.05).to(dtype)
            weights[f"{prefix}.lora_B.weight"] = (torch.randn(out_features[target], LORA_RANK, generator=generator) * 0.05).to(dtype)
    save_file(weights, str(path / "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------------
# Mapping a corpus config onto the zoo


def input_parts(doc: dict) -> list[dict]:
    """The mappings that hold `models:` / `slices:`: the config itself, then each module of `modules:`."""
    modules = doc.get("modules")
    return [doc, *(body for body in (modules.values() if isinstance(modules, dict) else []) if isinstance(body, dict))]


def mentioned_models(doc: dict) -> list[str]:
    """Every model reference in the config, in the order a reader meets them: base first."""
    refs = []
    if isinstance(doc.get("base_model"), str):
        refs.append(doc["base_model"])
    for part in input_parts(doc):
        for entry in part.get("models") or []:
            refs.append(entry["model"])
        for piece in part.get("slices") or []:
            for source in piece.get("sources") or []:
                refs.append(source["model"])
    for source in (doc.get("tokenizer_source"), (doc.get("tokenizer") or {}).get("source")):
        if isinstance(source, str) and source not in ("base", "union"):
            refs.append(source)
    return refs


def wants_union(doc: dict) -> bool:
    return doc.get("tokenizer_source") == "union" or (doc.get("tokenizer") or {}).get("source") == "union"


def zoo_names(doc: dict) -> dict[str, str]:
    """Original model name → zoo model name, by position (see the module docstring)."""
    plain = []
    for ref in mentioned_models(doc):
        model = ref.split("+", 1)[0]
        if model not in plain:
            plain.append(model)
    names = {plain[0]: "base"} if plain else {}
    others = plain[1:]
    for i, model in enumerate(others):
        names[model] = f"ft{i % N_FINETUNES + 1}"
    if wants_union(doc) and others:
        names[others[-1]] = "ft-vocab"
    loras = []
    for ref in mentioned_models(doc):
        if "+" in ref and ref.split("+", 1)[1] not in loras:
            loras.append(ref.split("+", 1)[1])
    for i, lora in enumerate(loras):
        names[lora] = f"lora{i % N_LORAS + 1}"
    return names


def map_config(doc: dict, zoo: Path) -> dict:
    """The config with every model reference pointing into `zoo` and layer ranges fitted to it."""
    names = zoo_names(doc)

    def resolve(ref: str) -> str:
        parts = ref.split("+", 1)
        return "+".join(str(zoo / names[p]) for p in parts)

    doc = json.loads(json.dumps(doc))  # a deep copy of plain YAML data
    if isinstance(doc.get("base_model"), str):
        doc["base_model"] = resolve(doc["base_model"])
    ranges = []
    for part in input_parts(doc):
        for entry in part.get("models") or []:
            entry["model"] = resolve(entry["model"])
        for piece in part.get("slices") or []:
            for source in piece.get("sources") or []:
                source["model"] = resolve(source["model"])
                if "layer_range" in source:
                    ranges.append(source)
    if isinstance(doc.get("tokenizer_source"), str) and doc["tokenizer_source"] not in ("base", "union"):
        doc["tokenizer_source"] = resolve(doc["tokenizer_source"])
    tokenizer = doc.get("tokenizer")
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("source"), str) and tokenizer["source"] not in ("base", "union"):
        tokenizer["source"] = resolve(tokenizer["source"])
    fit_layer_ranges(ranges)
    return doc


def fit_layer_ranges(sources: list[dict]) -> None:
    """Scale layer ranges written for an L-layer model onto the zoo's N_LAYERS, keeping each non-empty.

    A plain clamp would turn a frankenmerge's [20, 40] into the empty [8, 8]; scaling by N/L, with L the
    largest end named, keeps the slices' proportions and overlaps.
    """
    if not sources:
        return
    largest = max(s["layer_range"][1] for s in sources)
    if largest <= N_LAYERS:
        return
    for source in sources:
        start, end = source["layer_range"]
        start, end = round(start * N_LAYERS / largest), round(end * N_LAYERS / largest)
        start = min(start, N_LAYERS - 1)
        source["layer_range"] = [start, max(end, start + 1)]


def describe_features(doc: dict) -> list[str]:
    """The config-language features a config uses, for the table and the corpus list."""
    features = []
    if doc.get("modules"):
        features.append("modules")
    if any(part.get("slices") for part in input_parts(doc)):
        features.append("slices")

    def parameter_values(params: Any) -> list[Any]:
        return list(params.values()) if isinstance(params, dict) else []

    values = []
    for part in input_parts(doc):
        values += parameter_values(part.get("parameters"))
        for entry in part.get("models") or []:
            if "parameters" in entry and entry["parameters"] is None:
                features.append("null-parameters")
            values += parameter_values(entry.get("parameters"))
        for piece in part.get("slices") or []:
            values += parameter_values(piece.get("parameters"))
    # A conditional parameter is a list of {filter?, value} entries; its values may be gradients too.
    conditions = [c for v in values if isinstance(v, list) for c in v if isinstance(c, dict)]
    plain = values + [c.get("value") for c in conditions]
    if any(isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) for v in plain):
        features.append("gradient")
    if any("filter" in c for c in conditions):
        features.append("filter")
    base = doc.get("base_model")
    if base and any(entry.get("model") == base for part in input_parts(doc) for entry in part.get("models") or []):
        features.append("base-in-models")
    if any("+" in ref for ref in mentioned_models(doc)):
        features.append("lora")
    source = doc.get("tokenizer_source") or (doc.get("tokenizer") or {}).get("source")
    if source:
        features.append("tokenizer:" + (source if source in ("base", "union") else "model"))
    if "tokenizer" in doc:
        features.append("tokenizer-block")
    for key in ("chat_template", "dtype", "out_dtype"):
        if key in doc:
            features.append(f"{key}={doc[key]}" if key != "chat_template" else "chat_template")
    return features


# --------------------------------------------------------------------------------------------------
# Running both tools


@dataclass
class Run:
    returncode: int | None  # None: timed out
    last_line: str
    seconds: float


def run_tool(command: list[str], timeout: float) -> Run:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return Run(None, f"timed out after {timeout:.0f} s", time.perf_counter() - start)
    lines = [line.strip() for line in (done.stderr + "\n" + done.stdout).splitlines() if line.strip()]
    if done.returncode != 0:
        # Prefer the error itself over progress bars and warnings printed after it.
        errors = [line for line in lines if "error" in line.lower()]
        lines = errors or lines
    return Run(done.returncode, lines[-1] if lines else "", time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# Comparing two merged folders


ULP_BITS = {torch.float32: (torch.int32, 32), torch.bfloat16: (torch.int16, 16), torch.float16: (torch.int16, 16)}


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Map floats to integers that are adjacent exactly when the floats are: the ulp number line.

    IEEE floats are sign-magnitude, so as signed integers the negatives run backwards; reflecting them
    (−magnitude) makes the order monotone and puts +0 and −0 on the same point.
    """
    int_dtype, bits = ULP_BITS[x.dtype]
    raw = x.contiguous().view(int_dtype).to(torch.int64)
    magnitude = raw & ((1 << (bits - 1)) - 1)
    return torch.where(raw < 0, -magnitude, magnitude)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in ulps of their (shared) dtype; NaN on either side counts as equal only to NaN."""
    distance = (ordered_bits(a) - ordered_bits(b)).abs()
    both_nan, one_nan = torch.isnan(a) & torch.isnan(b), torch.isnan(a) ^ torch.isnan(b)
    distance = torch.where(both_nan, torch.zeros_like(distance), distance)
    return torch.where(one_nan, torch.full_like(distance, 1 << 40), distance)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def read_shape_facts(folder: Path) -> dict[str, Any]:
    """config.json's layer count and vocabulary, and the tokenizer's size with added tokens."""
    from tokenizers import Tokenizer

    facts: dict[str, Any] = {}
    config = folder / "config.json"
    if config.exists():
        data = json.loads(config.read_text())
        facts["num_hidden_layers"] = data.get("num_hidden_layers")
        facts["vocab_size"] = data.get("vocab_size")
    tokenizer = folder / "tokenizer.json"
    facts["tokenizer_size"] = Tokenizer.from_file(str(tokenizer)).get_vocab_size(with_added_tokens=True) if tokenizer.exists() else None
    return facts


def compare_outputs(reference: Path, candidate: Path) -> tuple[str, str, dict[str, Any]]:
    """(status, detail, numbers) for pcbmerge's `candidate` folder against mergekit's `reference`."""
    ref_facts, cand_facts = read_shape_facts(reference), read_shape_facts(candidate)
    mismatched = [f"{k} mergekit={ref_facts[k]} pcbmerge={cand_facts[k]}" for k in ref_facts if ref_facts[k] != cand_facts[k]]
    ref, cand = read_tensors(reference), read_tensors(candidate)
    only_ref, only_cand = sorted(set(ref) - set(cand)), sorted(set(cand) - set(ref))
    if only_ref:
        mismatched.append(f"{len(only_ref)} tensors only in mergekit's output (e.g. {only_ref[0]})")
    if only_cand:
        mismatched.append(f"{len(only_cand)} tensors only in pcbmerge's output (e.g. {only_cand[0]})")
    for key in sorted(set(ref) & set(cand)):
        if ref[key].shape != cand[key].shape:
            mismatched.append(f"{key} shape mergekit={tuple(ref[key].shape)} pcbmerge={tuple(cand[key].shape)}")
        elif ref[key].dtype != cand[key].dtype:
            mismatched.append(f"{key} dtype mergekit={ref[key].dtype} pcbmerge={cand[key].dtype}")
    numbers: dict[str, Any] = {"mergekit": ref_facts, "pcbmerge": cand_facts, "tensors": len(ref)}
    if mismatched:
        return "shape-mismatch", "; ".join(mismatched[:3]) + (f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else ""), numbers

    total, differing, ulp_sum, worst_ulp, worst_key, max_abs = 0, 0, 0, 0, "", 0.0
    for key in sorted(ref):
        distance = ulp_distance(ref[key], cand[key])
        total += distance.numel()
        differing += int((distance > 0).sum())
        ulp_sum += int(distance.sum())
        max_abs = max(max_abs, float((ref[key].double() - cand[key].double()).abs().max())) if distance.numel() else max_abs
        tensor_max = int(distance.max()) if distance.numel() else 0
        if tensor_max > worst_ulp:
            worst_ulp, worst_key = tensor_max, key
    mean_ulp = ulp_sum / total if total else 0.0
    numbers.update(
        {"max_ulp": worst_ulp, "max_abs": max_abs, "mean_ulp": mean_ulp, "fraction_differing": differing / total if total else 0.0, "worst_tensor": worst_key}
    )
    if worst_ulp <= 1:
        detail = "bit-identical" if worst_ulp == 0 else f"≤1 ulp ({differing / total:.1%} of entries off by 1)"
        return "agree", detail, numbers
    detail = f"max {worst_ulp} ulp (abs {max_abs:.2g}), mean {mean_ulp:.3g} ulp, {differing / total:.1%} differ; worst {worst_key}"
    return "differ", detail, numbers


# --------------------------------------------------------------------------------------------------
# One row: a config in one dtype


@dataclass
class Row:
    config: str
    dtype: str
    method: str
    features: list[str]
    status: str
    detail: str
    mergekit_s: float | None = None
    pcbmerge_s: float | None = None
    numbers: dict[str, Any] = field(default_factory=dict)


def run_row(config: Path, dtype_name: str, zoo: Path, mergekit_yaml: Path, timeout: float, keep: bool, working_dtype: str | None) -> Row:
    doc = yaml.safe_load(config.read_text())
    label = dtype_name if working_dtype is None else f"{dtype_name}, dtype→{working_dtype}"
    row = Row(config.stem, label, str(doc.get("merge_method")), describe_features(doc), "error", "")
    work = OUT / "parity-runs" / (f"{config.stem}.{dtype_name}" + (f".{working_dtype}" if working_dtype else ""))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    mapped_doc = map_config(doc, zoo)
    if working_dtype is not None:
        # mergekit computes in `dtype` and writes `out_dtype` (default: `dtype`); overriding the first
        # while pinning the second isolates what the working precision alone changes.
        out_dtype = doc.get("out_dtype") or doc.get("dtype")
        mapped_doc["dtype"] = working_dtype
        if out_dtype:
            mapped_doc["out_dtype"] = out_dtype
    mapped = work / "config.yml"
    mapped.write_text(yaml.safe_dump(mapped_doc, sort_keys=False))

    mergekit_flags = ["--device", "cpu", "--random-seed", "0", "--quiet", "--lora-merge-cache", str(work / "lora-cache")]
    mergekit = run_tool([str(mergekit_yaml), str(mapped), str(work / "mergekit"), *mergekit_flags], timeout)
    pcbmerge = run_tool([str(PCBMERGE), "merge", str(mapped), str(work / "pcbmerge"), "--device", "cpu", "--overwrite"], timeout)
    row.mergekit_s, row.pcbmerge_s = round(mergekit.seconds, 1), round(pcbmerge.seconds, 1)

    if mergekit.returncode != 0:
        row.status, row.detail = "mergekit-failed", mergekit.last_line
        if pcbmerge.returncode != 0:
            row.detail += " | pcbmerge: " + pcbmerge.last_line.replace(f"{mapped}: ", "")
    elif pcbmerge.returncode == 2:
        row.status, row.detail = "refused", pcbmerge.last_line.replace(f"{mapped}: ", "")
    elif pcbmerge.returncode != 0:
        row.status, row.detail = "pcbmerge-failed", pcbmerge.last_line
    else:
        row.status, row.detail, row.numbers = compare_outputs(work / "mergekit", work / "pcbmerge")
    if not keep:
        shutil.rmtree(work / "mergekit", ignore_errors=True)
        shutil.rmtree(work / "pcbmerge", ignore_errors=True)
        shutil.rmtree(work / "lora-cache", ignore_errors=True)
    return row


def run_row_safely(*args) -> Row:
    """run_row, with any failure of the harness itself turned into a row: one odd config (unreadable
    YAML, a reference the mapping does not know, an unreadable output) must not cost the other rows."""
    config, dtype_name = args[0], args[1]
    try:
        return run_row(*args)
    except Exception as exc:  # noqa: BLE001 — reported as the row's status, never swallowed
        return Row(config.stem, dtype_name, "?", [], "error", f"{type(exc).__name__}: {exc}".splitlines()[0])


# --------------------------------------------------------------------------------------------------
# Output


def format_table(rows: list[Row]) -> str:
    lines = [
        "| config | dtype | method | features | status | detail | mergekit s | pcbmerge s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        detail = r.detail.replace("|", "\\|")
        lines.append(f"| {r.config} | {r.dtype} | {r.method} | {', '.join(r.features)} | {r.status} | {detail} | {r.mergekit_s} | {r.pcbmerge_s} |")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines.append("")
    lines.append("Totals: " + ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) + f" (of {len(rows)} rows)")
    return "\n".join(lines)


def describe_machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg": Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else None,
        "git_commit": commit,
        "mergekit": MERGEKIT_VERSION,
        "python": sys.version.split()[0],
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="*", help="glob over the corpus file names (without .yml), e.g. 'absa-*'")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated zoo dtypes from {sorted(DTYPES)}")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once (each runs both tools)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed to each tool per row")
    parser.add_argument("--keep", action="store_true", help="keep both merged folders under bench/out/parity-runs")
    parser.add_argument("--venv", type=Path, default=OUT / "mergekit-venv", help="side venv for mergekit")
    parser.add_argument(
        "--working-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="diagnostic: replace each config's dtype with this working dtype, keeping its output dtype as out_dtype",
    )
    parser.add_argument("--json", type=Path, default=OUT / "parity.json", help="where to write the rows as JSON")
    args = parser.parse_args(argv)

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype {unknown[0]!r}; choose from {sorted(DTYPES)}")
    configs = sorted(p for p in CORPUS.glob("*.yml") if fnmatch.fnmatch(p.stem, args.configs))
    if not configs:
        parser.error(f"no config in {CORPUS} matches {args.configs!r}")

    started = time.perf_counter()
    mergekit_yaml = install_mergekit(args.venv)
    zoos = {d: build_zoo(OUT / "parity-zoo", d) for d in dtypes}
    jobs = [(config, d, zoos[d], mergekit_yaml, args.timeout, args.keep, args.working_dtype) for config in configs for d in dtypes]
    log(f"running {len(jobs)} rows ({len(configs)} configs × {len(dtypes)} dtypes), {args.jobs} at a time")
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(lambda job: run_row_safely(*job), jobs):
            log(f"  {row.config} [{row.dtype}]: {row.status}")
            rows.append(row)

    machine = {**describe_machine(), "seconds": round(time.perf_counter() - started, 1), "rows": len(rows)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=2))
    print(format_table(rows))
    print(f"\n{machine['date']}, load average {machine['loadavg']}, commit {machine['git_commit']}, {machine['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
