"""Rules about the code itself, checked by reading the source (no GPU needed to see them)."""
from __future__ import annotations

import ast

from conftest import REPO

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter",
               "reduce_scatter_tensor", "all_reduce_sum", "tree_all_reduce"}
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand"}


def _name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _host_factory(node) -> bool:
    """torch.tensor(...), torch.zeros(...), ... without a device: a tensor in host memory."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            and not any(k.arg == "device" for k in node.keywords))


def host_tensors_in_collectives(source: str) -> list[int]:
    """Lines where a collective gets a tensor made in host memory (NCCL rejects it)."""
    bad = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        made_on_host = {t.id for node in ast.walk(fn) if isinstance(node, ast.Assign) and _host_factory(node.value)
                        for t in node.targets if isinstance(t, ast.Name)}
        for call in ast.walk(fn):
            if isinstance(call, ast.Call) and _name(call) in COLLECTIVES and call.args:
                arg = call.args[0]
                if _host_factory(arg) or (isinstance(arg, ast.Name) and arg.id in made_on_host):
                    bad.append(call.lineno)
    return bad


def test_every_tensor_handed_to_a_collective_is_made_on_a_device():
    found = {str(path.relative_to(REPO)): lines for path in sorted((REPO / "cifar_dist").rglob("*.py"))
             if (lines := host_tensors_in_collectives(path.read_text()))}
    assert found == {}, f"collectives given host tensors (file: lines): {found}"


def test_the_collective_check_sees_a_host_tensor():
    """The benchmark once all-reduced its timings from host memory, which NCCL rejects."""
    assert host_tensors_in_collectives(
        "def f(t):\n    times = torch.tensor(t, dtype=torch.float64)\n    dist.all_reduce(times)\n") == [3]
    assert host_tensors_in_collectives(
        "def f(t, d):\n    times = torch.tensor(t, device=d)\n    dist.all_reduce(times)\n") == []
