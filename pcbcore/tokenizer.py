"""The output vocabulary of a merge and each model's embedding rows permuted into it, as mergekit builds them.

mergekit builds a vocabulary whenever a config gives `tokenizer_source` or a `tokenizer:` block
(`mergekit.tokenizer.build` and `.embed`); without either, the base's tokenizer files are copied and
the embeddings merge as they are. The vocabulary is:

- `base`: the base's tokens (those with an id below its config's `vocab_size`);
- `union`: the base's tokens, then every other token of the models in the order the models are named:
  first the plain tokens a model has and the base lacks (by id), then the added tokens (`added_tokens` of
  tokenizer.json) the base lacks, with the settings of the first model that adds them;
- a model: that model's tokenizer;

then every `tokenizer.tokens` key it lacks, added as a plain added token, and `pad_to_multiple_of`
rounding the row count up.

Each vocabulary tensor (outside the layers, first dimension the model's `vocab_size`: the embedding and
the head) of each model is read in that vocabulary's order: output row j is the model's row of token j.
A token a model lacks (or one whose `tokens` entry says `force`) takes a row shared by all models:

- the `tokens` entry's `source`: that model's row of the token, `{kind: zero}`, or
  `{kind: model_token, model, token | token_id}` (that model's row of another token);
- otherwise, a token only one model has: that model's row; the base's row when the base has it; no
  model: zeros; else the mean of the rows of the models that have it (summed in model order, in the
  working dtype, then divided, as mergekit does).

Rows past the tokens (padding) are, per model, the mean of its own permuted rows. So a token only one
fine-tune brings gets that fine-tune's row in every model, base included: its task vector is zero there
and the merged row is the fine-tune's. The vocabulary's tensors are read block by block like any other
(a block's source rows are read as contiguous runs), so memory stays bounded by a block.

tokenizer.json is read as JSON; pcbcore does not depend on `tokenizers` or `transformers`. A model with no
tokenizer.json is taken to have the base's vocabulary, as mergekit does when a tokenizer cannot be loaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pcbcore.checkpoint import TensorInfo
from pcbcore.config import EmbeddingSource, MergeConfig, TokenSetting
from pcbcore.errors import MergeInputError
from pcbcore.gradients import layer_of
from pcbcore.lora import split_reference

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Source rows of a block closer together than this are read as one run (the rows between are dropped).
RUN_GAP = 64
# Padding rows are the mean of a model's rows; up to this many entries (64 MB in float32) it is taken in
# memory exactly as mergekit takes it, above it summed in float64 block by block (bounded memory).
MEAN_IN_MEMORY = 1 << 24


@dataclass(frozen=True)
class ModelVocabulary:
    """One model's tokens: token → row (rows below `size` only), and the settings of its added tokens."""

    tokens: dict[str, int]
    added: dict[str, dict]  # content → its tokenizer.json `added_tokens` entry
    size: int  # the embedding's rows (config.json vocab_size)


def model_folder(ref: str) -> Path:
    """The folder of a model reference (a LoRA reference's model)."""
    return Path(split_reference(ref)[0])


