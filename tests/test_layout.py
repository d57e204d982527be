"""The package layout promises (README, Layout): stages as subpackages, small modules, no import cycles,
and run folders written by earlier releases still load and predict the same."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

import inva_pyro
from inva_pyro.config import read_toml

PACKAGE = Path(inva_pyro.__file__).parent
LEGACY = Path(__file__).parent / "data" / "legacy_run"
STAGES = ("data", "model", "train", "predict", "criticism", "peers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, deferred (function-level) imports included."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_sees_deferred_imports_and_finds_a_cycle():
    graph = import_graph()
    # cli imports most stages inside its command functions: those edges must be seen
    assert "inva_pyro.criticism.evaluation" in graph["inva_pyro.cli"]
    assert "inva_pyro.data.spaces" in graph["inva_pyro.data.cohort"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_layout_tells_the_data_flow():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert len(top) <= 10, top
    assert set(STAGES) <= set(packages), packages
    too_long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
                if (n := len(p.read_text().splitlines())) > 400}
    assert not too_long


def _nifti(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def test_a_run_folder_written_before_the_layout_change_loads_and_predicts_the_same(tmp_path):
    # tests/data/legacy_run was written by commit 09ca846 (tests/data/make_legacy_run.py); same seed, same maps.
    out = tmp_path / "predictions"
    cmd = [sys.executable, "-m", "inva_pyro.cli", "predict", "--run", str(LEGACY / "run"),
           "--manifest", str(LEGACY / "cohort" / "manifest.csv"), "--samples", "50", "--seed", "2", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    expected = sorted(p.name for p in (LEGACY / "predictions").glob("*.nii.gz"))
    assert expected, "the legacy predictions are missing"
    for name in expected:
        np.testing.assert_allclose(_nifti(out / name), _nifti(LEGACY / "predictions" / name), rtol=1e-5, atol=1e-6)
    run = json.loads((LEGACY / "run" / "run.json").read_text())
    assert run["format"] == "inva-pyro-run/1"


def test_every_subpackage_is_installed():
    # pyproject lists packages explicitly (the presets folder is mapped in): a subpackage missing there
    # works in an editable checkout and is absent from a wheel.
    listed = set(read_toml((PACKAGE.parent / "pyproject.toml").read_bytes(), "pyproject.toml")["tool"]["setuptools"]["packages"])
    on_disk = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= listed, sorted(on_disk - listed)
