"""Rules about the code itself, checked by reading the source (no GPU needed to see them)."""

from __future__ import annotations

import ast
import codecs
from pathlib import Path

from conftest import REPO

COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_reduce_sum",
    "tree_all_reduce",
}
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand"}


def _name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _host_factory(node) -> bool:
    """torch.tensor(...), torch.zeros(...), ... without a device: a tensor in host memory."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in FACTORIES
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
        and not any(k.arg == "device" for k in node.keywords)
    )


def host_tensors_in_collectives(source: str) -> list[int]:
    """Lines where a collective gets a tensor made in host memory (NCCL rejects it)."""
    bad = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        made_on_host = {
            t.id
            for node in ast.walk(fn)
            if isinstance(node, ast.Assign) and _host_factory(node.value)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        for call in ast.walk(fn):
            if isinstance(call, ast.Call) and _name(call) in COLLECTIVES and call.args:
                arg = call.args[0]
                if _host_factory(arg) or (isinstance(arg, ast.Name) and arg.id in made_on_host):
                    bad.append(call.lineno)
    return bad


def test_every_tensor_handed_to_a_collective_is_made_on_a_device():
    found = {
        str(path.relative_to(REPO)): lines
        for path in sorted((REPO / "cifar_dist").rglob("*.py"))
        if (lines := host_tensors_in_collectives(path.read_text()))
    }
    assert found == {}, f"collectives given host tensors (file: lines): {found}"


def test_the_collective_check_sees_a_host_tensor():
    """The benchmark once all-reduced its timings from host memory, which NCCL rejects."""
    assert host_tensors_in_collectives(
        "def f(t):\n    times = torch.tensor(t, dtype=torch.float64)\n    dist.all_reduce(times)\n"
    ) == [3]
    assert (
        host_tensors_in_collectives("def f(t, d):\n    times = torch.tensor(t, device=d)\n    dist.all_reduce(times)\n")
        == []
    )


def _package_modules() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "cifar_dist").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(modules: dict, type_imports: bool = False) -> dict[str, set[str]]:
    """Module -> the cifar_dist modules it imports anywhere in its source (top level or inside
    functions); the names of types imported under ``if TYPE_CHECKING:`` only with ``type_imports``."""

    def owner(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        type_only = (
            {  # `if TYPE_CHECKING:` imports name types for annotations; nothing runs them
                id(n)
                for block in ast.walk(tree)
                if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                for n in ast.walk(block)
            }
            if not type_imports
            else set()
        )
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[module] |= {owner(n) for n in names if n.startswith("cifar_dist") and owner(n)} - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle_inside_the_package_not_even_through_type_imports():
    """A cycle hidden under ``if TYPE_CHECKING:`` still ties its modules into one."""
    assert find_cycle(import_graph(_package_modules(), type_imports=True)) is None


# The package's folders from the ground up: a module may import from its own folder and from
# folders below it, never from one above (cifar_dist/__init__.py, the face users import from, is
# below everything: it names what it hands on as strings and imports nothing of the package).
LAYERS = (
    "cifar_dist",
    "errors",
    "config",
    "runtime",
    "distributed",
    "model",
    "data",
    "storage",
    "inference",
    "trainer",
    "bench experiments",
    "train",
    "cli",
)


def layer_of(module: str) -> int:
    """The floor of a package module (``cifar_dist.trainer.loop`` -> trainer's)."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "cifar_dist"
    return next(i for i, layer in enumerate(LAYERS) if name in layer.split())


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports that run up the floors, or sideways between two folders of one floor."""
    bad = []
    for module, imported in sorted(graph.items()):
        for other in sorted(imported):
            same_folder = module.split(".")[:2] == other.split(".")[:2]
            if not same_folder and layer_of(other) >= layer_of(module):
                bad.append(f"{module} -> {other}")
    return bad


def test_lower_folders_never_import_higher_ones():
    assert upward_imports(import_graph(_package_modules())) == []


def test_the_floor_check_sees_an_import_that_runs_up():
    """storage importing the trainer, or bench importing experiments (one floor), is refused."""
    assert upward_imports({"cifar_dist.storage.rundir": {"cifar_dist.trainer.loop"}}) == [
        "cifar_dist.storage.rundir -> cifar_dist.trainer.loop"
    ]
    assert upward_imports({"cifar_dist.bench.run": {"cifar_dist.experiments.stats"}}) == [
        "cifar_dist.bench.run -> cifar_dist.experiments.stats"
    ]
    assert upward_imports({"cifar_dist.trainer.loop": {"cifar_dist.storage.state", "cifar_dist.trainer.step"}}) == []


def test_every_folder_says_what_lives_there_and_the_top_holds_only_the_entry_points():
    package = REPO / "cifar_dist"
    assert sorted(p.name for p in package.glob("*.py")) == ["__init__.py", "errors.py", "train.py"]
    for folder in sorted(p for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, folder.name


def test_the_cycle_check_sees_a_cycle_made_of_function_level_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_test_hooks_or_path_edits_in_the_package():
    """Faults enter runs as a test callback; the package never rewrites sys.path."""
    for path in _package_modules().values():
        text = path.read_text()
        assert "TEST_FAULT" not in text and "active-" not in text, path
        assert "sys.path" not in text, path


def test_importing_the_package_changes_nothing_process_wide():
    """cifar_dist/__init__.py only defines things: no call runs at import (the malloc tuning
    belongs to the entry points)."""
    tree = ast.parse((REPO / "cifar_dist" / "__init__.py").read_text())
    for node in tree.body:
        assert isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.Assign, ast.Expr)), node
        if isinstance(node, (ast.Assign, ast.Expr)):
            ast.literal_eval(node.value)  # a literal: no call runs


# The repository speaks of the project only: not of who worked on it, when, or with what. The
# phrases that would are kept ROT13-encoded, so that this file does not carry them either.
FORBIDDEN = tuple(
    codecs.decode(p, "rot13")
    for p in (
        "jbexcynpr",
        "pber vffhr",
        "gur vffhr nfxf",
        "guvf frffvba",
        "rneyvre frffvba",
        "cerivbhf frffvba",
        "va n frffvba",
        "zrnfherq va na rneyvre",
        "gur ntrag",
        "na ntrag",
        "guvf fvggvat",
        "n fvggvat",
    )
)
TEXT = (".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".tsv", "Makefile", ".ci/run")


def forbidden_phrases(text: str) -> list[str]:
    low = text.lower()
    return [p for p in FORBIDDEN if p in low]


def test_the_repository_speaks_of_the_project_only():
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    found = {}
    for name in files:
        path = REPO / name
        if name.endswith(TEXT) and path.is_file():
            hits = [
                f"{i}: {line.strip()}"
                for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
                if forbidden_phrases(line)
            ]
            if hits:
                found[name] = hits
    assert found == {}, found


def test_the_phrase_check_catches_what_it_is_for():
    """Each phrase is caught inside a line, whatever its case; a Unix session is not one of them."""
    for phrase in FORBIDDEN:
        assert forbidden_phrases(f"# as {phrase.title()} found: 3 minutes on 2 cores") == [phrase]
    assert not forbidden_phrases("worker in a process group of its own; start_new_session=True")


def test_the_readme_is_short_and_every_page_it_links_exists():
    import re

    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    pages = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", readme)
    assert {p for p in pages if p.startswith("docs/")} >= {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    for page in pages:
        assert (REPO / page).is_file(), page
    for doc in (REPO / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)", doc.read_text()):
            assert (doc.parent / link).is_file() or (REPO / link).is_file(), f"{doc.name}: {link}"
