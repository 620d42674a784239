"""Imports point one way (docs/architecture.md): the module import graph, read from the source with ``ast``, has no
cycle, imports inside functions included (they are how cycles hide); argument parsing lives in ``fastp2p.cli`` only,
and nothing below the CLI imports it."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where each installed package's source lives (pyproject's package-dir).
PACKAGES = {"fastp2p": REPO / "fastp2p", "fastp2p.kernels": REPO / "kernels", "fastp2p.engines": REPO / "engines",
            "fastp2p.bench": REPO / "bench"}


def modules() -> dict[str, tuple[Path, bool]]:
    """name -> (file, is a package)."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = (f, is_pkg)
    return out


def imports_of(name: str, path: Path, is_pkg: bool, known) -> set[str]:
    """The project modules ``name`` imports, anywhere in the file. ``from x import y`` counts as importing ``x.y``
    when that is a module, else ``x``. Edges to a module's own ancestor packages are left out: Python imports a
    package before anything inside it, so such an edge can never close a cycle at run time."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name if is_pkg else name.rpartition(".")[0]
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            mod = node.module if not node.level else ".".join(p for p in (base, node.module) if p)
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [mod, *subs]
        for t in targets:
            while t and t not in known:  # `import fastp2p.data.loader` -> the deepest project module named
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports_of(n, f, is_pkg, mods) for n, (f, is_pkg) in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles (move the shared part into a lower module): " + "; ".join(
        " <-> ".join(c) for c in found)


# Developer tools run as `python -m` scripts, not library code: they keep their own small argument parsers.
SCRIPTS = {"fastp2p.engines.trt_api_check"}  # the static check of the TensorRT calls against the API's names


def test_only_the_cli_parses_arguments_and_nothing_imports_it():
    g = graph()
    cli = {n for n in g if n == "fastp2p.cli" or n.startswith("fastp2p.cli.")}
    assert cli, "fastp2p.cli is a package of subcommand modules"
    for name, deps in g.items():
        # the CLI itself, its entry point, developer scripts; bench scripts may keep their own `python -m` mains
        if name in cli or name in SCRIPTS or name == "fastp2p.__main__" or name.startswith("fastp2p.bench"):
            continue
        assert not deps & cli, f"{name} imports the CLI ({sorted(deps & cli)})"
        source = modules()[name][0].read_text()
        assert "argparse" not in source, f"{name}: argument parsing belongs in fastp2p.cli"
