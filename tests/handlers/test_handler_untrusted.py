"""Nothing a request sends is unpickled or evaluated: the handler's code holds no way to, and a pickle is refused."""

from __future__ import annotations

import ast
import os
import pickle

import pytest
from handler_helpers import HANDLERS_DIR

# modules and calls that turn bytes into code or arbitrary objects
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib", "yaml"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
UNSAFE_METHODS = {("torch", "load"), ("np", "load"), ("numpy", "load"), ("importlib", "import_module")}


def unsafe_uses(source: str) -> list[str]:
    """The unsafe imports and calls in a module's source, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{node.lineno}: import {n}" for n in names if n and n.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in UNSAFE_BUILTINS:
            found.append(f"{node.lineno}: {node.func.id}()")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = getattr(node.func.value, "id", None)  # `torch` in torch.load(); None for torch.jit.load()
            if owner in UNSAFE_MODULES or (owner, node.func.attr) in UNSAFE_METHODS:
                found.append(f"{node.lineno}: {owner}.{node.func.attr}()")
    return found


@pytest.mark.parametrize("module", sorted(p.name for p in HANDLERS_DIR.glob("*.py")))
def test_handler_code_neither_unpickles_nor_evaluates(module: str) -> None:
    assert unsafe_uses((HANDLERS_DIR / module).read_text()) == []


def test_the_scan_finds_what_it_looks_for() -> None:
    source = "import pickle\nfrom yaml import load\ntorch.load(f)\neval(s)\npickle.loads(b)\n"
    assert unsafe_uses(source) == [
        "1: import pickle",
        "2: import yaml",
        "3: torch.load()",
        "4: eval()",
        "5: pickle.loads()",
    ]
    assert unsafe_uses("json.loads(b)\ntorch.jit.load(p)\nmodel.eval()\nre.compile(r)\nimage.load()\n") == []


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # unpickling this would create a folder
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_a_pickled_body_is_refused_unopened(served, tmp_path, protocol: int) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)), protocol=protocol)
    [answer] = served([{"body": payload}])
    assert answer.status in (400, 415) and answer.body["type"] in ("NotAnImage", "BadJson")
    assert not marker.exists()
