"""The package as a whole: its modules import one way (no circle, no import hidden inside a
function), and a checkout runs its own code even when another checkout is installed."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source folders and the package names they install as.
PACKAGES = {"gptoss_jax": "gptoss_jax", "configs": "gptoss_jax.configs", "sharding": "gptoss_jax.sharding",
            "converters": "gptoss_jax.converters"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(project modules imported at module level, project imports made inside functions)."""
    tree = ast.parse(path.read_text())
    top, local = set(), []

    def targets(node):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                    for a in node.names]
        return []

    for node in tree.body:
        top.update(t for t in targets(node) if t in known)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                local += [f"{path.name}:{inner.lineno} {t}" for t in targets(inner) if t.startswith("gptoss_jax")]
    return top, local


def test_modules_import_one_way():
    mods = modules()
    graph, hidden = {}, []
    for name, path in mods.items():
        graph[name], local = imports_of(path, set(mods))
        hidden += local
    assert not hidden, f"imports inside functions: {hidden}"
    # Depth-first search for a cycle.
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_a_second_checkout_runs_its_own_code(tmp_path):
    """Python started in a second copy of the source (with the first one installed, as CI
    does) imports every gptoss_jax module from that copy, configs/, sharding/ and
    converters/ included."""
    copy = tmp_path / "second"
    for folder in (*PACKAGES, "pyproject.toml"):
        source = ROOT / folder
        if source.is_dir():
            shutil.copytree(source, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, copy / folder)
    names = sorted(n for n in modules() if not n.endswith("__main__"))  # __main__ runs the CLI
    script = ("import importlib, json, sys\n"
              f"names = {names!r}\n"
              "files = {n: getattr(importlib.import_module(n), '__file__', None) or "
              "list(importlib.import_module(n).__path__)[0] for n in names}\n"
              "print(json.dumps(files))\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], cwd=copy, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    files = json.loads(result.stdout.strip().splitlines()[-1])
    elsewhere = {n: f for n, f in files.items() if not Path(f).resolve().is_relative_to(copy.resolve())}
    assert not elsewhere, elsewhere


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)


def test_importing_turns_off_excess_precision_before_jax_starts():
    """bf16 is rounded after every op (docs/architecture.md): the flag is in XLA_FLAGS when the
    backend starts; set by the user, it is left alone; JAX started first gets a warning."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    done = _python("import gptoss_jax, os, jax; jax.numpy.ones(1).block_until_ready(); print(os.environ['XLA_FLAGS'])", env)
    assert done.returncode == 0 and done.stdout.split() == ["--xla_allow_excess_precision=false"], done.stderr
    mine = _python("import gptoss_jax, os; print(os.environ['XLA_FLAGS'])",
                   env | {"XLA_FLAGS": "--xla_allow_excess_precision=true"})
    assert mine.stdout.split() == ["--xla_allow_excess_precision=true"]
    late = _python("import jax; jax.numpy.ones(1).block_until_ready(); import gptoss_jax", env)
    assert late.returncode == 0 and "import gptoss_jax first" in late.stderr
