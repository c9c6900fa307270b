"""mergekit's output slices: which input tensors make each output tensor, and with which parameters.

A `slices:` file builds the output's layers slice by slice (`mergekit.plan.MergePlanner`): a slice whose
sources take `layer_range: [a, b)` of each model makes b − a output layers, numbered on from the previous
slice; output layer k of the slice merges layer a + k of every source. Ranges may overlap or repeat
(passthrough "frankenmerges"), so the output can have more layers than any input; its config.json says
how many. Tensors outside the layers come from the sources of the first slice (those before the layers:
the embeddings) or of the last one (the final norm and the head), read at the same name, with gradient
position t = 0. A `models:` file is one slice over all of each model's layers.

Inside a slice of L layers, layer k has gradient position t = k / (L − 1) (t = 1 when L = 1), at which
list-valued parameters are read (`pcbcore.gradients`).
"""

from __future__ import annotations

import json
from collections import defaultdict

from pcbcore.checkpoint import CheckpointReader, TensorInfo
from pcbcore.config import MULTI_MODULE_ARCHITECTURES, MergeConfig, SliceSpec
from pcbcore.errors import MergeInputError
from pcbcore.gradients import layer_of
from pcbcore.inputs import MergeInputs, TensorJob, TensorReader
from pcbcore.tokenizer import model_folder

# Tensors outside the layers that come before them (taken from the first slice's sources); every other one
# comes after them (the last slice's).
PRE_LAYER_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")


class LayerIndex:
    """A model's tensors by layer: layer → {suffix: tensor name}, and the tensors outside the layers."""

    def __init__(self, reader: TensorReader):
        self.reader = reader
        self.layers: dict[int, dict[str, str]] = defaultdict(dict)
        self.prefix: str | None = None
        self.outside: list[str] = []
        for name in reader.tensors:
            found = layer_of(name)
            if found is None:
                self.outside.append(name)
                continue
            prefix, index, suffix = found
            self.prefix = self.prefix or prefix
            self.layers[index][suffix] = name

    @property
    def count(self) -> int:
        return max(self.layers) + 1 if self.layers else 0


def refuse_multi_module(config: MergeConfig, ref: str, reader: TensorReader) -> None:
    """Refuse, in one sentence, a model of several modules (one of mergekit's multi-module architectures by its
    config.json, or tensors in more than one layer stack) in a `modules:` or `slices:` merge: pcbmerge plans
    a single layer stack per model, which is all of a single-module model."""
    architecture = None
    config_json = model_folder(ref) / "config.json"
    if config_json.is_file():
        try:
            architectures = json.loads(config_json.read_text()).get("architectures") or []
        except (ValueError, AttributeError):
            architectures = []
        architecture = next((a for a in architectures if a in MULTI_MODULE_ARCHITECTURES), None)
    stacks = sorted({found[0] for found in map(layer_of, reader.tensors) if found is not None})
    if architecture is None and len(stacks) < 2:
        return
    if architecture is not None:
        what = f"a {architecture}, whose modules mergekit names {', '.join(MULTI_MODULE_ARCHITECTURES[architecture])}"
    else:
        what = f"a model of {len(stacks)} layer stacks ({', '.join(prefix + 'N' for prefix in stacks)}), several modules to mergekit"
    key = f"modules.{config.module}" if config.module is not None else "slices"
    raise MergeInputError(f"{config.source}: key '{key}': model '{reader.label}' is {what}, and pcbmerge merges only single-module models by slices or modules")


def gradient_position(k: int, n_layers: int) -> float:
    """mergekit's t of layer k in a slice of n_layers layers."""
    return k / (n_layers - 1) if n_layers > 1 else 1.0


def resolve_job_params(config: MergeConfig, inputs: MergeInputs) -> MergeInputs:
    """Resolve each tensor's parameters of a `models:` merge (one slice over every layer)."""
    index = LayerIndex(inputs.base) if inputs.base is not None else None
    n_layers = index.count if index is not None else 0
    for name, job in inputs.jobs.items():
        found = layer_of(name)
        t = gradient_position(found[1], n_layers) if found is not None and n_layers else 0.0
        params, model_params = config.tensor_params(0, name, t, [(i, config.models[i], source) for i, _, source in job.models])
        inputs.jobs[name] = TensorJob(job.info, job.base, job.models, params, tuple(model_params), job.zero)
    return inputs


def plan_slices(config: MergeConfig, allow_pickle: bool, open_reader=None) -> MergeInputs:
    """Open every model a slice names (through `open_reader(ref)` when given: LoRA and vocabulary
    applied) and plan each output tensor's inputs, checking before any heavy work that every input
    tensor exists with the same shape."""
    readers: dict[str, CheckpointReader] = {}

    def reader_of(model: str) -> CheckpointReader:
        if model not in readers:
            readers[model] = open_reader(model) if open_reader is not None else CheckpointReader(model, allow_pickle=allow_pickle)
        return readers[model]

    try:
        return _plan(config, reader_of, readers)
    except BaseException:
        for reader in readers.values():
            reader.close()
        raise


