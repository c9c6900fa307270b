"""Checkpoint IO: lazy reading of Hugging Face model folders and streaming, sharded safetensors writing.

Reading never materialises a whole model: `CheckpointReader.read` returns one tensor (or a block of its
rows) at a time from the memory-mapped safetensors files. Writing knows every output tensor's name,
dtype and shape before the first byte is written (the merge plan), so each shard's header is written up
front and tensor bytes are appended as they are produced, block by block; a shard is never held in
memory. Output goes to a temporary folder beside the target that is renamed into place only when
complete (`atomic_output`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pcbcore.errors import MergeInputError
from pcbcore.scratch import owned_folder, owned_path, remove_leftovers

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"

# safetensors dtype names <-> torch dtypes (the subset transformers checkpoints use).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Files copied from the tokenizer source into a merged model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute position of the tensor's first byte in `file` (safetensors)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and check a safetensors header: the JSON must be whole and every tensor's bytes present.

    safetensors itself checks this too when opening, but with messages that do not name the file; and a
    check here, before any heavy work, lets a merge refuse a truncated file before writing anything.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise MergeInputError(f"safetensors file '{path}' is truncated: it has no header")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100_000_000):
                raise MergeInputError(f"safetensors file '{path}' is corrupt or truncated: header length {header_len} exceeds the file")
            header = json.loads(fh.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MergeInputError(f"safetensors file '{path}' is corrupt: its header is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(header, dict):
        raise MergeInputError(f"safetensors file '{path}' is corrupt: its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
            if entry["dtype"] not in DTYPES:
                raise MergeInputError(f"safetensors file '{path}': tensor '{name}' has unsupported dtype {entry['dtype']}")
        except (KeyError, TypeError, IndexError, ValueError):
            raise MergeInputError(f"safetensors file '{path}' is corrupt: bad header entry for tensor '{name}'") from None
    if 8 + header_len + end > size:
        raise MergeInputError(f"safetensors file '{path}' is truncated: its header needs {8 + header_len + end} bytes but the file has {size}")
    return header, 8 + header_len


class CheckpointReader:
    """Lazy, tensor-at-a-time reader of one model folder (single or sharded safetensors).

    A `.bin` (pickle) checkpoint is refused unless `allow_pickle`; then it is loaded with
    `torch.load(weights_only=True)`, which cannot run code but does hold the whole file in memory.
    """

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        if not self.folder.is_dir():
            raise MergeInputError(f"model folder '{self.folder}' does not exist or is not a folder")
        self._handles: dict[Path, int] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.tensors: dict[str, TensorInfo] = {}
        files = self._weight_files(allow_pickle)
        if self._pickled is None:
            for file in files:
                header, data_start = read_safetensors_header(file)
                for name, entry in header.items():
                    if name != "__metadata__":
                        info = TensorInfo(name, DTYPES[entry["dtype"]], tuple(entry["shape"]), file, data_start + int(entry["data_offsets"][0]))
                        if info.nbytes != int(entry["data_offsets"][1]) - int(entry["data_offsets"][0]):
                            raise MergeInputError(
                                f"safetensors file '{file}' is corrupt: tensor '{name}' has {list(info.shape)} {entry['dtype']} entries but a different byte range"
                            )
                        self.tensors[name] = info
        if not self.tensors:
            raise MergeInputError(f"model folder '{self.folder}' has weight files but no tensors in them")

    def _weight_files(self, allow_pickle: bool) -> list[Path]:
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MergeInputError(f"index file '{index}' is corrupt: it needs a 'weight_map' object") from None
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise MergeInputError(f"index file '{index}' names shard '{missing[0]}', which does not exist")
            return files
        if (self.folder / SAFETENSORS_SINGLE).is_file():
            return [self.folder / SAFETENSORS_SINGLE]
        others = sorted(self.folder.glob("*.safetensors"))
        if others:
            return others
        pickles = sorted(self.folder.glob("*.bin")) + sorted(self.folder.glob("*.pt")) + sorted(self.folder.glob("*.pth"))
        if pickles:
            if not allow_pickle:
                raise MergeInputError(
                    f"model folder '{self.folder}' holds only pickle checkpoints ({pickles[0].name}); "
                    "pickles can run code when loaded, so they are refused unless the config sets 'allow_pickle: true'"
                )
            self._load_pickles(pickles)
            return pickles
        raise MergeInputError(f"model folder '{self.folder}' contains no safetensors weights (no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})")

    def _load_pickles(self, files: list[Path]) -> None:
        self._pickled = {}
        for file in files:
            if file.name.endswith(".index.json"):
                continue
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for a bad pickle; all mean the same to the user
                raise MergeInputError(f"pickle checkpoint '{file}' cannot be loaded with weights_only=True: {exc}".splitlines()[0]) from None
            if not isinstance(state, dict):
                raise MergeInputError(f"pickle checkpoint '{file}' does not hold a state dict")
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    self._pickled[name] = value
                    self.tensors[name] = TensorInfo(name, value.dtype, tuple(value.shape), file)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name` (on CPU, its stored dtype), or only its rows `[start, stop)` along dim 0.

        Reads the bytes with positioned reads into a fresh buffer rather than through a memory map:
        pages of a mapped file stay counted in the process's resident memory while the map lives, which
        would make a merge's footprint grow with the model instead of with one block.
        """
        info = self.tensors[name]
        if self._pickled is not None:
            t = self._pickled[name]
            return t[rows[0] : rows[1]] if rows else t
        shape, start = info.shape, info.offset
        if rows is not None and len(shape) > 0:
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            start += rows[0] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        buf = torch.empty(_numel(shape) * _itemsize(info.dtype), dtype=torch.uint8)
        fd = self._handles.get(info.file)
        if fd is None:
            fd = self._handles[info.file] = os.open(info.file, os.O_RDONLY)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], start + done)
            if got == 0:
                raise MergeInputError(f"safetensors file '{info.file}' is truncated at tensor '{name}'")
            done += got
        return buf.view(info.dtype).reshape(shape)

    def close(self) -> None:
        handles = getattr(self, "_handles", {})  # absent when __init__ refused the folder
        for fd in handles.values():
            os.close(fd)
        handles.clear()

    def __del__(self) -> None:
        self.close()


