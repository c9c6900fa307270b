"""The streaming executor: walks the checkpoints block by block and applies a merge method.

Memory is bounded by one block of rows per model (`BLOCK_ELEMENTS` entries each, in float32) plus the
method's temporaries, whatever the model's size. A method's statistics are computed over its scope
(`pcbcore.stages`): for `scope: tensor`, each tensor's blocks are walked once per stage (a tensor that
fits in one block is read once and kept); for `scope: model`, every stage is one pass over all merged
tensors, then a final pass computes the components and writes them.

Public entry points:
- `merge_to_folder(config, out_dir)`: the CLI merge (components combined with the config's λ, block by
  block, written as sharded safetensors).
- `merge_state_dicts(config, base, models)`: the same merge of state dicts in memory.
- `stream_components`: the components C_i of eq. (1) block by block, which `pcbcore.components` stores
  for the CMA-ES search.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pcbcore.card import write_model_card
from pcbcore.checkpoint import ShardedWriter, TensorInfo, atomic_output, copy_side_files
from pcbcore.config import MergeConfig
from pcbcore.device import resolve_device
from pcbcore.errors import MergeInputError
from pcbcore.inputs import MergeInputs, StateDictReader, TensorReader, open_inputs, plan_inputs
from pcbcore.lines import layer_scales
from pcbcore.memory import bound_resident_memory, keep_freed_memory
from pcbcore.methods import combine, lambdas_of
from pcbcore.methods.base import BaseWeights, Pending, TensorInputs, unit_lambdas
from pcbcore.selection import sample_columns
from pcbcore.slices import resolve_job_params
from pcbcore.stages import Block, ScopeFacts, Stats, combine_partial, row_spans
from pcbcore.tokenizer import choose_chat_template, model_folder, set_vocab_size, write_chat_template, write_tokenizer

log = logging.getLogger(__name__)

# A tensor of at most BLOCK_ELEMENTS entries per model (16 MB in float32) is one block: its order statistics
# are selected in memory, without passes. A larger tensor streams in blocks of STREAM_BLOCK_ELEMENTS, whose
# task vectors and temporaries stay in the CPU's caches (1M: TIES over a 32000×512 embedding 25% faster
# than in 4M blocks). DARE's mask chunks hold STREAM_BLOCK_ELEMENTS entries too, so its streamed blocks draw
# whole chunks (`pcbcore.methods.dare`).
BLOCK_ELEMENTS = 1 << 22
STREAM_BLOCK_ELEMENTS = 1 << 20
DEFAULT_SHARD_BYTES = 5 * 10**9
# Columns sampled from a multi-block scope to bracket its order statistics (`pcbcore.selection`), the most
# reads per tensor for it (runs of adjacent rows at random places), and the size under which a tensor is
# sampled from a whole read.
SCOPE_SAMPLE = 1 << 18
SAMPLE_READS = 16
SMALL_TENSOR = 1 << 20

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def blocks_of(info: TensorInfo, whole: bool = False) -> list[Block]:
    """A tensor as one block when it holds at most BLOCK_ELEMENTS entries (or when the method needs it `whole`),
    else as blocks of whole rows of at most STREAM_BLOCK_ELEMENTS entries each (both read at call time, so
    tests can shrink them)."""
    shape = tuple(info.shape)
    if len(shape) == 0 or whole or info.numel <= BLOCK_ELEMENTS:
        return [Block(info.name, 0, shape)]
    spans = row_spans(shape, min(BLOCK_ELEMENTS, STREAM_BLOCK_ELEMENTS))
    return [Block(info.name, k, shape, span) for k, span in enumerate(spans)]


class BlockLoader:
    """Reads one block of every input, as float32 on the device: the base (m,) and task vectors (n, m).

    Keeps the last block, so a scope of one block is read once however many stages walk it. Checks that
    every input block is finite the first time it is read.
    """

    def __init__(self, inputs: MergeInputs, device: torch.device, working: torch.dtype | None = None, rounding: torch.dtype | None = None):
        self.inputs, self.device = inputs, device
        # mergekit's `dtype`: inputs are converted to `working`; with `rounding` set (mergekit's maths in
        # bf16/fp16), each task vector θ_i − θ_pre is rounded to it as mergekit computes it there.
        self.working, self.rounding = working, rounding
        self._last: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._checked: set[tuple] = set()
        self.bytes_read = 0

    def _raw(self, reader: TensorReader, name: str, rows) -> torch.Tensor:
        raw = reader.read(name, rows)
        self.bytes_read += raw.numel() * raw.element_size()
        raw = raw.to(self.device, non_blocking=True).reshape(-1)
        return raw if self.working is None or not raw.dtype.is_floating_point else raw.to(self.working)

    def _check(self, values: torch.Tensor, reader: TensorReader, name: str, rows) -> None:
        """Refuse NaN/Inf, once per input block. min and max propagate NaN and are ±Inf if any entry is:
        one reduction, ~15× faster than isfinite().all()."""
        key = (reader.label, name, rows)
        if key in self._checked:
            return
        low, high = torch.aminmax(values) if values.numel() else (torch.zeros(()), torch.zeros(()))
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise MergeInputError(f"tensor '{name}' of model '{reader.label}' contains NaN or Inf values")
        self._checked.add(key)

    def _read(self, reader: TensorReader, name: str, rows) -> torch.Tensor:
        block = self._raw(reader, name, rows).to(torch.float32)
        self._check(block, reader, name, rows)
        return block

    def load(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """θ_pre (m,) and the task vectors (n_t, m) of the tensor's input models (`TensorJob.models`)."""
        rows = block.rows
        key = (block.name, rows)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        job = self.inputs.jobs[block.name]
        if job.base is not None:
            base = self._read(job.base[0], job.base[1], rows)
        else:  # no base (passthrough): θ_pre = 0, τ_i = θ_i
            base = torch.zeros(_block_numel(block), dtype=torch.float32, device=self.device)
        task_vectors = torch.empty((len(job.models), base.numel()), dtype=torch.float32, device=self.device)
        rounded_base = base.to(self.rounding) if self.rounding is not None else None
        for k, (_, reader, name) in enumerate(job.models):
            if k in job.zero:
                task_vectors[k].zero_()
                continue
            # θ_i − θ_pre in float32. With θ_pre finite, τ_i is finite exactly where θ_i is (unless the
            # difference overflows), so checking τ_i checks the model. Converting first beats a mixed-dtype sub.
            raw = self._raw(reader, name, rows)
            if rounded_base is not None:  # as mergekit subtracts in its working dtype
                task_vectors[k].copy_(torch.sub(raw.to(self.rounding), rounded_base))
            else:
                torch.sub(raw.to(torch.float32), base, out=task_vectors[k])
            try:
                self._check(task_vectors[k], reader, name, rows)
            except MergeInputError:
                self._check(raw.to(torch.float32), reader, name, rows)  # names NaN/Inf in θ_i if it has any
                raise overflow_error(name, reader.label, torch.float32) from None
        self._last = (key, (base, task_vectors))
        return base, task_vectors

    def load_whole(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> TensorInputs:
        """Every input of one tensor whole (or its `rows`), in its shape and the working dtype — mergekit's
        `dtype`, else the inputs' promoted dtype, as mergekit aligns a group — for a method's `exact` op
        order. Checked finite."""
        job = self.inputs.jobs[info.name]
        shape = block_shape(info, rows)
        raws = [] if job.base is None else [(job.base[0], job.base[1])]
        raws += [(reader, name) for _, reader, name in job.models]
        values = [self._raw(reader, name, rows).reshape(shape) for reader, name in raws]  # in `working` when set
        dtype = self.working
        if dtype is None:
            dtype = values[0].dtype
            for value in values[1:]:
                dtype = torch.promote_types(dtype, value.dtype)
        values = [value.to(dtype) for value in values]
        for value, (reader, name) in zip(values, raws):
            self._check(value.reshape(-1), reader, name, rows)
        base = values.pop(0) if job.base is not None else None
        return TensorInputs(info.name, base, values, [k in job.zero for k in range(len(job.models))], dtype)

    def sample(self, scope: list[TensorInfo], entries: int) -> torch.Tensor:
        """About `entries` task-vector columns (n, s) drawn from the whole scope, each tensor in proportion to
        its size: a small tensor's random columns, a large tensor's every entry in at most SAMPLE_READS runs of
        adjacent rows at random places, long enough together to hold its share. Seeded by tensor name, though
        no result depends on the sample: it only guesses where an order statistic lies, and the more distinct
        entries it holds, the narrower that guess (`pcbcore.selection.bracket_bounds`)."""
        total = max(sum(t.numel for t in scope), 1)
        parts = []
        for info in scope:
            want = min(info.numel, max(1, round(entries * info.numel / total)))
            generator = torch.Generator().manual_seed(zlib.crc32(info.name.encode()))
            small = len(info.shape) <= 1 or info.numel <= SMALL_TENSOR
            job = self.inputs.jobs[info.name]
            for rows in [None] if small else sample_runs(info, want, generator):  # unchecked reads: the passes check every block
                models = [self._raw(reader, name, rows) for _, reader, name in job.models]
                base = self._raw(*job.base, rows) if job.base is not None else torch.zeros_like(models[0])
                columns = sample_columns(base.numel(), want, self.device, generator) if small else slice(None)
                parts.append(torch.stack([m[columns] for m in models]).to(torch.float32) - base[columns].to(torch.float32))
        return torch.cat(parts, dim=1)


def overflow_error(name: str, label: str, dtype: torch.dtype) -> MergeInputError:
    """Finite inputs whose difference does not fit the dtype the task vector is computed in."""
    return MergeInputError(f"tensor '{name}' of model '{label}' differs from the base by more than {str(dtype).removeprefix('torch.')} can hold")


def _block_numel(block: Block) -> int:
    rows = block.rows
    shape = block.shape if rows is None else (rows[1] - rows[0], *block.shape[1:])
    n = 1
    for s in shape:
        n *= s
    return n


def sample_runs(info: TensorInfo, want: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """Up to SAMPLE_READS disjoint runs of adjacent rows of a tensor, at random places, holding together at
    least `want` entries (or the whole tensor)."""
    n_rows, row = info.shape[0], info.numel // info.shape[0]
    reads = min(SAMPLE_READS, n_rows)
    length = min(n_rows // reads, -(-want // (row * reads)))
    if reads * length * row < want:  # the share is most of the tensor
        return [(0, n_rows)]
    slots = torch.randperm(n_rows // length, generator=generator)[:reads].sort().values.tolist()
    return [(slot * length, slot * length + length) for slot in slots]


def job_params(config: MergeConfig, loader: BlockLoader, info: TensorInfo) -> tuple:
    """The method's parameters for one tensor (resolved per tensor at plan time; the config's otherwise)."""
    job = loader.inputs.jobs.get(info.name)
    if job is None or job.params is None:
        return config.params, list(config.model_params)
    return job.params, list(job.model_params)


def compute_stats(config: MergeConfig, scope: list[TensorInfo], loader: BlockLoader, progress: Progress | None = None) -> Stats:
    """Run the method's stages over `scope`, one pass per stage, and return the finished statistics."""
    params, model_params = job_params(config, loader, scope[0]) if len(scope) == 1 else (config.params, list(config.model_params))
    stages = config.method.stages(params, model_params)
    single = len(scope) == 1 and len(blocks_of(scope[0], config.method.whole_tensor)) == 1
    sample = loader.sample(scope, SCOPE_SAMPLE) if not single and any(stage.start is not None for stage in stages) else None
    stats = Stats(ScopeFacts(sum(t.numel for t in scope), len(model_params), sample))
    planned, run = sum(stage.needed is None for stage in stages) + 1, 0
    for stage in stages:
        if stage.needed is not None and not stage.needed(stats):
            continue
        run += 1
        shortcut = single and stage.whole is not None
        if stage.start is not None and not shortcut:
            stage.start(stats)
        total = None
        for done, info in enumerate(scope, 1):
            for block in blocks_of(info, config.method.whole_tensor):
                _, task_vectors = loader.load(block)
                if not shortcut:
                    total = combine_partial(stage.op, total, stage.reduce(task_vectors, stats, block))
            if len(scope) > 1:
                bound_resident_memory()
                if progress:
                    progress(f"pass {run}/{max(planned, run + 1)}", done, len(scope))
        if shortcut:
            stage.whole(task_vectors, stats, block)
        else:
            stage.finish(stats, total)
    stats.scope = replace(stats.scope, sample=None)  # the sample only guides the passes
    return stats


def stream_components(
    config: MergeConfig, loader: BlockLoader, progress: Progress | None = None
) -> Iterator[tuple[TensorInfo, tuple[int, int] | None, torch.Tensor, torch.Tensor]]:
    """Yield (tensor, rows, base block (m,), components (n, m)) for every block of every merged tensor.

    A tensor that takes from only some of the models (a slice of other models) has zero components for the
    rest, so θ = θ_pre + Σ λ_i C_i holds over all n models."""
    n = len(config.models)
    for info, rows, base, components, job in _job_components(config, loader, progress):
        if job.indices != list(range(n)):
            full = torch.zeros((n, components.shape[1]), dtype=components.dtype, device=components.device)
            full.index_add_(0, torch.tensor(job.indices, device=components.device), components)
            components = full
        yield info, rows, base, components


def _job_components(config: MergeConfig, loader: BlockLoader, progress: Progress | None = None):
    """Yield (tensor, rows, base block (m,), components (n_t, m) of the tensor's own inputs, its job)."""
    inputs = loader.inputs
    method = config.method
    model_scope = method.scope(config.params) == "model"
    stats = compute_stats(config, inputs.merged, loader, progress) if model_scope else None
    lines = layer_scales(config.raw.lines, [t.name for t in inputs.merged]) if config.raw.lines else None
    for k, info in enumerate(inputs.merged):
        job = inputs.jobs[info.name]
        for block, base, components in _tensor_components(config, loader, info, stats if model_scope else None):
            yield info, block.rows, base, components if lines is None else components * lines[info.name], job  # LiNeS: λ(ℓ)·C_i
        bound_resident_memory()
        if progress:
            progress("merge" if not model_scope else f"pass {_passes(config)}/{_passes(config)}", k + 1, len(inputs.merged))


def _tensor_components(config: MergeConfig, loader: BlockLoader, info: TensorInfo, stats: Stats | None = None):
    """Yield (block, base block (m,), components (n_t, m)) for each block of one tensor; `stats` of a model
    scope, or None to compute the tensor's own."""
    method, job = config.method, loader.inputs.jobs[info.name]
    params, model_params = job_params(config, loader, info)
    stats = stats if stats is not None else compute_stats(config, [info], loader)
    for block in blocks_of(info, method.whole_tensor):
        base, task_vectors = loader.load(block)
        if method.needs_base:
            stats.put(BaseWeights(base, bool(job.zero) or job.base is None))  # no base: none to count
        yield block, base, method.components(task_vectors, stats, params, model_params, block)


def merged_blocks(
    config: MergeConfig, loader: BlockLoader, progress: Progress | None = None
) -> Iterator[tuple[TensorInfo, tuple[int, int] | None, torch.Tensor]]:
    """Yield (tensor, rows, θ_pre + Σ λ_i C_i as float32 (m,)) for every block of every merged tensor.

    For a method whose components are fixed multiples of the task vectors (C_i = s_i τ_i: linear, task
    arithmetic), s_i is folded into λ_i and the task vectors are combined directly, with no components built.
    """
    if config.exact:
        yield from _exact_merged(config, loader, progress)
        return
    rounding = config.round_dtype
    if config.method.scales is None:
        for info, rows, base, components, _ in _job_components(config, loader, progress):
            merged = combine(base, components, lambdas_of(job_params(config, loader, info)[1]))
            yield info, rows, merged if rounding is None else merged.to(rounding)
        return
    merged = loader.inputs.merged
    lines = layer_scales(config.raw.lines, [t.name for t in merged]) if config.raw.lines else None
    for k, info in enumerate(merged):
        params, model_params = job_params(config, loader, info)
        coefficients = lambdas_of(model_params) * torch.tensor(config.method.scales(params, model_params), dtype=torch.float32)
        tensor_coefficients = coefficients if lines is None else coefficients * lines[info.name]  # LiNeS: λ(ℓ)·s_i·λ_i
        for block in blocks_of(info, config.method.whole_tensor):
            base, task_vectors = loader.load(block)
            merged_block = combine(base, task_vectors, tensor_coefficients)
            yield info, block.rows, merged_block if rounding is None else merged_block.to(rounding)
        if progress:
            progress("merge", k + 1, len(merged))


# Entries above which a tensor is not overlapped with its neighbours: an embedding-sized tensor's sort threads
# next to another tensor's reads and mix raise the peak memory (477M TIES: 2.4 → 3.1 GiB) for little time.
OVERLAP_LIMIT = 1 << 24


class TorchThreads:
    """torch's intra-op thread count lowered while overlapped merges run, shared by merges in threads of one
    process (the pipeline's task runner): the first to lower it keeps the count it found, each lowers it to
    what it leaves torch at most, and the last to finish restores the count the first found."""

    _lock = threading.Lock()
    _users = 0
    _found = 0

    def __init__(self) -> None:
        self.entered = False

    def lower(self, busy: int) -> None:
        """Leave torch the threads that `busy` background threads do not take (at least one), once."""
        if self.entered:
            return
        with TorchThreads._lock:
            if TorchThreads._users == 0:
                TorchThreads._found = torch.get_num_threads()
            TorchThreads._users += 1
            self.entered = True
            torch.set_num_threads(min(torch.get_num_threads(), max(1, TorchThreads._found - busy)))

    def restore(self) -> None:
        if not self.entered:
            return
        with TorchThreads._lock:
            TorchThreads._users -= 1
            self.entered = False
            if TorchThreads._users == 0:
                torch.set_num_threads(TorchThreads._found)


def _exact_merged(config: MergeConfig, loader: BlockLoader, progress: Progress | None = None):
    """`merged_blocks` in mergekit's op order (`MergeMethod.exact`): each tensor whole, in the working dtype.
    A tensor whose parameters are pcbmerge's own (per-model λ_i, or a key mergekit lacks: the method's `exact`
    returns None) merges in the components form instead.

    A `Pending` result (TIES's sort simulations in their threads) is finished only after the next tensor is
    read and started, so those threads work while the main thread reads, mixes and writes. From the first
    one on, torch's own ops keep off the cores the sort threads of two tensors in flight take (at least one
    thread left): OpenMP threads on cores the sort threads also use stall at every barrier. (477M TIES
    in-process on two cores, medians of five interleaved runs: 13.0 s before, 11.4 s overlapped with one
    torch thread, 14.1 s overlapped with two, 12.8 s one torch thread without the overlap.)
    An error in the next tensor waits for the pending one's own, so the first tensor in order reports."""
    method, merged = config.method, loader.inputs.merged
    pending: tuple[int, TensorInfo, TensorInputs, Pending] | None = None
    torch_threads = TorchThreads()

    def checked(info: TensorInfo, inputs: TensorInputs, result: torch.Tensor | Pending) -> torch.Tensor:
        if isinstance(result, Pending):
            result = result.finish()
        _check_exact(result, inputs, loader.inputs.jobs[info.name], config.method_name)
        return result.reshape(-1)

    def done(k: int) -> None:
        bound_resident_memory()
        if progress:
            progress("merge", k + 1, len(merged))

    def flush():
        """Finish and yield the pending tensor, if any."""
        nonlocal pending
        if pending is not None:
            (k, info, inputs, result), pending = pending, None
            yield info, None, checked(info, inputs, result)
            done(k)

    try:
        for k, info in enumerate(merged):
            if pending is not None and pending[1].numel + info.numel > OVERLAP_LIMIT:
                yield from flush()
            # An elementwise op order gives the same entries block by block: memory stays one block per model.
            spans = [block.rows for block in blocks_of(info)] if method.exact_blocks else [None]
            try:
                params, model_params = job_params(config, loader, info)
                method.stages(params, model_params)  # the method's own refusals for this tensor, as `compute_stats` runs them
                inputs = loader.load_whole(info, spans[0])
                result = method.exact(inputs, params, model_params)
            except Exception:
                if pending is not None:
                    checked(*pending[1:])
                raise
            if isinstance(result, Pending) and len(spans) == 1 and info.numel <= OVERLAP_LIMIT:
                torch_threads.lower(2 * result.threads)  # this tensor's sort threads and the next one's
                yield from flush()
                pending = (k, info, inputs, result)
                continue
            yield from flush()
            if result is not None:
                for span, rows in enumerate(spans):
                    if span:
                        inputs = loader.load_whole(info, rows)
                        result = method.exact(inputs, params, model_params)
                    yield info, rows, checked(info, inputs, result)
            else:
                rounding = config.round_dtype
                for block, base, components in _tensor_components(config, loader, info):
                    block_merged = combine(base, components, lambdas_of(model_params))
                    yield info, block.rows, block_merged if rounding is None else block_merged.to(rounding)
            done(k)
        yield from flush()
    finally:
        torch_threads.restore()


def _check_exact(result: torch.Tensor, inputs: TensorInputs, job, method: str) -> None:
    """A merge of finite inputs that is not finite overflowed the working dtype: name the model whose task
    vector does not fit, as the components form does (one reduction when all is well)."""
    low, high = torch.aminmax(result) if result.numel() else (torch.zeros(()), torch.zeros(()))
    if torch.isfinite(low) and torch.isfinite(high):
        return
    for theta, (_, reader, _) in zip(inputs.models, job.models):
        if inputs.base is not None and not torch.isfinite(theta - inputs.base).all():
            raise overflow_error(inputs.name, reader.label, inputs.dtype)
    raise MergeInputError(f"tensor '{inputs.name}': merging it with {method} overflows {str(inputs.dtype).removeprefix('torch.')}")


def output_dtype(config: MergeConfig, info: TensorInfo) -> torch.dtype:
    """The dtype a merged tensor is written in: `out_dtype`, else `dtype`, else as stored — and, for a
    merge in mergekit's op order without `out_dtype`, the dtype mergekit's method returns."""
    if config.exact and config.raw.out_dtype is None and config.method.exact_dtype is not None and unit_lambdas(config.model_params):
        return config.method.exact_dtype(config.working_dtype or info.dtype)
    return config.out_dtype or info.dtype


def _passes(config: MergeConfig) -> int:
    """Passes over a model scope: one per stage that always runs, plus the final one (a selection whose
    bracket misses adds two)."""
    return sum(stage.needed is None for stage in config.method.stages(config.params, list(config.model_params))) + 1


def set_layer_count(config_json: Path, layers: int) -> None:
    """Write the output's layer count into its config.json (a slice merge can add or drop layers)."""
    if not config_json.is_file():
        return
    data = json.loads(config_json.read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in data or key == "num_hidden_layers":
            data[key] = layers
    if isinstance(data.get("layer_types"), list) and data["layer_types"]:
        types = data["layer_types"]
        data["layer_types"] = (types * (layers // len(types) + 1))[:layers]
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_side_files(config: MergeConfig, inputs: MergeInputs, folder: Path) -> None:
    """What a merged folder holds besides its weights and card: the base's config.json (its layer count a
    slice merge's, its `vocab_size` the output vocabulary's), generation config and tokenizer files, the
    tokenizer source's, the vocabulary's added tokens, the chat template."""
    base_dir, tokenizer_dir = model_folder(config.base_model), model_folder(config.tokenizer_source)
    copy_side_files(base_dir, folder, config.out_dtype)
    if inputs.num_layers is not None:
        set_layer_count(folder / "config.json", inputs.num_layers)
    if tokenizer_dir != base_dir:
        copy_side_files(tokenizer_dir, folder, None, tokenizer_only=True)
    if inputs.vocabulary is not None:
        write_tokenizer(inputs.vocabulary, folder)
        set_vocab_size(folder / "config.json", inputs.vocabulary.rows)
    template = choose_chat_template(config) if config.chat_template else None
    if template is not None:
        write_chat_template(template, folder)


def block_shape(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, ...]:
    """The shape of a block of a tensor: its rows [start, stop) (None: the whole tensor)."""
    return info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])


@dataclass
class MergeReport:
    out_dir: str
    method: str
    tensors_merged: int
    tensors_copied: int
    parameters_merged: int
    bytes_read: int
    bytes_written: int
    seconds: float
    device: str
    passes: int
    extra: dict = field(default_factory=dict)


def merge_to_folder(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    device: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
    config_text: str | None = None,
) -> MergeReport:
    """Merge as the config says and write a Hugging Face model folder atomically at `out_dir`."""
    start = time.perf_counter()
    keep_freed_memory()
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    inputs = open_inputs(config)
    try:
        with atomic_output(out_dir, overwrite=overwrite) as tmp:
            plan = [(t.name, output_dtype(config, t), t.shape) for t in inputs.merged]
            plan += [(t.name, t.dtype, t.shape) for t in inputs.passthrough]
            writer = ShardedWriter(tmp, plan, max_shard_bytes, metadata={"merged_by": "pcbmerge", "merge_method": config.method_name})
            loader = BlockLoader(inputs, dev, config.working_dtype, config.round_dtype if config.round_task_vectors else None)
            for info, rows, merged in merged_blocks(config, loader, progress):
                writer.write(info.name, merged.reshape(block_shape(info, rows)))
            for info in inputs.passthrough:
                writer.write(info.name, inputs.read_copied(info.name))
            writer.close()
            write_side_files(config, inputs, tmp)
            write_model_card(config, tmp, config_text)
    finally:
        inputs.close()
    return MergeReport(
        out_dir=str(out_dir.resolve()),
        method=config.method_name,
        tensors_merged=len(inputs.merged),
        tensors_copied=len(inputs.passthrough),
        parameters_merged=inputs.numel,
        bytes_read=loader.bytes_read,
        bytes_written=writer.total_bytes,
        seconds=time.perf_counter() - start,
        device=str(dev),
        passes=_passes(config) if config.method.scope(config.params) == "model" else 1,
    )


def merge_state_dicts(
    config: MergeConfig, base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], device: str = "auto"
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts exactly as `merge_to_folder` merges folders (same blocks, same maths,
    same checks of the inputs).

    `config.models` only labels the inputs here; `models` are the fine-tuned state dicts in that order.
    """
    if len(models) != len(config.models):
        raise MergeInputError(f"{len(models)} state dicts given for {len(config.models)} models in the config")
    inputs = plan_inputs(StateDictReader(base, config.base_model), [StateDictReader(sd, label) for sd, label in zip(models, config.models)])
    resolve_job_params(config, inputs)
    out: dict[str, list[torch.Tensor]] = {}
    for info, rows, merged in merged_blocks(
        config, BlockLoader(inputs, resolve_device(device), config.working_dtype, config.round_dtype if config.round_task_vectors else None)
    ):
        out.setdefault(info.name, []).append(merged.reshape(block_shape(info, rows)).to(output_dtype(config, info)))
    result = {name: torch.cat(blocks) if len(blocks) > 1 else blocks[0] for name, blocks in out.items()}
    result.update({info.name: base[info.name] for info in inputs.passthrough})
    return result
