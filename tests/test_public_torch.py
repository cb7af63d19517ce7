"""PyTorch only through public APIs: no TorchScript anywhere, and PyTorch's private modules only
in their adapter (``inference/engine/backends/torch_internals.py``), which checks the release.

The source is read with ``ast``, so docstrings and comments may name what the code avoids.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "guides", "inference", "vilab")
ADAPTER = Path("inference/engine/backends/torch_internals.py")


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _module_problems(module: str) -> list[str]:
    """What is wrong with importing ``module`` (a dotted name) from outside the adapter."""
    parts = module.split(".")
    if parts[0] != "torch":
        return []
    if parts[1:2] == ["jit"]:
        return [f"TorchScript: {module}"]
    if any(_is_private(part) for part in parts[1:]):
        return [f"private PyTorch module: {module}"]
    return []


def _dotted(node: ast.AST) -> list[str]:
    """``a.b.c`` as ``["a", "b", "c"]`` (empty where the chain does not start at a name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else []


def _docstrings(tree: ast.Module) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return {
        id(node.body[0].value)
        for node in nodes
        if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }


def violations(source: str) -> list[str]:
    """Each use of ``torch.jit`` or of a private ``torch`` name in ``source``, as ``"line N:
    what"``: imports (``import torch._x``, ``from torch import _x``, ``from torch.jit import y``),
    attributes (``torch.jit.trace``, ``torch._C``, also through ``import torch as t``; not under
    ``torch.ops``, whose ATen op names may start with ``_``) and module names in strings (for
    ``importlib``), docstrings excepted."""
    tree = ast.parse(source)
    inner = {id(child.value) for child in ast.walk(tree) if isinstance(child, ast.Attribute)}
    roots = {"torch"} | {
        alias.asname
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name == "torch" and alias.asname
    }
    docstrings = _docstrings(tree)
    found = set()
    for node in ast.walk(tree):
        problems: list[str] = []
        if isinstance(node, ast.Import):
            problems = [p for alias in node.names for p in _module_problems(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            problems = _module_problems(node.module)
            if node.module == "torch":
                problems += [p for alias in node.names for p in _module_problems(f"torch.{alias.name}")]
        elif isinstance(node, ast.Attribute) and id(node) not in inner:  # the whole chain, once
            parts = _dotted(node)
            if parts and parts[0] in roots and parts[1:2] != ["ops"]:
                problems = _module_problems(".".join(["torch", *parts[1:]]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value.startswith(("torch._", "torch.jit")) and " " not in node.value:
                problems = [f"{p} (in a string)" for p in _module_problems(node.value)]
        found.update((node.lineno, problem) for problem in problems)
    return [f"line {line}: {problem}" for line, problem in sorted(found)]


def _source_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize(
    "source",
    [
        "import torch.jit",
        "from torch import jit",
        "from torch.jit import trace",
        "import torch\ntorch.jit.freeze(module)",
        "import torch as t\nt.jit.script(f)",
        "import torch._inductor.config",
        "from torch._guards import tracing",
        "from torch import _C",
        "import torch\nguards = torch._C._dynamo.guards",
        "import torch\nisinstance(x, torch._ops.OpOverload)",
        "import importlib\nimportlib.import_module('torch._inductor.compile_fx')",
    ],
)
def test_the_scan_finds_torchscript_and_private_torch(source):
    assert violations(source), source


@pytest.mark.parametrize(
    "source",
    [
        '"""Docs may name torch.jit and torch._C."""',
        "import torch\nprint(torch.__version__)",
        "import torch\ntorch.ops.aten._log_softmax.default",
        "import torch\nf = torch.compile(g)",
        "import torch.fx\nfrom torch.fx.experimental.proxy_tensor import make_fx",
        "x = 'see torch._C in the notes'",
        "# torch.jit.trace(...) was here",
        "import pyro\nwith pyro.util.ignore_jit_warnings(): pass",
    ],
)
def test_the_scan_allows_public_torch_and_words(source):
    assert violations(source) == []


def test_no_torchscript_and_private_torch_only_in_the_adapter():
    files = _source_files()
    assert ROOT / ADAPTER in files and len(files) > 50  # the scan reads the real tree
    found = [
        f"{path.relative_to(ROOT)} {problem}"
        for path in files
        if path.relative_to(ROOT) != ADAPTER
        for problem in violations(path.read_text())
    ]
    assert found == [], "use PyTorch's public API, or add the internal to " + str(ADAPTER) + ":\n" + "\n".join(found)


def test_the_adapter_itself_runs_no_torchscript():
    assert [problem for problem in violations((ROOT / ADAPTER).read_text()) if "TorchScript" in problem] == []
