"""`pcbmerge merge CONFIG.yml OUT_DIR`: merge checkpoints as a mergekit-style YAML says."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pcbcore.checkpoint import check_output_target
from pcbcore.config import load_merge_config
from pcbcore.errors import MergeInputError
from pcbcore.executor import DEFAULT_SHARD_BYTES, merge_to_folder


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge checkpoints as CONFIG says, into OUT_DIR")
    p.add_argument("config", type=Path, help="merge YAML (mergekit layout)")
    p.add_argument("out_dir", type=Path, help="output folder (Hugging Face layout)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-shard-size", type=int, default=DEFAULT_SHARD_BYTES, help="bytes per output shard (default 5e9)")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    p.set_defaults(func=run)


def local_resolver(config_path: Path):
    """Model references in a CLI merge are folders: as given (from the working directory), else beside the config."""

    def resolve(ref: str) -> Path:
        for candidate in (Path(ref).expanduser(), config_path.parent / ref):
            if candidate.is_dir():
                return candidate.resolve()
        raise MergeInputError(f"{config_path}: model '{ref}' is not a local folder (Hub ids and models:/ URIs are fetched by `pcbmerge run`)")

    return resolve


class ProgressLine:
    """One updating line on stderr: phase, tensors done, elapsed time."""

    def __init__(self):
        self.start = time.perf_counter()
        self.last = 0.0
        self.open = False  # a line without its newline is on screen

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - self.last > 0.5:
            self.last = now
            self.open = done != total
            print(f"\r{phase}: {done}/{total} tensors, {now - self.start:.1f}s", end="" if self.open else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False


def run(args: argparse.Namespace) -> int:
    config = load_merge_config(args.config)
    check_output_target(args.out_dir.resolve(), args.overwrite)
    config = config.with_paths(local_resolver(args.config))
    progress = None if args.json else ProgressLine()
    try:
        report = merge_to_folder(
            config,
            args.out_dir,
            device=args.device,
            overwrite=args.overwrite,
            max_shard_bytes=args.max_shard_size,
            progress=progress,
            config_text=args.config.read_text(),
        )
    finally:
        if progress:
            progress.close()
    if args.json:
        print(json.dumps(report.__dict__, indent=2))
    else:
        print(
            f"merged {report.tensors_merged} tensors ({report.parameters_merged:,} parameters) with {report.method} "
            f"in {report.seconds:.1f}s on {report.device} → {report.out_dir}"
        )
    return 0
