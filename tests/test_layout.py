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
# Where each part of the package stands in the data flow: a module imports only from its own rank or
# lower ones (data <- model <- train <- predict <- criticism; the peers beside criticism, tuning beside the
# estimator; the run-folder format just above the data it stores; the command line on top).
RANKS = {"errors": 0, "config": 0, "data": 1, "runs": 2, "model": 3, "train": 4, "predict": 5, "criticism": 6,
         "peers": 6, "estimator": 7, "registry": 8, "tune": 8, "adaptation": 8, "cli_args": 9, "cli": 9,
         "__init__": 9}
# The only imports allowed to point forwards, each deferred to the function that needs it: the conveniences
# of a Prediction (.metrics(), .pit(), .to_inference_data()) call criticism.
FORWARD_ALLOWED = {("inva_pyro.predict.prediction", "inva_pyro.criticism.metrics"),
                   ("inva_pyro.predict.prediction", "inva_pyro.criticism.inference")}
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(deferred: bool = True) -> dict[str, set[str]]:
    """Module -> the package modules it imports, deferred (function-level) imports included unless
    ``deferred`` is False."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        tree = ast.parse(path.read_text())
        for node in (ast.walk(tree) if deferred else tree.body):
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


def rank(module: str) -> int:
    parts = module.split(".")
    return RANKS[parts[1] if len(parts) > 1 else "__init__"]


def test_stages_import_only_backwards():
    forwards = sorted((a, b) for a, targets in import_graph().items() for b in targets if rank(b) > rank(a))
    assert [edge for edge in forwards if edge not in FORWARD_ALLOWED] == []
    # the allowed ones are deferred: importing the predict stage never loads criticism
    at_import = import_graph(deferred=False)
    assert not [edge for edge in FORWARD_ALLOWED if edge[1] in at_import[edge[0]]]


def test_stage_check_sees_a_forward_import():
    assert rank("inva_pyro.train.loop") < rank("inva_pyro.predict.patterns") < rank("inva_pyro.criticism.metrics")
    assert rank("inva_pyro.data.cohort") < rank("inva_pyro.runs") < rank("inva_pyro.peers.base") < rank("inva_pyro.cli")


def long_functions(folder: Path, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """Functions of ``folder``'s modules longer than ``limit`` lines (decorators and docstrings included)."""
    out = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - first + 1 > limit:
                    out[f"{path.relative_to(folder.parent)}:{node.lineno} {node.name}"] = node.end_lineno - first + 1
    return out


def test_no_function_is_long():
    assert long_functions(PACKAGE) == {}


def test_function_length_is_counted_from_the_decorator(tmp_path):
    (tmp_path / "pkg").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(78))
    (tmp_path / "pkg" / "m.py").write_text(f"@staticmethod\ndef f():\n{body}\n")  # 80 lines: allowed
    assert long_functions(tmp_path / "pkg") == {}
    (tmp_path / "pkg" / "m.py").write_text(f"@staticmethod\n@staticmethod\ndef f():\n{body}\n")
    assert long_functions(tmp_path / "pkg") == {"pkg/m.py:3 f": 81}


def script_graph(folder: Path) -> dict[str, set[str]]:
    """Script -> the sibling scripts of ``folder`` it imports (``import NAME`` or ``from NAME import ...``)."""
    names = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module in names:
                edges.add(node.module)
        graph[path.stem] = edges - {path.stem}
    return graph


def test_analysis_and_benchmark_scripts_have_no_import_cycle():
    for folder in ("analysis", "benchmarks"):
        graph = script_graph(PACKAGE.parent / folder)
        assert graph and find_cycle(graph) is None, folder


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
