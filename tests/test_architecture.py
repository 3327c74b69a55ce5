"""The layout's rules, checked: every module in a room, imports only down the floors (or within a room), the
commands and the plugin through the front doors of ``checks`` and ``runs``, no import cycles between
kvverify's modules (imports inside functions count) and no module over about 400 lines without a stated reason."""

from __future__ import annotations

import ast
from pathlib import Path

import kvverify

PACKAGE = Path(kvverify.__file__).parent

#: Modules allowed past MAX_LINES, with the reason.
LONG_MODULES: dict[str, str] = {
    "kvverify.invariant.audit": "two op tables (order-dependent and order-free aten ops) that read best whole",
}
MAX_LINES = 400


#: Every room of the package, by floor: a module may import its own room and the rooms on lower floors.
#: Rooms that share a floor are listed in the order they may import each other (the later may import the
#: earlier): the engine runs on the caches, the test-time room (the order audit, the invariant mode) reads the
#: oracle's numerics, mutants, profiles and engines drive the adapters, the CLI dispatches to the commands.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("protocol",),  # the ground floor: ModelConfig, the cache protocol and its rules, declarations, quantizers
    ("reference", "invariant"),  # the oracle; the test-time room beside it
    ("caches", "engine"),  # the built-in caches; the fast decode step
    ("checks",),  # what is checked
    ("runs",),  # how a run is carried out
    ("adapters", "mutants", "profiling", "engines"),  # other libraries; what drives them
    ("quantizers", "commands", "cli", "plugin", "__main__", ""),  # the front: "" is kvverify/__init__.py
)
#: Rooms whose own modules the front (commands, cli, plugin, kvverify/__init__) reaches only through the room's
#: ``__init__``.
FRONT_DOORS = ("checks", "runs")
FRONT = ("quantizers", "commands", "cli", "plugin", "__main__", "")


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(room: str) -> tuple[int, int]:
    for floor, rooms in enumerate(FLOORS):
        if room in rooms:
            return floor, rooms.index(room)
    raise AssertionError(f"room {room!r} is on no floor of FLOORS: give it one")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every kvverify module ``path`` imports, at any depth of the file (``if TYPE_CHECKING`` blocks excepted)."""
    return {name for name, _ in _import_lines(path, modules)}


def _import_lines(path: Path, modules: set[str]) -> set[tuple[str, int]]:
    """(module, line) of every kvverify module ``path`` imports, as :func:`_imports`."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found.update((name, node.lineno) for name in submodules)
            if len(submodules) < len(node.names):  # names defined in the module (or its __init__) itself
                found.add((node.module, node.lineno))
    return {(name, line) for name, line in found if name in modules}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, modules) - {name} for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_counting_imports_inside_functions() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _arrows_up() -> list[str]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    found = []
    for name, path in sorted(paths.items()):
        for target, line in sorted(_import_lines(path, modules)):
            if _rank(_room(target)) > _rank(_room(name)):
                where = path.relative_to(PACKAGE.parent)
                found.append(f"{where}:{line}: {name} ({_room(name) or 'kvverify'}) imports {target} "
                             f"({_room(target) or 'kvverify'}), a room above it")
    return found


def test_every_module_is_in_a_room_on_a_floor() -> None:
    for path in PACKAGE.rglob("*.py"):
        _rank(_room(_module_name(path)))


def test_imports_run_only_down_the_floors() -> None:
    arrows = _arrows_up()
    assert not arrows, "imports that run back up:\n" + "\n".join(arrows)


def test_the_front_reaches_checks_and_runs_through_their_front_doors() -> None:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    past = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name} imports {target}; import it from kvverify.{_room(target)}"
        for name, path in sorted(paths.items()) if _room(name) in FRONT
        for target, line in sorted(_import_lines(path, modules))
        if _room(target) in FRONT_DOORS and target.count(".") > 1
    ]
    assert not past, "imports past a front door:\n" + "\n".join(past)


def test_the_floor_rule_finds_an_arrow_up(tmp_path: Path) -> None:
    assert _rank("protocol") < _rank("reference") < _rank("invariant") < _rank("engine") < _rank("commands")
    module = tmp_path / "model.py"
    module.write_text("def f():\n    from kvverify.caches import ContiguousCache\n")
    targets = _import_lines(module, {"kvverify.caches"})
    assert targets == {("kvverify.caches", 2)}
    assert _rank(_room("kvverify.caches")) > _rank(_room("kvverify.reference.model"))


def test_no_module_is_long_without_a_stated_reason() -> None:
    long = {
        _module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    unexplained = {name: n for name, n in long.items() if name not in LONG_MODULES}
    assert not unexplained, f"modules over {MAX_LINES} lines without a reason in LONG_MODULES: {unexplained}"
    stale = set(LONG_MODULES) - set(long)
    assert not stale, f"LONG_MODULES lists modules that are no longer long: {sorted(stale)}"
