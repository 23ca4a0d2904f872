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
            # `from builder import paths` imports the module builder.paths; `from builder.x import y`, builder.x
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
    assert {"builder.signing", "builder.records"} <= graph["builder.publish"]  # it sees imports at all
    assert "kiln_device.contract" in graph["kiln_device.agent.install"]  # relative imports too
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(describe_cycle(graph, c) for c in cycles)


def test_no_module_over_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_format_size_is_one_function_with_one_rounding() -> None:
    from builder.safe import format_size

    assert [format_size(n) for n in (0, 1023, 1024, 1536, 256 * 2**20, int(5.25 * 2**30), 2**40, 2**30 + 1)] == [
        "0 B", "1023 B", "1 KiB", "1.5 KiB", "256 MiB", "5.25 GiB", "1 TiB", "1 GiB"]


# --- the builder's stages: docs/architecture.md ------------------------------------------------------

# Every builder module's stage, in pipeline order: a stage may import its own and earlier ones. The
# folders do not say this yet (issue 35: the builder in stage subpackages); this map does, the doc's
# graph is drawn from the imports, and the test below refuses a module without a stage and any new
# import that runs against the order.
STAGES: dict[str, tuple[str, ...]] = {
    "core": ("builder", "builder.errors", "builder.run", "builder.output", "builder.progress", "builder.paths",
             "builder.state", "builder.context", "builder.names", "builder.safe", "builder.locations",
             "builder.redact", "builder.net", "builder.files", "builder.records", "builder.secrets",
             "builder.engine", "builder.emulation"),
    "spec": ("builder.spec", "builder.loader", "builder.contracts", "builder.stand_in", "builder.capability",
             "builder.contents", "builder.docs"),
    "model": ("builder.models", "builder.model", "builder.model.data", "builder.model.gates",
              "builder.model.optimize", "builder.model.pipeline", "builder.model.policy", "builder.model.report",
              "builder.model.runtime_worker", "builder.model.runtimes", "builder.model.tasks",
              "builder.model.validate", "builder.model_fetch", "builder.runtime_image", "builder.runtime_venv"),
    "image": ("builder.base", "builder.mirrors", "builder.pins", "builder.wheels", "builder.render",
              "builder.rechunk", "builder.lint", "builder.build"),
    "disk": ("builder.image", "builder.layer_store", "builder.provision", "builder.disk", "builder.machine",
             "builder.vm", "builder.timeline"),
    "release": ("builder.registry", "builder.signing", "builder.publish", "builder.attest", "builder.trust",
                "builder.rollout", "builder.release", "builder.release_report"),
    "fleet": ("builder.fleet", "builder.fleet.pki", "builder.fleet.service", "builder.fleet.store",
              "builder.fleet.views"),
    "cli": ("builder.cli", "builder.cli.__main__", "builder.cli.channel", "builder.cli.common", "builder.cli.device",
            "builder.cli.fleet", "builder.cli.images", "builder.cli.model", "builder.cli.registry",
            "builder.cli.release", "builder.cli.specs"),
}
# Imports that run against the order today, each to be undone by the move into stage subpackages.
# A new one fails the test; one that goes must leave this list too.
BACKWARD = {("core", "spec"), ("spec", "image"), ("model", "image"), ("image", "release")}
ARCH_DOC = ROOT / "docs/architecture.md"
BEGIN, END = "<!-- stage graph: generated by tests/unit/test_architecture.py -->", "<!-- end of stage graph -->"


def stage_of() -> dict[str, str]:
    return {mod: stage for stage, mods in STAGES.items() for mod in mods}


def stage_edges() -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(from stage, to stage) -> the module imports behind it, for the builder's modules."""
    where, edges = stage_of(), {}
    for mod, targets in import_graph().items():
        if not mod.startswith("builder"):
            continue
        for target in sorted(targets):
            if target.startswith("builder") and where[mod] != where[target]:
                edges.setdefault((where[mod], where[target]), []).append((mod, target))
    return edges


def render_stage_graph() -> str:
    order = list(STAGES)
    lines = [BEGIN, "", "```mermaid", "graph RL"]
    lines += [f"  {s}[{s}: {len(STAGES[s])} modules]" for s in order]
    for (a, b), via in sorted(stage_edges().items(), key=lambda e: (order.index(e[0][0]), order.index(e[0][1]))):
        arrow = "-.->" if order.index(a) < order.index(b) else "-->"
        lines.append(f"  {a} {arrow}|{len(via)}| {b}")
    lines += ["```", "", "Dashed: an import against the pipeline order (a stage reaching a later one):", ""]
    for (a, b), via in sorted(stage_edges().items()):
        if order.index(a) < order.index(b):
            shown = ", ".join(f"`{m.removeprefix('builder.')}` → `{t.removeprefix('builder.')}`" for m, t in via)
            lines.append(f"- {a} → {b}: {shown}")
    lines += ["", END]
    return "\n".join(lines)


def test_every_builder_module_has_a_stage_and_no_new_import_runs_backwards(regen_golden: bool) -> None:
    builder_modules = {m for m in modules() if m.startswith("builder")}
    where = stage_of()
    assert builder_modules - set(where) == set(), "modules without a stage: add them to STAGES (and the doc)"
    assert set(where) - builder_modules == set(), "STAGES names modules that are gone"
    order = list(STAGES)
    backward = {(a, b) for a, b in stage_edges() if order.index(a) < order.index(b)}
    assert backward <= BACKWARD, f"new imports against the stage order: {sorted(backward - BACKWARD)}"
    assert backward >= BACKWARD, f"gone, so take them out of BACKWARD: {sorted(BACKWARD - backward)}"
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
