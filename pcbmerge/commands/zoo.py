"""`pcbmerge zoo build DIR`: build the small model zoo (base + experts + lm-eval tasks) to merge."""

from __future__ import annotations

import argparse
import sys

# The sizes `pipeline.zoo.PRESETS` defines; named here so `pcbmerge --help` need not import the zoo
# builder (and transformers with it). build_zoo refuses anything else.
ZOO_SIZES = ("demo", "micro")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("zoo", help="build the demo/test model zoo")
    actions = parser.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="train a base model and one expert per task into DIR")
    build.add_argument("dir", help="folder to create (must be empty or absent unless --overwrite)")
    build.add_argument("--size", choices=ZOO_SIZES, default="demo", help="micro: for tests (~30 s); demo: a few minutes")
    build.add_argument("--seed", type=int, default=0, help="same seed, same weights")
    build.add_argument("--overwrite", action="store_true", help="replace an existing folder once the new zoo is complete")
    build.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from pipeline.zoo import build_zoo, load_zoo

    zoo = load_zoo(build_zoo(args.dir, size=args.size, seed=args.seed, overwrite=args.overwrite))
    print(f"zoo: {zoo.root}")
    print(f"base: {zoo.base}")
    for task, path in zoo.experts.items():
        print(f"expert {task}: {path}")
    print(f"tasks: {','.join(zoo.tasks)} (lm-eval --include-path {zoo.task_dir})")
    sys.stdout.flush()
    return 0
