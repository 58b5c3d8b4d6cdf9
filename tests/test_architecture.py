"""The layering docs/architecture.md describes, checked on the source: no import cycles (lazy and
type-only imports included), the model free of DeepSpeed, DeepSpeed's internals in one module, and
the size limits of the conventions."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "megatrain"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every megatrain module ``path`` imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # "from pkg import module"
    found = set()
    for target in out:
        while target and target not in known:  # "megatrain.x.y" where y is a name in module x
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        deps = _imports(path, name, known)
        # importing a submodule runs its package's __init__ first
        graph[name] = deps | {d.rpartition(".")[0] for d in deps if d.rpartition(".")[0] in known} - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_package_parent(a: str, b: str) -> bool:
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exporting its own submodules is not a cycle of the layering.
    pruned = {a: {b for b in deps if not _is_package_parent(a, b)} for a, deps in graph.items()}
    assert _cycles(pruned) == []


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_and_data_know_nothing_of_deepspeed_or_the_engine():
    for sub in ("model", "data", "parallel"):
        for path in (PKG / sub).rglob("*.py"):
            deps = _imports(path, _module_name(path), set(_modules()) | {"deepspeed"})
            bad = sorted(d for d in deps if d == "deepspeed" or d.startswith(("megatrain.engine", "megatrain.trainer",
                                                                                 "megatrain.checkpoint")))
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"
    for path in (PKG / "data").rglob("*.py"):
        deps = _imports(path, _module_name(path), set(_modules()))
        assert not [d for d in deps if d.startswith("megatrain.model")], f"{path.relative_to(REPO)} imports the model"


def test_deepspeed_private_internals_are_touched_in_one_module():
    private = ("_take_model_step", "_INSTRUCTION_MAP", "_hp_optimizer_states_linked", "_z3_optimizer",
               "_get_fp32_opt_state_partition", "_lazy_init_hp_params_optimizer_state", "_step_applied")
    allowed = PKG / "engine" / "internals.py"
    for path in PKG.rglob("*.py"):
        if path == allowed:
            continue
        used = sorted({node.attr for node in ast.walk(ast.parse(path.read_text()))
                       if isinstance(node, ast.Attribute) and node.attr in private})
        assert not used, f"{path.relative_to(REPO)} touches DeepSpeed internals {used}; use megatrain.engine.internals"


def test_size_limits():
    top = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 8, top
    long_files = [f"{p.relative_to(REPO)} ({n})" for p in PKG.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) >= 800]
    assert not long_files
    long_functions = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno > 60:
                long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long_functions, long_functions
