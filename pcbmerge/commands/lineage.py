"""`pcbmerge lineage models:/NAME/VERSION [--format text|json]`: the ancestry tree of a merged model."""

from __future__ import annotations

import argparse
import json
from typing import Any

MAX_DEPTH = 32


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lineage", help="print what went into a registered merged model, recursively")
    p.add_argument("model", help="models:/NAME/VERSION or models:/NAME@alias")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=run)


def lineage_tree(uri: str, depth: int = 0, seen: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The node of `uri` with every input that is a registered model expanded into its own node."""
    from pcbcore.errors import MergeInputError
    from pipeline.registry import read_lineage

    node = read_lineage(uri)
    if node["model"] in seen or depth >= MAX_DEPTH:
        raise MergeInputError(f"lineage of '{uri}' loops back to {node['model']} or is deeper than {MAX_DEPTH} levels")
    for item in node.get("inputs", []):
        registered = item.get("registered")
        if registered:
            parent = f"models:/{registered['name']}/{registered['version']}"
            item["lineage"] = lineage_tree(parent, depth + 1, seen | {node["model"]})
    return node


def format_tree(node: dict[str, Any]) -> list[str]:
    from pipeline.report import lineage_lines

    return lineage_lines(node)


def run(args: argparse.Namespace) -> int:
    from pcbcore.errors import MergeInputError

    if not args.model.startswith("models:/"):
        raise MergeInputError(f"'{args.model}' is not a registered model reference; use models:/NAME/VERSION or models:/NAME@alias")
    tree = lineage_tree(args.model)
    print(json.dumps(tree, indent=2) if args.format == "json" else "\n".join(format_tree(tree)))
    return 0
