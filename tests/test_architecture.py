"""The package's layers: imports only go down, and no module cycle (ARCHITECTURE.md).

Every import in code/pointavatar is parsed, including imports inside functions, so that none can hide
a cycle or an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "code" / "pointavatar"

# Lower number = lower layer. A module may import its own part and the parts of lower layers only;
# parts of one layer (e.g. train and evaluate) do not import each other.
LAYERS = {
    "errors": 0,
    "config": 1,
    "data": 2,
    "flame": 2,
    "render": 2,
    "synthetic": 3,
    "model": 3,
    "engine": 4,
    "train": 5,
    "evaluate": 5,
    "viewer": 6,
    "cli": 7,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the pointavatar modules (or packages) that ``path`` imports anywhere."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            found |= imported_modules_of(node, path)
    found.discard(module_name(path))
    return found


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pointavatar"


def all_modules() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_part_has_a_layer():
    parts = {part(m) for m in all_modules()} - {"pointavatar"}
    assert parts <= set(LAYERS), f"add these to LAYERS and ARCHITECTURE.md: {sorted(parts - set(LAYERS))}"


def test_imports_only_go_down():
    upward = []
    for module, imports in all_modules().items():
        if module == "pointavatar":
            continue
        src = part(module)
        for target in imports:
            dst = part(target)
            if dst == "pointavatar":
                upward.append(f"{module} imports the package root {target}")
            elif dst != src and LAYERS[dst] >= LAYERS[src]:
                upward.append(f"{module} ({src}, layer {LAYERS[src]}) imports {target} (layer {LAYERS[dst]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_modules():
    graph = all_modules()
    names = set(graph)

    def resolve(target: str) -> str | None:
        while target and target not in names:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {r for t in imps if (r := resolve(t)) and r != m} for m, imps in graph.items()}
    # A package's __init__ re-exporting its own modules is not a cycle worth flagging: drop edges
    # from a module to its own package __init__.
    for m in edges:
        edges[m] = {t for t in edges[m] if not m.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


# Imports inside functions that are allowed, each for a reason: optional or heavy modules loaded only
# when used. Any other package import sits at the top of its module, where the layer test sees it.
LAZY_IMPORTS = {
    ("pointavatar.engine.experiment", "pointavatar.synthetic"),  # only when a conf asks to generate
    ("pointavatar.model.knn", "pointavatar.model._knn_triton"),  # needs Triton
    ("pointavatar.render.api", "pointavatar.render._triton_impl"),  # needs Triton
    ("pointavatar.cli.exp_runner", "pointavatar.config"),  # `--help` answers without loading torch
    ("pointavatar.cli.exp_runner", "pointavatar.engine.distributed"),
    ("pointavatar.cli.exp_runner", "pointavatar.evaluate.runner"),
    ("pointavatar.cli.exp_runner", "pointavatar.train.trainer"),
    ("pointavatar.cli.make_synthetic_subject", "pointavatar.synthetic"),
}


def test_function_level_imports_are_the_listed_lazy_ones():
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
                for target in imported_modules_of(node, path):
                    found.add((name, target))
    unexpected = sorted(found - LAZY_IMPORTS)
    assert not unexpected, (
        f"move these imports to the top of the module (or justify in LAZY_IMPORTS): {unexpected}"
    )


def imported_modules_of(node: ast.Import | ast.ImportFrom, path: Path) -> set[str]:
    """The pointavatar modules one import statement of ``path`` names (as `imported_modules` resolves)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "pointavatar"}
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "pointavatar":
        return set()
    out = set()
    for alias in node.names:
        candidate = f"{target}.{alias.name}"
        is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").is_file()
        out.add(candidate if is_module else target)
    return out