def _plan(config: MergeConfig, reader_of, readers: dict) -> MergeInputs:
    indexes: dict[str, LayerIndex] = {}

    def index_of(model: str) -> LayerIndex:
        if model not in indexes:
            indexes[model] = LayerIndex(reader_of(model))
        return indexes[model]

    base_ref = None if config.zero_base else config.base_model
    base_reader = reader_of(base_ref) if base_ref is not None else None
    takes_base = config.method.base_may_be_a_model
    slices = [
        _slice_inputs(config, spec, base_ref if spec.base_model is None or base_ref is None else spec.base_model, takes_base, index_of)
        for spec in config.slices
    ]

    jobs: list[TensorJob] = []
    copied: dict[str, tuple[TensorReader, str]] = {}
    copied_infos: list[TensorInfo] = []

    def add(out_name: str, slice_index: int, t: float, base: tuple | None, models: list[tuple[int, str, LayerIndex, str]]) -> None:
        first_reader, first_name = (base[0], base[1]) if base is not None else (models[0][2].reader, models[0][3])
        if first_name not in first_reader.tensors:
            raise MergeInputError(f"tensor '{first_name}' is missing from model '{first_reader.label}'")
        ref = first_reader.tensors[first_name]
        info = TensorInfo(out_name, ref.dtype, ref.shape, ref.file, ref.offset)
        for _, _, index, name in models:
            other = index.reader.tensors.get(name)
            if other is None:
                raise MergeInputError(f"tensor '{name}' is missing from model '{index.reader.label}' (needed for output tensor '{out_name}')")
            if other.shape != ref.shape:
                raise MergeInputError(
                    f"tensor '{name}' has shape {list(other.shape)} in model '{index.reader.label}' but {list(ref.shape)} in model '{first_reader.label}'"
                )
        if not ref.dtype.is_floating_point:
            copied[out_name] = (first_reader, first_name)
            copied_infos.append(info)
            return
        routes = tuple((i, index.reader, name) for i, _, index, name in models)
        zero = frozenset(k for k, (_, _, index, name) in enumerate(models) if base is not None and index.reader is base[0] and name == base[1])
        params, model_params = config.tensor_params(slice_index, out_name, t, [(i, model, name) for i, model, _, name in models])
        jobs.append(TensorJob(info, base, routes, params, tuple(model_params), zero))

    def outside_tensors(slice_index: int, before: bool) -> None:
        base, models, _ = slices[slice_index]
        reference = base[0] if base is not None else models[0][2].reader
        for name in LayerIndex(reference).outside:
            if any(marker in name for marker in PRE_LAYER_MARKERS) == before:
                routed = [(i, model, index, name) for i, model, index, _ in models]
                add(name, slice_index, 0.0, (base[0], name) if base is not None else None, routed)

    outside_tensors(0, before=True)
    out_layer = 0
    prefix = None
    for slice_index, (base, models, (start_of, length)) in enumerate(slices):
        reference = base[2] if base is not None else models[0][2]
        prefix = prefix or reference.prefix
        for k in range(length):
            t = gradient_position(k, length)
            ref_layer = reference.layers.get(start_of(reference) + k)
            if not ref_layer:
                raise MergeInputError(
                    f"{config.source}: key '{config.slices[slice_index].where}.sources': model '{reference.reader.label}' has no layer {start_of(reference) + k}"
                )
            for suffix in ref_layer:
                out_name = f"{prefix}{out_layer}{suffix}"
                routed = []
                for i, model, index, _ in models:
                    layer = index.layers.get(start_of(index) + k, {})
                    routed.append((i, model, index, layer.get(suffix, f"{index.prefix or prefix}{start_of(index) + k}{suffix}")))
                base_route = None
                if base is not None:
                    base_route = (base[0], base[2].layers.get(start_of(base[2]) + k, {}).get(suffix, f"{prefix}{start_of(base[2]) + k}{suffix}"))
                add(out_name, slice_index, t, base_route, routed)
            out_layer += 1
    outside_tensors(len(slices) - 1, before=False)

    distinct = list({id(r): r for r in readers.values()}.values())
    models_readers = [reader_of(m) for m in config.models]
    inputs = MergeInputs(base_reader, models_readers, [job.info for job in jobs], copied_infos, frozenset())
    inputs.jobs = {job.info.name: job for job in jobs}
    inputs.copied_from = copied
    inputs.num_layers = out_layer
    inputs.extra_readers = [r for r in distinct if r is not base_reader and r not in models_readers]
    return inputs


def _slice_inputs(config: MergeConfig, spec: SliceSpec, base_ref: str | None, takes_base: bool, index_of):
    """A slice's base (reader, its LayerIndex's reader name placeholder, LayerIndex) or None, its models
    as (index into config.models, model, LayerIndex, None), and (start of a LayerIndex's range, length)."""
    starts: dict[int, int] = {}
    length = None
    base = None
    models: dict[str, tuple[int, str, LayerIndex, None]] = {}
    for src in spec.sources:
        index = index_of(src.model)
        start, stop = src.layer_range if src.layer_range is not None else (0, index.count)
        if src.layer_range is not None and stop > index.count:
            raise MergeInputError(f"{config.source}: key '{src.where}.layer_range': model '{src.model}' has {index.count} layers (got {list(src.layer_range)})")
        starts[id(index)] = start
        length = stop - start if length is None else length
        if src.model == base_ref and base is None:
            base = (index.reader, None, index)
            if not takes_base:
                continue
        if src.model in config.models:
            models[src.model] = (config.models.index(src.model), src.model, index, None)
    if base_ref is not None and base is None:
        index = index_of(base_ref)
        if spec.where:
            raise MergeInputError(
                f"{config.source}: key '{spec.where}.sources' must include the base model '{base_ref}' for merge method '{config.method_name}'"
            )
        base = (index.reader, None, index)
        starts[id(index)] = 0
    if not models:
        at = f"{spec.where}.sources" if spec.where else config.models_key
        raise MergeInputError(f"{config.source}: key '{at}' must name at least one model besides the base")
    return base, list(models.values()), (lambda index: starts[id(index)], length or 0)
