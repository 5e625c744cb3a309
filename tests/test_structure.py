"""The house's structure (issue #22): no import cycle among lorafit's modules, function-level imports of its own
modules only where they buy start-up time (each saying why), and no registration with transformers at import."""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lorafit"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def own_imports(name: str, path: Path, known: dict) -> list[tuple[str, int, bool]]:
    """(imported lorafit module, line, inside a function) for every import the module makes at run time
    (top level or in a function; a TYPE_CHECKING block is no import)."""
    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def walk(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module != "__future__":
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if base else a.name for a in child.names]
            for t in targets:
                r = resolve(t)
                if r and r != name and r.split(".")[0] == "lorafit":
                    found.append((r, child.lineno, in_function))
            walk(child, inside)

    walk(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


@functools.cache
def import_graph() -> dict[str, frozenset[str]]:
    known = modules()
    return {name: frozenset(t for t, _, _ in own_imports(name, path, known)) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a path back to its start), or None: a depth-first search for a back edge."""
    state, stack = {}, []

    def visit(v) -> list[str] | None:
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        state[v] = "done"
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_lorafit_modules():
    """Every import counts, top level or inside a function: a cycle hidden in a function is still a cycle."""
    graph = import_graph()
    assert len(graph) > 40 and "lorafit.forward" in graph["lorafit.train"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Modules whose function-level imports of lorafit's own modules are deliberate: the CLI (config errors before torch
# loads), python -m lorafit, the console (the CLI logs before torch loads), init_model (the CLI's parser reads SIZES).
LAZY_ALLOWED = {"lorafit.cli", "lorafit.__main__", "lorafit.init_model"}


def test_function_level_imports_of_lorafit_only_where_they_buy_start_up():
    """(Each says why: test_every_function_level_import_says_why_start_up_or_an_optional_extra.)"""
    known = modules()
    stray = [f"{name}:{line} imports {target}" for name, path in known.items()
             for target, line, in_function in own_imports(name, path, known) if in_function and name not in LAZY_ALLOWED]
    assert not stray, "\n".join(stray)


# A function-level import says why it is not at the module's top: `# start-up: ...` (it keeps something heavy out
# of the CLI's start-up or of a command that does not need it) or `# optional extra: ...` (the pip extra it needs).
WHY = re.compile(r"#\s*(start-up|optional extra):")


def unexplained_imports(source: str) -> list[int]:
    """Lines of the function-level imports of `source` that do not say why: neither the import's own lines nor
    the comment lines directly above its group (consecutive import statements) carry a WHY comment."""
    lines = source.splitlines()
    found = []

    def says_why(first: int, last: int) -> bool:
        return any(WHY.search(lines[i - 1]) for i in range(first, last + 1))

    def check_body(body: list[ast.stmt]):
        group_why = False
        for i, stmt in enumerate(body):
            if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                continue
            prev = body[i - 1] if i else None
            if not (isinstance(prev, (ast.Import, ast.ImportFrom)) and prev.end_lineno + 1 == stmt.lineno):
                # a group starts here: the comment lines directly above it speak for all of it
                above = stmt.lineno - 1
                while above >= 1 and lines[above - 1].lstrip().startswith("#"):
                    above -= 1
                group_why = says_why(above + 1, stmt.lineno - 1)
            if not (group_why or says_why(stmt.lineno, stmt.end_lineno)):
                found.append(stmt.lineno)

    def walk(node, in_function: bool):
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            block = getattr(node, field, None)
            if isinstance(block, list) and in_function and block and isinstance(block[0], ast.stmt):
                check_body(block)
        for child in ast.iter_child_nodes(node):
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(source), False)
    return sorted(found)


def test_the_import_comment_check_tells_a_group_from_a_silent_import():
    source = (
        "import json\n"  # module top: no reason needed
        "def f():\n"
        "    # start-up: torch takes seconds\n"
        "    import torch\n"
        "    from transformers import AutoModel\n"
        "    x = 1\n"
        "    import yaml\n"  # 7: a new group, silent
        "    try:\n"
        "        import fastapi  # optional extra: [serve]\n"
        "    except ImportError:\n"
        "        import numpy  # no reason\n"  # 11
        "    def g():\n"
        "        # why not\n"
        "        import re\n"  # 14: a comment, but not a reason
        "        # a longer note first\n"
        "        # optional extra: [gguf]\n"
        "        import gguf\n"
        "class C:\n"
        "    def m(self):\n"
        "        from a import (  # start-up: a is slow\n"
        "            b,\n"
        "        )\n"
        "        import c\n"
        "        import d  # lazy: d\n"  # 23, 24: the group's first said why on its own line only
    )
    assert unexplained_imports(source) == [7, 11, 14, 23, 24]
    assert unexplained_imports("def f():\n    # start-up: heavy\n    import a\n\n    import b\n") == [5]


def test_every_function_level_import_says_why_start_up_or_an_optional_extra():
    """Function-level imports remain only where they buy start-up time or keep an extra optional (issue #22):
    everything else is imported at the module's top."""
    silent = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in modules().values()
              for line in unexplained_imports(path.read_text(encoding="utf-8"))]
    assert not silent, ("function-level imports with no `# start-up: ...` or `# optional extra: ...` comment (on the "
                        "line, or just above the group); move each to the module's top if neither applies:\n"
                        + "\n".join(silent))


def test_importing_lorafit_registers_no_attention_with_transformers():
    """Segment attention is registered by building a Forward (an explicit call), never as a side effect of
    importing a module: after importing the modules that reach attention.py, transformers does not know it."""
    names = ["lorafit.attention", "lorafit.train", "lorafit.forgetting", "lorafit.serve.models", "lorafit.cli"]
    driver = (
        "import importlib, sys\n"
        f"for n in {names!r}:\n"
        "    importlib.import_module(n)\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "from lorafit.attention import SEGMENTS\n"
        "before = SEGMENTS in AttentionInterface._global_mapping or SEGMENTS in AttentionMaskInterface._global_mapping\n"
        "import torch\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "from lorafit.forward import PLAIN, Forward\n"
        "Forward(GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16)), PLAIN)\n"
        "after = SEGMENTS in AttentionInterface._global_mapping and SEGMENTS in AttentionMaskInterface._global_mapping\n"
        "print(before, after)\n"
    )
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1:] == ["False True"], proc.stdout + proc.stderr


