"""The house's rules: the package's import graph has no cycle (lazy imports inside functions
count too), the runtime core never imports sim/, tools/ or cli/ (nor sim/ and tools/ the cli/),
argparse lives only in cli/, no comment points outside the repository, and the public API is pinned."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import expertcache

PACKAGE = Path(expertcache.__file__).parent
ROOMS = ("sim", "tools", "cli", "demo", "serve")  # every other module is the runtime core (predictors/ included)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """expertcache modules `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    if module == "expertcache.__main__":  # `python -m expertcache`: the command line's entry
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "core"


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_core_imports_no_room_and_no_room_imports_the_cli():
    bad = []
    for module, imported in _graph().items():
        room = _room(module)
        for target in imported:
            to = _room(target)
            if ((room == "core" and to in ("sim", "tools", "cli", "serve"))
                    or (room in ("sim", "tools", "demo", "serve") and to == "cli") or (room == "serve" and to in ("sim", "tools"))):
                bad.append(f"{module} -> {target}")
    assert not bad, bad


def test_argparse_lives_only_in_the_cli():
    outside = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if _room(".".join(("expertcache", *p.relative_to(PACKAGE).parts))) != "cli"
               and re.search(r"\bargparse\b|add_argument\(", p.read_text())]
    assert not outside, outside


def test_no_comment_points_outside_the_repository():
    pattern = re.compile(r"REFERENCES\.md|DESIGN\.md|STYLE\.md|\.\./shared/[A-Z]")
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_module_headers_are_short():
    long = []
    for p in PACKAGE.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(p.read_text()), clean=False)
        if doc is not None and len(doc.strip().splitlines()) > 12:
            long.append(f"{p.relative_to(PACKAGE)}: {len(doc.strip().splitlines())} lines")
    assert not long, long


def test_the_public_api_is_pinned_and_importing_it_does_no_work():
    assert sorted(expertcache.__all__) == sorted(
        ["load", "Engine", "EngineConfig", "GenerationResult", "ExpertCacheError", "__version__"]
    )
    for name in expertcache.__all__:
        assert getattr(expertcache, name) is not None
    code = "import sys, expertcache; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], "importing expertcache must not import torch or transformers"


def test_every_commands_help_imports_neither_torch_nor_transformers():
    """`expertcache <command> --help` answers at once: the flags come from torch-free modules."""
    code = ("import sys\nfrom expertcache.cli import COMMANDS, build_parser\n"
            "build_parser(list(COMMANDS))\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], "a command's parser imports torch or transformers"