def read_vocabulary(folder: Path) -> ModelVocabulary | None:
    """A model's vocabulary from its tokenizer.json and config.json (None: no tokenizer.json)."""
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        vocab = data["model"]["vocab"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MergeInputError(f"tokenizer file '{path}' is not a tokenizer.json with a 'model.vocab'") from None
    # BPE, WordLevel and WordPiece store {token: id}; Unigram a list of [piece, score] in id order.
    tokens = dict(vocab) if isinstance(vocab, dict) else {entry[0]: i for i, entry in enumerate(vocab)}
    added = {}
    for entry in data.get("added_tokens") or []:
        tokens[entry["content"]] = int(entry["id"])
        added[entry["content"]] = entry
    size = _config_vocab_size(folder)
    if size is None:
        size = max(tokens.values(), default=-1) + 1
    return ModelVocabulary({t: i for t, i in tokens.items() if i < size}, {t: e for t, e in added.items() if int(e["id"]) < size}, size)


def _config_vocab_size(folder: Path) -> int | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    size = data.get("vocab_size", (data.get("text_config") or {}).get("vocab_size"))
    return int(size) if size is not None else None


@dataclass(frozen=True)
class DefaultRow:
    """How the shared row of a token is made: 'zero', 'row' (model `refs[0]`'s row `row`) or 'mean'
    (the mean of `refs`' rows of the token)."""

    kind: str
    refs: tuple[str, ...] = ()
    row: int = -1


@dataclass
class VocabularyPlan:
    """The output vocabulary and, per model, where each output row comes from."""

    tokens: list[str]  # by output id
    rows: int  # the embedding's rows: len(tokens) padded up to `pad_to_multiple_of`
    source_folder: Path  # whose tokenizer files the output starts from
    appended: list[dict]  # `added_tokens` entries the output's tokenizer.json gets
    permutations: dict[str, torch.Tensor]  # ref → (len(tokens),) the model's row of each token, −1 if none
    forced: torch.Tensor  # (len(tokens),) bool: every model takes the shared row
    defaults: dict[int, DefaultRow]  # output id → its shared row's recipe
    dtype: torch.dtype | None  # the dtype rows are built in (mergekit's working dtype; None: promoted)
    refs: tuple[str, ...]  # every model of the merge, in mergekit's order (base first)
    sizes: dict[str, int]  # ref → rows of its vocabulary tensors (config.json vocab_size)
    raw: dict[str, object] = field(default_factory=dict)  # ref → its reader (unpermuted)
    vocab_tensors: set[str] = field(default_factory=set)
    _block: tuple | None = None  # (tensor, start, stop) of the cached shared rows
    _block_rows: dict[int, torch.Tensor] = field(default_factory=dict)

    def wrap(self, ref: str, reader):
        """`reader` of model `ref` with its vocabulary tensors read in the output's order."""
        self.raw[ref] = reader
        names = {name for name, info in reader.tensors.items() if _is_vocab_tensor(info, self.sizes[ref])}
        self.vocab_tensors |= names
        return PermutedReader(self, ref, reader, names)

    def shared_rows(self, name: str, start: int, stop: int, shape: tuple[int, ...], dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """The shared rows of output ids in [start, stop) of tensor `name` (cached for the last block:
        the base and every model read the same block in turn)."""
        key = (name, start, stop)
        if self._block == key:
            return self._block_rows
        rows = {}
        for token_id in range(start, min(stop, len(self.tokens))):
            recipe = self.defaults.get(token_id)
            if recipe is None:
                continue
            if recipe.kind == "zero":
                rows[token_id] = torch.zeros(shape, dtype=dtype)
            elif recipe.kind == "row":
                rows[token_id] = self._raw_row(recipe.refs[0], name, recipe.row, dtype)
            else:  # mergekit: embed = 0; embed = embed + row for each model having it; embed /= count
                embed = torch.zeros(shape, dtype=dtype)
                for ref in recipe.refs:
                    embed = embed + self._raw_row(ref, name, int(self.permutations[ref][token_id]), dtype)
                rows[token_id] = embed / len(recipe.refs)
        self._block, self._block_rows = key, rows
        return rows

    def _raw_row(self, ref: str, name: str, row: int, dtype: torch.dtype) -> torch.Tensor:
        reader = self.raw.get(ref)
        if reader is None or name not in reader.tensors:
            raise MergeInputError(f"token row {row} of tensor '{name}' is needed from model '{ref}', which does not have that tensor")
        return reader.read(name, (row, row + 1))[0].to(dtype)


def _is_vocab_tensor(info: TensorInfo, vocab_size: int) -> bool:
    """A tensor indexed by token (mergekit's `vocabulary_axis` 0): outside the layers, first dimension
    the model's vocabulary size."""
    return len(info.shape) >= 1 and info.shape[0] == vocab_size and layer_of(info.name) is None and info.dtype.is_floating_point


class PermutedReader:
    """A model's reader whose vocabulary tensors have the output vocabulary's rows, in its order."""

    def __init__(self, plan: VocabularyPlan, ref: str, reader, names: set[str]):
        self.plan, self.ref, self.reader, self.label = plan, ref, reader, reader.label
        self.names = names
        self.tensors = {
            name: (TensorInfo(name, info.dtype, (plan.rows, *info.shape[1:]), info.file, info.offset) if name in names else info)
            for name, info in reader.tensors.items()
        }
        self._means: dict[str, torch.Tensor] = {}

    def _dtype(self, name: str) -> torch.dtype:
        if self.plan.dtype is not None:
            return self.plan.dtype
        dtype = self.reader.tensors[name].dtype
        for other in self.plan.raw.values():
            if name in other.tensors:
                dtype = torch.promote_types(dtype, other.tensors[name].dtype)
        return dtype

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self.names:
            return self.reader.read(name, rows)
        start, stop = rows if rows is not None else (0, self.plan.rows)
        shape, dtype = tuple(self.reader.tensors[name].shape[1:]), self._dtype(name)
        out = torch.empty((stop - start, *shape), dtype=dtype)
        n = len(self.plan.tokens)
        end = min(stop, n)
        if start < end:
            source = self.plan.permutations[self.ref][start:end]
            own = (source >= 0) & ~self.plan.forced[start:end]
            positions = own.nonzero().flatten()
            if positions.numel():
                out[positions] = self._gather(name, source[positions], dtype)
            missing = (~own).nonzero().flatten().tolist()
            if missing:
                shared = self.plan.shared_rows(name, start, stop, shape, dtype)
                for k in missing:
                    if start + k not in shared:
                        raise MergeInputError(f"no embedding row for token {self.plan.tokens[start + k]!r} of tensor '{name}' in model '{self.ref}'")
                    out[k] = shared[start + k]
        if stop > n:  # padding rows: the mean of this model's rows of the tokens
            out[max(n, start) - start :] = self._mean(name, shape, dtype)
        return out

    def _gather(self, name: str, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The model's rows `source` (in that order), read as runs of nearby rows."""
        order = torch.argsort(source)
        ordered = source[order]
        out = torch.empty((source.numel(), *self.reader.tensors[name].shape[1:]), dtype=dtype)
        k = 0
        while k < ordered.numel():
            j = k
            while j + 1 < ordered.numel() and int(ordered[j + 1]) - int(ordered[j]) <= RUN_GAP:
                j += 1
            first, last = int(ordered[k]), int(ordered[j])
            run = self.reader.read(name, (first, last + 1)).to(dtype)
            out[order[k : j + 1]] = run[ordered[k : j + 1] - first]
            k = j + 1
        return out

    def _mean(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The mean of this model's permuted rows of the tokens: torch.mean in `dtype` over the rows, as
        mergekit takes it, when they fit in MEAN_IN_MEMORY entries; else summed in float64 block by block."""
        if name not in self._means and len(self.plan.tokens) * _numel(shape) <= MEAN_IN_MEMORY:
            self._means[name] = torch.mean(self.read(name, (0, len(self.plan.tokens))), dim=0)
        if name not in self._means:
            n, step = len(self.plan.tokens), max(1, (1 << 20) // max(1, _numel(shape)))
            total = torch.zeros(shape, dtype=torch.float64)
            for a in range(0, n, step):
                total += self.read(name, (a, min(n, a + step))).to(torch.float64).sum(dim=0)
            self._means[name] = (total / n).to(dtype)
        return self._means[name]

    def close(self) -> None:
        self.reader.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def referenced_models(config: MergeConfig) -> list[str]:
    """Every model of the merge, base first, in the order the file names them (mergekit's order)."""
    refs = [config.base_model, *config.models, *(s.model for spec in config.slices for s in spec.sources)]
    return [r for r in dict.fromkeys(refs) if r]


def plan_vocabulary(config: MergeConfig) -> VocabularyPlan | None:
    """The output vocabulary and every model's permutation into it (None when the config builds none)."""
    spec = config.vocabulary
    if spec is None:
        return None
    refs = referenced_models(config)
    base_ref = config.base_model or refs[0]
    base = read_vocabulary(model_folder(base_ref))
    if base is None:
        raise MergeInputError(
            f"{config.source}: key '{'tokenizer.source' if config.raw.tokenizer else 'tokenizer_source'}' needs the base model's {TOKENIZER_JSON} (none in '{model_folder(base_ref)}')"
        )
    vocabularies = {ref: read_vocabulary(model_folder(ref)) or base for ref in refs}
    vocabularies[base_ref] = base

    appended: list[dict] = []
    if spec.source == "union":
        tokens, source_folder = _ordered(base), model_folder(base_ref)
        known = set(tokens)
        added = {}
        for ref in refs:
            for content, entry in vocabularies[ref].added.items():
                added.setdefault(content, entry)
        plain = []
        for ref in refs:
            for token, _ in sorted(vocabularies[ref].tokens.items(), key=lambda item: item[1]):
                if token not in known and token not in added:
                    known.add(token)
                    plain.append(token)
        for token in plain:
            appended.append(_added_entry(token, len(tokens)))
            tokens.append(token)
        for content, entry in added.items():
            if content not in known:
                known.add(content)
                appended.append({**entry, "id": len(tokens)})
                tokens.append(content)
    elif spec.source == "base":
        tokens, source_folder = _ordered(base), model_folder(base_ref)
    else:
        folder = model_folder(spec.source)
        chosen = read_vocabulary(folder)
        if chosen is None:
            raise MergeInputError(f"{config.source}: key 'tokenizer_source' names model '{spec.source}', which has no {TOKENIZER_JSON}")
        tokens, source_folder = _ordered(chosen), folder
    known = set(tokens)
    for token, _ in spec.tokens:
        if token not in known:
            known.add(token)
            appended.append(_added_entry(token, len(tokens)))
            tokens.append(token)

    rows = len(tokens)
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows = (rows // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    permutations = {ref: torch.tensor([vocabularies[ref].tokens.get(t, -1) for t in tokens], dtype=torch.int64) for ref in refs}
    settings = dict(spec.tokens)
    forced = torch.tensor([bool(settings.get(t) and settings[t].force) for t in tokens], dtype=torch.bool)
    defaults = {}
    for token_id, token in enumerate(tokens):
        has = [ref for ref in refs if int(permutations[ref][token_id]) >= 0]
        if len(has) == len(refs) and not forced[token_id]:
            continue
        setting = settings.get(token)
        if setting is not None:
            defaults[token_id] = _from_setting(config, token, token_id, setting, permutations, vocabularies)
        elif len(has) == 1:
            defaults[token_id] = DefaultRow("row", (has[0],), int(permutations[has[0]][token_id]))
        elif not has:
            log.warning("token %r is in no model; its embedding rows are zero", token)
            defaults[token_id] = DefaultRow("zero")
        elif base_ref in has:
            defaults[token_id] = DefaultRow("row", (base_ref,), int(permutations[base_ref][token_id]))
        else:
            defaults[token_id] = DefaultRow("mean", tuple(has))
    return VocabularyPlan(
        tokens=tokens,
        rows=rows,
        source_folder=source_folder,
        appended=appended,
        permutations=permutations,
        forced=forced,
        defaults=defaults,
        dtype=config.working_dtype,
        refs=tuple(refs),
        sizes={ref: _embedding_rows(ref, vocabularies[ref]) for ref in refs},
    )


def _embedding_rows(ref: str, vocabulary: ModelVocabulary) -> int:
    """The model's vocabulary tensors' rows: its config's vocab_size (the tokenizer's size without one)."""
    size = _config_vocab_size(model_folder(ref))
    return size if size is not None else vocabulary.size


def _ordered(vocabulary: ModelVocabulary) -> list[str]:
    """A vocabulary's tokens by id; ids must run 0 … n−1 with no gap."""
    tokens = sorted(vocabulary.tokens, key=vocabulary.tokens.__getitem__)
    if [vocabulary.tokens[t] for t in tokens] != list(range(len(tokens))):
        raise MergeInputError("a tokenizer whose token ids leave gaps cannot be the output vocabulary")
    return tokens


def _added_entry(token: str, token_id: int) -> dict:
    """A tokenizer.json `added_tokens` entry for a token added as transformers' `add_tokens(str)` adds it."""
    return {"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}


def _from_setting(config: MergeConfig, token: str, token_id: int, setting: TokenSetting, permutations, vocabularies) -> DefaultRow:
    where = f"{config.source}: key 'tokenizer.tokens.{token}.source'"
    source = setting.source
    if source is None:
        raise MergeInputError(f"{where} is needed: token {token!r} is missing from some model (or forced), so its embedding needs a source")
    if isinstance(source, EmbeddingSource) and source.kind == "zero":
        return DefaultRow("zero")
    if isinstance(source, EmbeddingSource):
        vocabulary = vocabularies[source.model]
        row = source.token_id if source.token_id is not None else vocabulary.tokens.get(source.token, -1)
        if row < 0 or row >= vocabulary.size:
            raise MergeInputError(f"{where}: model '{source.model}' has no token {source.token if source.token is not None else source.token_id!r}")
        return DefaultRow("row", (source.model,), row)
    row = int(permutations[source][token_id])
    if row < 0:
        raise MergeInputError(f"{where}: model '{source}' has no token {token!r}")
    return DefaultRow("row", (source,), row)


def write_tokenizer(plan: VocabularyPlan, folder: Path) -> None:
    """The output's tokenizer files: the source's, with the appended tokens in tokenizer.json (and in
    tokenizer_config.json's `added_tokens_decoder` when it has one)."""
    for name in (TOKENIZER_JSON, TOKENIZER_CONFIG):
        path = plan.source_folder / name
        if path.is_file() and not (folder / name).is_file():
            shutil.copyfile(path, folder / name)
    if not plan.appended:
        return
    path = folder / TOKENIZER_JSON
    data = json.loads(path.read_text())
    data["added_tokens"] = [*(data.get("added_tokens") or []), *plan.appended]
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    config_path = folder / TOKENIZER_CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if isinstance(config.get("added_tokens_decoder"), dict):
            for entry in plan.appended:
                config["added_tokens_decoder"][str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def set_vocab_size(config_json: Path, rows: int) -> None:
    """Write the output's vocabulary size into its config.json."""
    if not config_json.is_file():
        return
    data = json.loads(config_json.read_text())
    data["vocab_size"] = rows
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_chat_template(folder: Path) -> str | None:
    """A model's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template` (a
    string, or the 'default' of a list of named templates), stripped."""
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text().strip() or None
    config = folder / TOKENIZER_CONFIG
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):
        template = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def choose_chat_template(config: MergeConfig) -> str | None:
    """The template to write: the config's text, or for 'auto' the most common of the models' templates
    (the first named wins a tie, as in mergekit); None when there is none to write."""
    if config.chat_template != "auto":
        return config.chat_template
    templates = [t for t in (model_chat_template(model_folder(ref)) for ref in referenced_models(config)) if t]
    return Counter(templates).most_common(1)[0][0] if templates else None


def write_chat_template(template: str, folder: Path) -> None:
    """Write `template` as the output's chat template: chat_template.jinja (where transformers 5 writes it,
    as mergekit's output has it) and tokenizer_config.json's `chat_template` (where older readers look)."""
    (folder / CHAT_TEMPLATE_FILE).write_text(template)
    (folder / "chat_template.json").unlink(missing_ok=True)
    config_path = folder / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