def test_rows_and_rank_shares_are_one_balancing_rule():
    """packing.balance_rows and distributed.shares both put the longest example first into the lightest bin
    (lorafit.balance): checked against that rule written out plainly, ties to the lowest bin."""
    import numpy as np

    from lorafit.data.packing import balance_rows
    from lorafit.distributed import shares

    def plain(lengths, n_bins, capacity=None):
        bins, loads = [[] for _ in range(n_bins)], [0] * n_bins
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # sorted is stable: ties in index order
            b = min(range(len(bins)), key=lambda b: loads[b])
            if capacity is not None and loads[b] + lengths[i] > capacity:
                bins.append([]), loads.append(0)
                b = len(bins) - 1
            bins[b].append(i)
            loads[b] += int(lengths[i])
        return bins

    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 40, size=int(rng.integers(1, 30)))
        size = int(rng.integers(1, 5))
        assert [list(s) for s in shares(lengths, size)] == [sorted(b) for b in plain(list(lengths), size)]
        n_rows = max(1, -(-int(lengths.sum()) // 48))
        assert balance_rows(lengths, 48) == [b for b in plain(list(lengths), n_rows, 48) if b]


def test_an_exceptions_message_is_quoted_through_lorafit_errors_only():
    """errors.first_line / described / one_line say why an exception happened; no module cuts a message by hand."""
    by_hand = re.compile(r"str\(exc\)[^\n]*splitlines\(\)\[0\]|str\(exc\)\[:\d+\]")  # a first line, a cut
    found = [f"{name}:{i}" for name, path in modules().items() if name != "lorafit.errors"
             for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if by_hand.search(line)]
    assert not found, found


def test_accelerate_is_no_dependency_of_lorafit_itself():
    """lorafit never imports accelerate (`accelerate launch` is the user's launcher); only the bench extras and dev
    declare it, for the original pipeline's transformers.Trainer."""
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not any(d.startswith("accelerate") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert all(any(d.startswith("accelerate") for d in extras[e]) for e in ("bench", "bench-gpu", "dev"))
    importing = [name for name, path in modules().items()
                 if any(isinstance(n, (ast.Import, ast.ImportFrom)) and any(
                     (a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0] == "accelerate"
                     for a in n.names) for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))]
    assert importing == []


# The floors of docs/design.md's map, bottom first: a module imports only from its own floor or below.
FLOORS = [
    "errors atomic balance measure metrics progress comparison data.paths serve.protocol attention lorafit data recipes "
    "serve bench serve.kvcache fingerprint localpaths gguf_convert ranks console objectives",
    "data.examples data.tokenize data.filters data.formats data.packing data.templates rundir trackers serve.guards "
    "data.label_pairs",
    "config",
    "preflight",
    "data.hub data.sources lora modeling report checkpoint distributed modelfile fast loss generate runcheck merge",
    "data.prepare data.show forward serve.batcher serve.models",
    "evaluate fastpath lm_eval_bridge preference reference",
    "train forgetting init_model serve.app export",
    "cli __main__ bench.run bench.suite bench.shapes bench.peers bench.baseline bench.preference",
]


def test_every_import_points_down_the_map_of_floors():
    """docs/design.md's map stays true: every module is on a floor, and none imports from a floor above its own."""
    floor = {("lorafit" if m == "lorafit" else f"lorafit.{m}"): i for i, f in enumerate(FLOORS) for m in f.split()}
    graph = import_graph()
    unplaced = sorted(set(graph) - set(floor))
    assert not unplaced, f"{unplaced}: put each on a floor of FLOORS here and of the map in docs/design.md"
    up = [f"{a} (floor {floor[a]}) imports {b} (floor {floor[b]})" for a, ts in graph.items() for b in ts
          if floor[b] > floor[a]]
    assert not up, "\n".join(up)
