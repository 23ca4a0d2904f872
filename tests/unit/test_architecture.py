"""The house: no import circles, no module past 600 lines (the builder, the device package, bench)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("builder", "kiln_device", "bench")
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The builder module an import names (a package's __init__ for a name inside it)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that MOD imports, at module level or inside functions (TYPE_CHECKING too)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from builder import paths` imports the module builder.core.paths; `from builder.x import y`, builder.x
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            target = resolve(name, known) if name.split(".")[0] in PACKAGES else None
            if target and target != mod:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {mod: imports_of(mod, path, known) for mod, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def describe_cycle(graph: dict[str, set[str]], comp: list[str]) -> str:
    """One concrete circle inside a component: a -> b -> ... -> a."""
    members = set(comp)
    start = comp[0]
    path = [start]
    seen = {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)
        back = [w for w in nxt if w in seen]
        if back:
            return " -> ".join([*path[path.index(back[0]):], back[0]])
        path.append(nxt[0])
        seen.add(nxt[0])


def test_find_cycles_sees_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert describe_cycle(graph, ["a", "b", "c"]) == "a -> b -> c -> a"


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert {"builder.release.signing", "builder.core.records"} <= graph["builder.release.publish"]  # sees imports
    assert "kiln_device.contract" in graph["kiln_device.agent.install"]  # relative imports too
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(describe_cycle(graph, c) for c in cycles)


def test_no_module_over_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_format_size_is_one_function_with_one_rounding() -> None:
    from builder.core.safe import format_size

    assert [format_size(n) for n in (0, 1023, 1024, 1536, 256 * 2**20, int(5.25 * 2**30), 2**40, 2**30 + 1)] == [
        "0 B", "1023 B", "1 KiB", "1.5 KiB", "256 MiB", "5.25 GiB", "1 TiB", "1 GiB"]


# --- the builder's stages: docs/architecture.md ------------------------------------------------------

# The builder's stages, in pipeline order: each is a subpackage, builder/<stage>/, and may import its
# own modules and those of earlier stages, never a later one's. docs/architecture.md describes them,
# and its graph is drawn from the imports.
STAGES = ("core", "spec", "keys", "base", "model", "image", "disk", "release", "fleet", "cli")
ARCH_DOC = ROOT / "docs/architecture.md"
BEGIN, END = "<!-- stage graph: generated by tests/unit/test_architecture.py -->", "<!-- end of stage graph -->"


def stage_of(mod: str) -> str | None:
    """builder.<stage>.x -> <stage>; `builder` itself is core's; None: a module outside every stage."""
    parts = mod.split(".")
    if parts == ["builder"]:
        return "core"
    return parts[1] if parts[1] in STAGES else None


def stage_edges() -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(from stage, to stage) -> the module imports behind it, for the builder's modules."""
    edges: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for mod, targets in import_graph().items():
        if not mod.startswith("builder"):
            continue
        for target in sorted(targets):
            a, b = stage_of(mod), stage_of(target)
            if target.startswith("builder") and a and b and a != b:
                edges.setdefault((a, b), []).append((mod, target))
    return edges


def render_stage_graph() -> str:
    order = list(STAGES)
    count = {s: sum(1 for m in modules() if m.startswith("builder") and stage_of(m) == s) for s in order}
    lines = [BEGIN, "", "```mermaid", "graph RL"]
    lines += [f"  {s}[{s}: {count[s]} modules]" for s in order]
    for (a, b), via in sorted(stage_edges().items(), key=lambda e: (order.index(e[0][0]), order.index(e[0][1]))):
        arrow = "-.->" if order.index(a) < order.index(b) else "-->"
        lines.append(f"  {a} {arrow}|{len(via)}| {b}")
    lines += ["```", "", END]
    return "\n".join(lines)


def test_every_builder_module_is_in_a_stage_and_imports_run_one_way(regen_golden: bool) -> None:
    outside = sorted(m for m in modules() if m.startswith("builder") and stage_of(m) is None)
    assert not outside, f"modules outside the stage packages (move each into builder/<stage>/): {outside}"
    assert {stage_of(m) for m in modules() if m.startswith("builder")} == set(STAGES), "a stage without modules"
    order = list(STAGES)
    backward = {k: v for k, v in stage_edges().items() if order.index(k[0]) < order.index(k[1])}
    assert not backward, "imports against the stage order (a stage imports only its own and earlier ones): " + \
      "; ".join(f"{a} -> {b}: " + ", ".join(f"{m} -> {n}" for m, n in via) for (a, b), via in sorted(backward.items()))
    text = ARCH_DOC.read_text()
    block = render_stage_graph()
    if regen_golden:
        start, end = text.index(BEGIN), text.index(END) + len(END)
        ARCH_DOC.write_text(text[:start] + block + text[end:])
        text = ARCH_DOC.read_text()
    assert block in text, "docs/architecture.md's stage graph is stale: pytest tests/unit/test_architecture.py " \
                          "--regen-golden"
    for stage in STAGES:  # the prose names every stage
        assert f"| {stage} |" in text, f"docs/architecture.md does not describe the {stage} stage"


def test_the_builder_imports_no_agent_internals() -> None:
    """Issue 35: what the builder and the agent both need lives in kiln_device (the contract, layers, oci_layout,
    errors), not in the agent's own package, so the agent's insides can change without the builder's."""
    graph = import_graph()
    reaching = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("builder")
                      for t in targets if t.startswith("kiln_device.agent"))
    assert not reaching, reaching