class ShardedWriter:
    """Streams tensors into sharded safetensors files whose layout is fixed before writing starts.

    `plan` lists (name, dtype, shape) in the order tensors will be written; each tensor may arrive in
    several consecutive row blocks. Shards are cut at `max_shard_bytes` (a tensor never spans shards).
    """

    def __init__(
        self, folder: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int = 5 * 10**9, metadata: dict[str, str] | None = None
    ):
        self.folder = folder
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = _numel(entry[2]) * _itemsize(entry[1])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self.files = [SAFETENSORS_SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self._order = [(k, name) for k, shard in enumerate(shards) for name, _, _ in shard]
        self._expected = {name: _numel(shape) * _itemsize(dtype) for name, dtype, shape in plan}
        self._dtypes = {name: dtype for name, dtype, _ in plan}
        self._pos = 0  # index into _order of the tensor being written
        self._written = 0  # bytes of the current tensor written so far
        self._fh = None
        self._open = -1  # index of the shard file being written
        self._shards = shards
        self._metadata = {"format": "pt", **(metadata or {})}
        self.total_bytes = sum(self._expected.values())

    def _open_shard(self, k: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, object] = {"__metadata__": self._metadata}
        offset = 0
        for name, dtype, shape in self._shards[k]:
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._fh = (self.folder / self.files[k]).open("wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append `block` (the whole tensor or its next rows) to tensor `name`, which must be the current one."""
        assert self._pos < len(self._order) and self._order[self._pos][1] == name, (
            f"writer expected {self._order[self._pos][1] if self._pos < len(self._order) else 'nothing'}, got {name}"
        )
        shard = self._order[self._pos][0]
        if shard != self._open:
            self._open_shard(shard)
            self._open = shard
        block = block.detach().to(device="cpu", dtype=self._dtypes[name]).contiguous()
        data = block.reshape(-1).view(torch.uint8).numpy() if block.numel() else b""
        self._fh.write(memoryview(data))
        self._written += block.numel() * block.element_size()
        if self._written == self._expected[name]:
            self._pos += 1
            self._written = 0
        assert self._written <= self._expected[name], f"too many bytes written for {name}"

    def close(self) -> None:
        """Finish the last shard, check every planned tensor was written, and write the index."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        assert self._pos == len(self._order), f"writer closed after {self._pos} of {len(self._order)} tensors"
        for file in self.files:
            os.chmod(self.folder / file, 0o644)
        if len(self.files) > 1:
            weight_map = {name: self.files[k] for k, name in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_output_target(target: Path, overwrite: bool) -> None:
    """Refuse an existing output folder before any work starts, unless overwriting was asked for."""
    if target.exists() and not overwrite:
        raise MergeInputError(f"output folder '{target}' already exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise MergeInputError(f"output path '{target}' exists and is not a folder")


@contextlib.contextmanager
def atomic_output(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it into place only if the block completes.

    On any error (bad input found mid-stream, a full disk, Ctrl-C) the temporary folder is removed and an
    existing target is left untouched. The folder is named by this process (`pcbcore.scratch`), and the
    leftovers of earlier writers of the same target that were killed are removed first.
    """
    target = Path(target).resolve()
    check_output_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent, target.name)
    tmp = owned_folder(target.parent, target.name)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if target.exists():
            old = owned_path(target.parent, target.name, "old")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise MergeInputError(f"cannot write output folder '{target}': {os.strerror(exc.errno).lower()} (nothing was left behind)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(source: Path, dest: Path, out_dtype: torch.dtype | None = None, tokenizer_only: bool = False) -> list[str]:
    """Copy config, generation config and tokenizer files; set the config's dtype to the output's."""
    copied = []
    config = source / "config.json"
    if config.is_file() and not tokenizer_only:
        data = json.loads(config.read_text())
        if out_dtype is not None:
            name = str(out_dtype).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in data or key == "dtype":
                    data[key] = name
        (dest / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        copied.append("config.json")
    for name in TOKENIZER_FILES if tokenizer_only else ("generation_config.json", *TOKENIZER_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    return copied
