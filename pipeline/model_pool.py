"""The per-process pool a search's candidates run in: stored components loaded once per folder and device,
and transformers models to load candidates into (one per candidate running at once in the process)."""

from __future__ import annotations

import threading
from typing import Any

from pcbcore.components import StoredComponents


class WorkerPool:
    """Per worker process: the stored components (loaded once per folder and device) and a pool of models
    to load candidates into (one per candidate running at once in this process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.components: dict[tuple[str, str], StoredComponents] = {}
        self.free_models: dict[tuple[str, str, str, str, int | None], list[tuple[Any, Any]]] = {}

    def stored(self, folder: str, device: str) -> StoredComponents:
        with self.lock:
            if (folder, device) not in self.components:
                self.components[(folder, device)] = StoredComponents(folder, device=device)
            return self.components[(folder, device)]

    def take_model(self, base_dir: str, tokenizer_dir: str, device: str, dtype: str = "auto", vocab_rows: int | None = None) -> tuple[Any, Any]:
        """A model of the base's architecture in `dtype` (auto: the base checkpoint's), with `vocab_rows`
        embedding rows when the merge has its own vocabulary (None: the base's), and the tokenizer."""
        # Loading under the lock: transformers' and lm-eval's lazy imports are not safe from parallel
        # threads (a race gives "cannot import name 'AutoModelForCausalLM'"), and one load at a time
        # bounds peak memory.
        with self.lock:
            pool = self.free_models.setdefault((base_dir, tokenizer_dir, device, dtype, vocab_rows), [])
            if pool:
                return pool.pop()
            return load_candidate_model(base_dir, device, dtype, vocab_rows), load_tokenizer(tokenizer_dir)

    def give_back(self, base_dir: str, tokenizer_dir: str, device: str, pair: tuple[Any, Any], dtype: str = "auto", vocab_rows: int | None = None) -> None:
        with self.lock:
            self.free_models.setdefault((base_dir, tokenizer_dir, device, dtype, vocab_rows), []).append(pair)


def load_candidate_model(base_dir: str, device: str = "cpu", dtype: str = "auto", vocab_rows: int | None = None) -> Any:
    """The base's model to load candidates into; its embeddings (and head) resized to `vocab_rows` rows for
    a merge with its own vocabulary (every weight is overwritten by the candidate, so no row is initialised)."""
    import torch
    from lm_eval.models.huggingface import HFLM  # noqa: F401  (imported once, here)
    from transformers import AutoModelForCausalLM

    cast = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=False, **cast)
    if vocab_rows is not None and model.get_input_embeddings().num_embeddings != vocab_rows:
        model.resize_token_embeddings(vocab_rows, mean_resizing=False)
    return model.to(device).eval()


def load_tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


_POOL = WorkerPool()


def worker_pool() -> WorkerPool:
    """This process's cache. Tasks reach it through this function: Prefect tasks are cloudpickled by value
    for Dask, and a function is pickled by reference while a global holding a lock cannot be pickled."""
    return _POOL
