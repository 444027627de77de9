"""The package's shape: no import cycles, peft known in one module, loading never imports training."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.train_helpers import train, write_chat_data

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tunelab"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (function-level imports count: they are
    still a dependency of the design)."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 100
    assert cycles(graph) == []


def test_peft_specifics_live_in_one_module():
    """Only the peft-backed methods' module names peft's parameters or calls its merge."""
    offenders = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "peft_adapters.py" and path.parent.name != "bench"  # bench drives peft itself as the baseline
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if any(marker in line for marker in ("merge_and_unload", '"lora_"', "'lora_'", ".lora_", "prompt_encoder"))
    ]
    assert offenders == []


def test_loading_a_trained_run_imports_no_training_code(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    train(tmp_path, f"model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.25}}\nmethod: {{lora: {{r: 2}}}}\n"
          "train: {max_steps: 1, batch_size: 4, threads: 1, precision: fp32}\n")
    probe = (
        "import sys; from tunelab.models import load_model; load_model(sys.argv[1]);"
        "print(sorted(m for m in sys.modules if m.startswith(('tunelab.train', 'tunelab.recipe', 'tunelab.compress.callbacks'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
