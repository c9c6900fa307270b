#!/usr/bin/env python3
"""Benchmark `pcbmerge merge` against mergekit and the raw IO floor on a synthetic Llama zoo.

    .venv/bin/python bench/merge_bench.py --sizes 50M,477M [--workdir bench/out] [--repeats 2]

Steps, per size (see bench/README.md):
1. Build (once, cached under WORKDIR/zoo/SIZE) a base + three fine-tunes in the Llama layout, bf16,
   sharded safetensors HF folders with config.json. Tensors are generated block-wise with seeded
   generators; a fine-tune is the base plus a small random delta.
2. Warm the page cache (read every input byte), then time, each in a fresh subprocess:
   - the raw floor: `read` (every input byte read once) and `avg` (a minimal per-tensor loop: read the
     four models, average in fp32, write bf16);
   - `pcbmerge merge` for each method;
   - mergekit (`mergekit-yaml`, CPU) for the methods both support, from a virtual environment this script
     creates at WORKDIR/mergekit-venv.
   Wall time, peak RSS of the child (wait4 rusage), input GB/s. With --repeats N each run is repeated and
   the minimum wall time reported (the first run also warms Python's imports).
3. Checks pcbmerge's outputs against mergekit's (linear, task_arithmetic, ties) in bf16 ulps.
4. Prints a markdown table and writes WORKDIR/results.json and WORKDIR/results.md, with each target
   of issue 2 as a ratio against mergekit's time in the same run.

Hidden helper modes run inside child processes: `_floor` (the floors) and `_compare`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ----------------------------------------------------------------------------------------------- zoo

VOCAB = 32000
N_FINETUNES = 3
# hidden, intermediate, heads, kv heads per size class; the layer count is chosen to hit the target size.
SHAPES = [
    (150e6, dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8)),
    (900e6, dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16)),
    (float("inf"), dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=32)),
]
ZOO_VERSION = 1


def parse_size(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise SystemExit(f"bad size {text!r}: use e.g. 50M, 477M, 1.5B")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]


def llama_config(target: float) -> dict:
    dims = next(d for limit, d in SHAPES if target < limit)
    h, i = dims["hidden_size"], dims["intermediate_size"]
    kv = h * dims["num_key_value_heads"] // dims["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    layers = max(1, round((target - 2 * VOCAB * h - h) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        **dims,
        "num_hidden_layers": layers,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def tensor_plan(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order transformers writes a Llama checkpoint."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    plan = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        plan += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    plan += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return plan


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def model_dirs(zoo: Path) -> list[Path]:
    return [zoo / "base"] + [zoo / f"ft{k}" for k in range(1, N_FINETUNES + 1)]


def build_zoo(zoo: Path, target: float, shard_bytes: int, seed: int) -> dict:
    """Write base + fine-tunes (cached: rebuilt only when the spec changes). Returns the config."""
    import torch
    from safetensors.torch import save_file

    cfg = llama_config(target)
    spec = {"version": ZOO_VERSION, "config": cfg, "shard_bytes": shard_bytes, "seed": seed, "n_finetunes": N_FINETUNES}
    stamp = zoo / "zoo.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return cfg
    if zoo.exists():
        shutil.rmtree(zoo)
    plan = tensor_plan(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = 2 * numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    total_params = sum(numel(s) for _, s in plan)
    print(
        f"[zoo] building {zoo.name}: {total_params / 1e6:.0f}M params/model, {len(shards)} shard(s)/model, {4 * 2 * total_params / 1e9:.2f} GB in all",
        file=sys.stderr,
        flush=True,
    )
    tmp = zoo.with_name(zoo.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    dirs = model_dirs(tmp)
    for d in dirs:
        d.mkdir(parents=True)
    t0 = time.perf_counter()
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        out = [dict() for _ in dirs]
        for name, shape in shard:
            weight_map[name] = fname
            tag = zlib.crc32(name.encode())
            gen = torch.Generator().manual_seed(seed * 1_000_003 + tag)
            if len(shape) == 1:  # RMSNorm weights
                base = 1.0 + 0.05 * torch.randn(shape, generator=gen)
            else:
                base = 0.02 * torch.randn(shape, generator=gen)
            base_bf16 = base.to(torch.bfloat16)
            out[0][name] = base_bf16
            base = base_bf16.float()
            for m in range(1, len(dirs)):
                g = torch.Generator().manual_seed(seed * 1_000_003 + tag + 7919 * m)
                delta = torch.randn(shape, generator=g).mul_(0.002 * (0.5 + 0.5 * m))
                out[m][name] = delta.add_(base).to(torch.bfloat16)
                del delta
        for d, tensors in zip(dirs, out):
            save_file(tensors, str(d / fname), metadata={"format": "pt"})
        del out
        print(f"[zoo]   shard {k}/{len(shards)} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    for d in dirs:
        index = {"metadata": {"total_size": 2 * total_params}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    stamp_tmp = tmp / "zoo.json"
    stamp_tmp.write_text(json.dumps(spec, indent=2))
    tmp.rename(zoo)
    print(f"[zoo] done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return cfg


def input_files(zoo: Path) -> list[Path]:
    return sorted(p for d in model_dirs(zoo) for p in d.glob("*.safetensors"))


def warm_cache(files: list[Path]) -> float:
    t0 = time.perf_counter()
    buf = bytearray(1 << 24)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------- merge configs

# (label, merge_method, common top-level parameters, pcbmerge-only parameters, per-model params, mergekit twin)
METHODS = {
    "linear": ("linear", {}, {}, {"weight": 1.0}, "linear"),
    "task_arithmetic": ("task_arithmetic", {}, {}, {"weight": 0.5}, "task_arithmetic"),
    "ties": ("ties", {}, {"scope": "tensor"}, {"weight": 1.0, "density": 0.2}, "ties"),
    "dare_ties": ("dare_ties", {}, {"seed": 0}, {"weight": 1.0, "density": 0.2}, "dare_ties"),
    "pcb_tensor": ("pcb", {}, {"ratio": 0.2, "scope": "tensor", "variant": "paper"}, {}, None),
    "pcb_model_paper": ("pcb", {}, {"ratio": 0.2, "scope": "model", "variant": "paper"}, {}, None),
    "pcb_model_release": ("pcb", {}, {"ratio": 0.2, "scope": "model", "variant": "release"}, {}, None),
    # the subspace methods and consensus masks at their papers' defaults (SVDs of every matrix, whole)
    "tsv": ("tsv", {}, {}, {}, None),
    "iso_c": ("iso_c", {}, {}, {}, None),
    "iso_cts": ("iso_cts", {}, {}, {}, None),
    "cart": ("cart", {}, {}, {}, None),
    "consensus_ta": ("consensus_ta", {}, {}, {"weight": 0.5}, None),
    "consensus_ties": ("consensus_ties", {}, {"scope": "tensor"}, {"weight": 1.0, "density": 0.2}, None),
    # the same files with pcbmerge's `compute_dtype: float32`: the components form (float32 maths, rounded
    # once) instead of mergekit's own op order, which the rows above follow to the bit
    "linear_f32": ("linear", {}, {}, {"weight": 1.0}, None),
    "task_arithmetic_f32": ("task_arithmetic", {}, {}, {"weight": 0.5}, None),
    "ties_f32": ("ties", {}, {"scope": "tensor"}, {"weight": 1.0, "density": 0.2}, None),
    "dare_ties_f32": ("dare_ties", {}, {"seed": 0}, {"weight": 1.0, "density": 0.2}, None),
}
# Labels whose pcbmerge config adds `compute_dtype: float32`.
COMPONENTS_FORM = {"linear_f32", "task_arithmetic_f32", "ties_f32", "dare_ties_f32"}
MERGEKIT_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]
# issue 2 targets: method -> (mergekit method whose time is the reference, max ratio)
TARGETS = {
    "linear": ("linear", 0.5),
    "task_arithmetic": ("task_arithmetic", 0.5),
    "ties": ("ties", 1 / 6),
    "dare_ties": ("ties", 1 / 6),
    "pcb_tensor": ("ties", 1 / 3),
    "pcb_model_paper": ("ties", 1 / 2),
    "pcb_model_release": ("ties", 1 / 2),
    "linear_f32": ("linear", 0.5),
    "task_arithmetic_f32": ("task_arithmetic", 0.5),
    "ties_f32": ("ties", 1 / 6),
    "dare_ties_f32": ("ties", 1 / 6),
}


def merge_yaml(label: str, zoo: Path, tool: str) -> dict:
    method, common, own, per_model, _ = METHODS[label]
    base, *fts = [str(d) for d in model_dirs(zoo)]
    params = dict(common)
    if tool == "pcbmerge":
        params.update(own)
    cfg: dict = {"merge_method": method}
    if method == "linear":  # the average of all four models (the base is a model too)
        cfg["models"] = [{"model": m, "parameters": dict(per_model)} for m in [base, *fts]]
    else:
        cfg["base_model"] = base
        cfg["models"] = [{"model": m, "parameters": dict(per_model)} for m in fts]
    if params:
        cfg["parameters"] = params
    cfg["dtype"] = "float32"  # the working dtype of both tools (pcbmerge follows mergekit's op order in it)
    cfg["out_dtype"] = "bfloat16"
    if tool == "pcbmerge" and label in COMPONENTS_FORM:
        cfg["compute_dtype"] = "float32"
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -------------------------------------------------------------------------------------------- running


@dataclass
class Run:
    size: str
    tool: str
    method: str
    wall_s: list[float] = field(default_factory=list)
    peak_rss_bytes: list[int] = field(default_factory=list)
    loadavg: list[float] = field(default_factory=list)
    input_bytes: int = 0
    ok: bool = True
    error: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def best(self) -> float | None:
        return min(self.wall_s) if self.wall_s else None

    @property
    def rss(self) -> int | None:
        return max(self.peak_rss_bytes) if self.peak_rss_bytes else None


def timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, int, int, str]:
    """Run cmd in a fresh process; (wall s, peak RSS bytes of the child, exit status, stdout)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err, open(log.with_suffix(".stdout"), "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        polled = [0]
        stop = threading.Event()

        def poll():  # the largest RSS of any process in the child's tree (wait4 misses grandchildren, e.g. under py-spy)
            try:
                import psutil

                root = psutil.Process(proc.pid)
            except Exception:
                return
            while not stop.wait(0.2):
                try:
                    for p in [root, *root.children(recursive=True)]:
                        polled[0] = max(polled[0], p.memory_info().rss)
                except Exception:
                    pass

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, max(usage.ru_maxrss * 1024, polled[0]), proc.returncode, log.with_suffix(".stdout").read_text()


def mergekit_env(venv: Path) -> Path:
    """Create the mergekit venv (default WORKDIR/mergekit-venv): torch (CPU wheel) first, then mergekit."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"[mergekit] creating {venv}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["mergekit"], check=True)
    return exe


def mergekit_version(exe: Path) -> str:
    r = subprocess.run([str(exe.parent / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def run_one(run: Run, cmd: list[str], out_dir: Path, logs: Path, repeats: int, keep: bool, env=None, pyspy: Path | None = None) -> None:
    for r in range(repeats):
        raw = logs / f"{run.size}-{run.tool}-{run.method}-{r}.pyspy.txt"
        full = cmd if pyspy is None else [str(pyspy), "record", "-r", "25", "--nonblocking", "--format", "raw", "-o", str(raw), "--", *cmd]
        if out_dir.exists():
            shutil.rmtree(out_dir)
        load = os.getloadavg()[0]
        wall, rss, rc, stdout = timed(full, logs / f"{run.size}-{run.tool}-{run.method}-{r}.log", env)
        if rc != 0:
            run.ok = False
            tail = (logs / f"{run.size}-{run.tool}-{run.method}-{r}.log").read_text().strip().splitlines()[-3:]
            run.error = f"exit {rc}: " + " | ".join(tail)
            print(f"  {run.tool:9s} {run.method:18s} FAILED {run.error}", file=sys.stderr, flush=True)
            return
        run.wall_s.append(wall)
        run.peak_rss_bytes.append(rss)
        run.loadavg.append(load)
        if stdout.strip().startswith("{"):
            try:
                rep = json.loads(stdout)
                run.extra = {k: rep[k] for k in ("bytes_read", "bytes_written", "seconds", "passes") if k in rep}
            except json.JSONDecodeError:
                pass
        if pyspy is not None and raw.exists():
            run.extra["profile"] = profile_summary(raw)
        print(
            f"  {run.tool:9s} {run.method:18s} run {r + 1}/{repeats}: {wall:7.2f} s  peak RSS {rss / 2**30:5.2f} GiB  "
            f"{run.input_bytes / wall / 1e9:5.2f} GB/s  (load {load:.1f})",
            file=sys.stderr,
            flush=True,
        )
    if not keep and out_dir.exists():
        shutil.rmtree(out_dir)


def profile_summary(raw: Path, top: int = 15) -> dict:
    """Aggregate py-spy's raw (collapsed) stacks: self samples per leaf frame, inclusive per function."""
    self_s: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        self_s[leaf] = self_s.get(leaf, 0) + n
        for f in {re.sub(r":\d+\)$", ")", fr) for fr in frames}:  # per function, not per line
            incl[f] = incl.get(f, 0) + n

    def pct(d):
        return [(k, round(100 * v / max(total, 1), 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    ours = {k: v for k, v in incl.items() if "pcbcore" in k}
    return {"samples": total, "self": pct(self_s), "inclusive_pcbcore": pct(ours)}


# --------------------------------------------------------------------------------- child: the floors


def floor_main(mode: str, out: str, dirs: list[str]) -> None:
    """`read`: read every input tensor once. `avg`: read four models per tensor, fp32 mean, write bf16."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    def tensors_of(d: Path):
        index = d / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        return [d / f for f in files]

    files = [tensors_of(Path(d)) for d in dirs]
    if mode == "read":
        total = 0
        for per_model in files:
            for f in per_model:
                with safe_open(str(f), "pt") as fh:
                    for name in fh.keys():
                        total += fh.get_tensor(name).numel()
        print(json.dumps({"elements": total}))
        return
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(dirs)
    for k, base_file in enumerate(files[0]):
        handles = [safe_open(str(per_model[k]), "pt") for per_model in files]
        shard = {}
        for name in handles[0].keys():
            acc = handles[0].get_tensor(name).float()
            for h in handles[1:]:
                acc.add_(h.get_tensor(name).float())
            shard[name] = acc.div_(n).to(torch.bfloat16)
        save_file(shard, str(out_dir / base_file.name), metadata={"format": "pt"})
        del shard
    shutil.copy(Path(dirs[0]) / "model.safetensors.index.json", out_dir)
    shutil.copy(Path(dirs[0]) / "config.json", out_dir)


# ------------------------------------------------------------------------------ child: output compare


def compare_main(a: str, b: str) -> None:
    """Per-tensor differences between two HF folders, in bf16 ulps (ordered-integer distance)."""
    import torch
    from safetensors import safe_open

    def load_index(d: Path) -> dict[str, Path]:
        index = d / "model.safetensors.index.json"
        if index.exists():
            return {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(d / "model.safetensors"), "pt") as fh:
            return {k: d / "model.safetensors" for k in fh.keys()}

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)  # sign-magnitude -> monotone integers

    ia, ib = load_index(Path(a)), load_index(Path(b))
    res = {
        "tensors": len(ia),
        "missing": sorted(set(ia) ^ set(ib)),
        "elements": 0,
        "differing": 0,
        "max_ulp": 0,
        "max_abs": 0.0,
        "ulp_hist": {},
        "dtype_mismatch": [],
        "worst_tensor": None,
    }
    handles: dict[Path, object] = {}

    def get(p: Path, name: str):
        if p not in handles:
            handles[p] = safe_open(str(p), "pt")
        return handles[p].get_tensor(name)

    for name in sorted(set(ia) & set(ib)):
        x, y = get(ia[name], name), get(ib[name], name)
        if x.dtype != y.dtype:
            res["dtype_mismatch"].append(f"{name}: {x.dtype} vs {y.dtype}")
        if x.dtype == torch.bfloat16 and y.dtype == torch.bfloat16:
            ulp = (ordered(x) - ordered(y)).abs()
        else:
            ulp = (ordered(x.to(torch.bfloat16)) - ordered(y.to(torch.bfloat16))).abs()
        res["elements"] += ulp.numel()
        nz = int((ulp > 0).sum())
        res["differing"] += nz
        m = int(ulp.max()) if ulp.numel() else 0
        if m > res["max_ulp"]:
            res["max_ulp"], res["worst_tensor"] = m, name
        for v, c in zip(*torch.unique(ulp.clamp(max=4), return_counts=True)):
            key = str(int(v)) if int(v) < 4 else ">=4"
            res["ulp_hist"][key] = res["ulp_hist"].get(key, 0) + int(c)
        res["max_abs"] = max(res["max_abs"], float((x.float() - y.float()).abs().max()))
    print(json.dumps(res))


# --------------------------------------------------------------------------------------------- report


def sizes_order(size: str) -> float:
    try:
        return parse_size(size)
    except SystemExit:
        return float("inf")


def fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def table(runs: list[Run], compares: dict) -> str:
    by = {(r.size, r.tool, r.method): r for r in runs}
    sizes = list(dict.fromkeys(r.size for r in runs))
    lines = [
        "| size | inputs GB | method | tool | wall s (min) | runs | peak RSS GiB | input GB/s | mergekit ref s | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        for (s, tool, method), r in by.items():
            if s != size:
                continue
            gb = r.input_bytes / 1e9
            ref = ratio = target = met = None
            if tool == "pcbmerge" and method in TARGETS:
                ref_method, target = TARGETS[method]
                mk = by.get((size, "mergekit", ref_method))
                ref = mk.best if mk and mk.ok else None
                if ref and r.best:
                    ratio = r.best / ref
                    rss_ok = mk.rss is None or r.rss is None or r.rss < mk.rss
                    met = ("yes" if ratio <= target else "NO") + ("" if rss_ok else " (RSS NO)")
            wall = fmt(r.best) if r.ok else "failed"
            gbps = fmt(r.input_bytes / r.best) if r.best else "—"
            if r.best:
                gbps = fmt(r.input_bytes / r.best / 1e9, ".3f")
            lines.append(
                f"| {size} | {gb:.2f} | {method} | {tool} | {wall} | {len(r.wall_s)} | {fmt(r.rss / 2**30 if r.rss else None)} | "
                f"{gbps} | {fmt(ref, '.1f')} | {fmt(ratio, '.3f')} | {fmt(target, '.3f')} | {met or '—'} |"
            )
    if compares:
        lines += [
            "",
            "Correctness (pcbmerge vs mergekit, bf16 outputs):",
            "",
            "| size | method | elements | differing | max ulp | max abs | ulp histogram | worst tensor |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (size, method), c in compares.items():
            if "error" in c:
                lines.append(f"| {size} | {method} | — | — | — | — | {c['error']} | — |")
                continue
            lines.append(
                f"| {size} | {method} | {c['elements']:,} | {c['differing']:,} ({100 * c['differing'] / max(c['elements'], 1):.4f}%) | "
                f"{c['max_ulp']} | {c['max_abs']:.3g} | {c['ulp_hist']} | {c['worst_tensor']} |"
            )
    profiled = [r for r in runs if r.extra.get("profile")]
    if profiled:
        lines += ["", "Hot spots (py-spy, share of samples; self = leaf frame, inclusive = pcbcore functions):", ""]
        for r in profiled:
            prof = r.extra["profile"]
            lines.append(
                f"- {r.size} {r.method}: self "
                + "; ".join(f"{k} {v}%" for k, v in prof["self"][:6])
                + " — inclusive "
                + "; ".join(f"{k} {v}%" for k, v in prof["inclusive_pcbcore"][:8])
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_floor":
        floor_main(argv[1], argv[2], argv[3:])
        return 0
    if argv and argv[0] == "_compare":
        compare_main(argv[1], argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50M,477M", help="params per model, comma separated (e.g. 50M,477M,1.5B)")
    ap.add_argument("--workdir", type=Path, default=HERE / "out", help="zoo cache, venvs, outputs, results (default bench/out)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"pcbmerge methods (default all: {','.join(METHODS)})")
    ap.add_argument("--mergekit-methods", default=",".join(MERGEKIT_METHODS), help="mergekit methods ('' to skip mergekit)")
    ap.add_argument("--no-floor", action="store_true", help="skip the raw floor")
    ap.add_argument("--repeats", type=int, default=2, help="runs per measurement; the minimum wall time is reported (default 2)")
    ap.add_argument("--mergekit-repeats", type=int, default=None, help="runs per mergekit measurement (default --repeats)")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="input shard size of the synthetic zoo (default 1 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pcbmerge", default=str(REPO / ".venv" / "bin" / "pcbmerge"), help="pcbmerge executable")
    ap.add_argument(
        "--mergekit-args", default="--no-copy-tokenizer --lazy-unpickle --out-shard-size 5B", help="extra mergekit-yaml arguments (CPU; default: %(default)s)"
    )
    ap.add_argument("--mergekit-venv", type=Path, default=None, help="mergekit virtual environment (default WORKDIR/mergekit-venv; created if missing)")
    ap.add_argument("--profile", action="store_true", help="run pcbmerge under py-spy (installed into the mergekit venv); hot spots go to results.json")
    ap.add_argument("--fresh", action="store_true", help="drop earlier results in WORKDIR/results.json (default: keep those not re-measured)")
    ap.add_argument("--no-compare", action="store_true", help="skip the output comparison")
    ap.add_argument("--build-only", action="store_true", help="build the zoo and stop")
    args = ap.parse_args(argv)

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    methods = [m for m in args.methods.split(",") if m]
    mk_methods = [m for m in args.mergekit_methods.split(",") if m]
    for m in methods + mk_methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {list(METHODS)}")
    mk_repeats = args.mergekit_repeats or args.repeats
    mk_exe = mergekit_env((args.mergekit_venv or work / "mergekit-venv").resolve()) if mk_methods and not args.build_only else None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    pyspy = None
    if args.profile:
        venv = (args.mergekit_venv or work / "mergekit-venv").resolve()
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pyspy = venv / "bin" / "py-spy"
        if not pyspy.exists():
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    results_path = work / "results.json"
    runs: list[Run] = []
    compares: dict = {}
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "mergekit_version": mergekit_version(mk_exe) if mk_exe else None,
        "mergekit_args": args.mergekit_args,
        "repeats": args.repeats,
        "mergekit_repeats": mk_repeats,
    }
    try:
        import psutil

        meta["machine"]["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass

    # Earlier results in the same workdir are kept unless this invocation re-measures them (--fresh drops them).
    previous: list[Run] = []
    if results_path.exists() and not args.fresh:
        try:
            old = json.loads(results_path.read_text())
            fields = set(Run.__dataclass_fields__)
            previous = [Run(**{k: v for k, v in r.items() if k in fields}) for r in old.get("runs", [])]
            for key, c in old.get("compare", {}).items():
                s_, m_ = key.split("/", 1)
                compares[(s_, m_)] = c
            for k, v in old.get("meta", {}).get("sizes", {}).items():
                meta.setdefault("sizes", {})[k] = v
        except (json.JSONDecodeError, TypeError, ValueError):
            previous = []

    def save():
        fresh = {(r.size, r.tool, r.method) for r in runs}
        allruns = [r for r in previous if (r.size, r.tool, r.method) not in fresh] + runs
        allruns.sort(key=lambda r: (sizes_order(r.size), ["floor", "pcbmerge", "mergekit"].index(r.tool) if r.tool in ("floor", "pcbmerge", "mergekit") else 9))
        data = {
            "meta": meta,
            "runs": [asdict(r) | {"best_s": r.best, "peak_rss": r.rss} for r in allruns],
            "compare": {f"{s}/{m}": c for (s, m), c in compares.items()},
        }
        results_path.write_text(json.dumps(data, indent=2))
        (work / "results.md").write_text(table(allruns, compares) + "\n")
        return allruns

    for size in sizes:
        zoo = work / "zoo" / size
        if not args.build_only:
            # Build in a child: a forked measurement starts with this process's pages, and Linux keeps that in
            # its peak RSS across exec, so a big build here would inflate every later reading.
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--sizes",
                    size,
                    "--build-only",
                    "--workdir",
                    str(work),
                    "--shard-gb",
                    str(args.shard_gb),
                    "--seed",
                    str(args.seed),
                    "--mergekit-methods",
                    "",
                ],
                check=True,
            )
        cfg = build_zoo(zoo, parse_size(size), int(args.shard_gb * 1e9), args.seed)
        if args.build_only:
            continue
        files = input_files(zoo)
        in_bytes = sum(f.stat().st_size for f in files)
        largest = max(numel(s) for _, s in tensor_plan(cfg))
        meta.setdefault("sizes", {})[size] = {
            "params_per_model": sum(numel(s) for _, s in tensor_plan(cfg)),
            "config": cfg,
            "input_bytes": in_bytes,
            "largest_tensor_numel": largest,
        }
        warm = warm_cache(files)
        print(f"[{size}] {in_bytes / 1e9:.2f} GB of inputs; cache warm-up read {warm:.1f}s", file=sys.stderr, flush=True)
        outs = work / "merged" / size
        logs = work / "logs"
        dirs = [str(d) for d in model_dirs(zoo)]
        if not args.no_floor:
            for mode in ("read", "avg"):
                r = Run(size, "floor", mode, input_bytes=in_bytes)
                run_one(
                    r,
                    [sys.executable, str(Path(__file__).resolve()), "_floor", mode, str(outs / f"floor-{mode}"), *dirs],
                    outs / f"floor-{mode}",
                    logs,
                    args.repeats,
                    keep=False,
                    env=env,
                )
                runs.append(r)
                save()
        for method in methods:
            yml = write_yaml(work / "configs" / size / f"pcbmerge-{method}.yml", merge_yaml(method, zoo, "pcbmerge"))
            out = outs / f"pcbmerge-{method}"
            r = Run(size, "pcbmerge", method, input_bytes=in_bytes)
            run_one(
                r,
                [args.pcbmerge, "merge", str(yml), str(out), "--device", "cpu", "--overwrite", "--json"],
                out,
                logs,
                args.repeats,
                keep=method in ("linear", "task_arithmetic", "ties") and method in mk_methods,
                env=env,
                pyspy=pyspy,
            )
            runs.append(r)
            save()
        for method in mk_methods:
            yml = write_yaml(work / "configs" / size / f"mergekit-{method}.yml", merge_yaml(method, zoo, "mergekit"))
            out = outs / f"mergekit-{method}"
            r = Run(size, "mergekit", method, input_bytes=in_bytes)
            run_one(r, [str(mk_exe), str(yml), str(out), *args.mergekit_args.split()], out, logs, mk_repeats, keep=True, env=env)
            runs.append(r)
            save()
            a = outs / f"pcbmerge-{method}"
            if not args.no_compare and method in ("linear", "task_arithmetic", "ties") and a.exists() and out.exists():
                p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_compare", str(a), str(out)], capture_output=True, text=True)
                try:
                    compares[(size, method)] = json.loads(p.stdout)
                except json.JSONDecodeError:
                    compares[(size, method)] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
                save()
            for d in (a, out):
                if d.exists():
                    shutil.rmtree(d)
    if args.build_only:
        return 0
    allruns = save()
    print()
    print(
        f"mergekit {meta['mergekit_version']} ({args.mergekit_args}); repeats: pcbmerge/floor {args.repeats}, mergekit {mk_repeats}; "
        f"2-core machine shared with other jobs: timings are noisy (see loadavg in results.json)"
    )
    print()
    print(table(allruns, compares))
    print(f"\nresults: {results_path} and {work / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
