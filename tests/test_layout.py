"""The layout of docs/LAYOUT.md, checked on the source (imports parsed with ast, nothing imported).

Every import counts, the ones inside functions too: a lazy import hides a dependency from the reader, not from
the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("device_runtime", "training", "qat", "export")
LAYERS = {name: i for i, name in enumerate(PACKAGES)}  # device_runtime <- training <- qat <- export
CORE = "device_runtime.core"
# the one desktop module that runs a bundle through the device's own backends rather than the core's ONNX Runtime
# session: `nerveseg tune-temporal --backend` tunes the temporal filter on what the device's network computes
BACKEND_USERS = {("training.evaluation.temporal_tune", "device_runtime.backends.selection")}
# export's rooms, lowest first: a room may import the rooms before it, never one after it
EXPORT_ROOMS = ("export.bundle", "export.report", "export.workflows", "export.cli")
MAX_FLAT_MODULES = 15


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The first-party modules (or module.name pairs, resolved below) one import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    # `from package import name` imports the submodule package.name when there is one
    return [f"{target}.{alias.name}" for alias in node.names] + [target]


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}
    modules = {name for name, _ in files}
    graph = {}
    for (module, is_package), path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported(node, module, is_package):
                while name and name not in modules:  # a name inside a module -> that module
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


GRAPH = _graph()


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_not_empty():
    assert len(GRAPH) > 50 and GRAPH["device_runtime.runner"] >= {"device_runtime.pipeline"}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_nothing_imports_upward(module):
    layer = LAYERS[module.split(".")[0]]
    upward = sorted(t for t in GRAPH[module] if LAYERS[t.split(".")[0]] > layer)
    assert not upward, f"{module} imports {upward}: the direction is device_runtime <- training <- qat <- export"


def test_the_desktop_imports_only_the_core_of_device_runtime():
    wrong = sorted(f"{module} -> {target}" for module, targets in GRAPH.items()
                   if not _is_under(module, "device_runtime")
                   for target in targets
                   if _is_under(target, "device_runtime") and not _is_under(target, CORE)
                   and target != "device_runtime" and (module, target) not in BACKEND_USERS)
    assert not wrong, "the desktop may import device_runtime.core only:\n" + "\n".join(wrong)


def test_the_core_stands_alone():
    wrong = sorted(f"{module} -> {target}" for module, targets in GRAPH.items() if _is_under(module, CORE)
                   for target in targets if not _is_under(target, CORE) and target != "device_runtime")
    assert not wrong, "device_runtime.core imports the rest of device_runtime:\n" + "\n".join(wrong)


def test_export_rooms_import_only_the_rooms_below():
    def room(module):
        return next((i for i, name in enumerate(EXPORT_ROOMS) if _is_under(module, name)), None)

    wrong = sorted(f"{module} -> {target}" for module, targets in GRAPH.items() if room(module) is not None
                   for target in targets if room(target) is not None and room(target) > room(module))
    assert not wrong, f"export's rooms go {' <- '.join(EXPORT_ROOMS)}:\n" + "\n".join(wrong)


def test_no_import_circle():
    """Tarjan's strongly connected components: any component of more than one module is a circle."""
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_no_folder_is_a_crowd():
    crowded = {str(folder.relative_to(REPO)): count for package in PACKAGES
               for folder in [REPO / package, *(p for p in (REPO / package).rglob("*") if p.is_dir())]
               if (count := len([f for f in folder.glob("*.py") if f.name != "__init__.py"])) > MAX_FLAT_MODULES}
    assert not crowded, f"folders of more than {MAX_FLAT_MODULES} modules: {crowded}; group them (docs/LAYOUT.md)"
