"""The layers point one way (see ARCHITECTURE.md): pcbcore ← pipeline ← tasks ← flows ← infra ← pcbmerge (the
CLI). Every import of every module is read from its source, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Our packages, lowest first: a module may import its own layer and the layers below it.
LAYERS = ["pcbcore", "pipeline", "tasks", "flows", "infra", "pcbmerge"]
# Third-party packages a layer must not use: the engine is pure torch; the plain logic runs without Prefect.
FORBIDDEN = {
    "pcbcore": {"prefect", "prefect_dask", "mlflow", "lm_eval", "cma", "transformers", "datasets"},
    "pipeline": {"prefect", "prefect_dask"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import statement in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def layer_files(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


def violations(path: Path, layer: str) -> list[str]:
    rank = LAYERS.index(layer)
    out = []
    for line, module in imported_modules(path):
        top = module.split(".")[0]
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{line} imports {module}"
        if top in LAYERS and LAYERS.index(top) > rank:
            out.append(f"{where} (layer {top} is above {layer})")
        if top in FORBIDDEN.get(layer, set()):
            out.append(f"{where} ({layer} must not use {top})")
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_a_layer_above_it(layer):
    files = layer_files(layer)
    assert files, f"no modules found under {layer}/"
    assert [v for path in files for v in violations(path, layer)] == []


def test_nothing_but_the_tests_imports_the_cli_and_they_only_through_its_entry_point():
    others = [p for layer in LAYERS[:-1] for p in layer_files(layer)] + sorted((ROOT / "bench").glob("*.py"))
    assert [f"{p.relative_to(ROOT)}:{line} {m}" for p in others for line, m in imported_modules(p) if m.split(".")[0] == "pcbmerge"] == []
    from_tests = {m for p in sorted((ROOT / "tests").glob("*.py")) for _, m in imported_modules(p) if m.split(".")[0] == "pcbmerge"}
    assert from_tests <= {"pcbmerge.cli"}


def test_the_check_sees_a_wrong_arrow(tmp_path):
    """The checker itself: an engine module importing Prefect or the pipeline is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef f():\n    from pipeline.settings import load_settings\n    import prefect\n")
    found = violations(bad, "pcbcore")
    assert len(found) == 2 and "(layer pipeline is above pcbcore)" in found[0] and "(pcbcore must not use prefect)" in found[1]
