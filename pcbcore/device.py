"""Device choice: `auto` takes CUDA when present; the maths runs there in float32."""

from __future__ import annotations

import torch

from pcbcore.errors import MergeInputError


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MergeInputError(f"device '{spec}' was asked for but CUDA is not available on this machine; use --device cpu or auto")
        index = spec.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise MergeInputError(f"device '{spec}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(spec)
    raise MergeInputError(f"unknown device '{spec}'; use auto, cpu, cuda or cuda:N")
