"""How much code a reader follows: files visited per command, and import circles.

For `cirgen triplets`, `cirgen stage2` and `cirgen eval` (small, offline runs on the shapes world),
it counts the project files (`datagen/`, `cir/`) that a reader following the command from the CLI
to its output visits: the files with at least one function that runs (a profiler hook records
every Python function call; module and class bodies run at import do not count); files only
imported (for a constant, a class or an exception) count separately. It also lists the
import circles among project modules, counting imports inside functions (lazy imports close
circles too).

    python tests/bench/bench_reading_path.py [--root CHECKOUT] [--json out.json]

`--root` measures another checkout (e.g. a `git worktree` of an older commit) with this script,
so before/after numbers come from one method. `tests/test_repo.py` uses `import_graph` and
`import_cycles` for its no-circles rule.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("datagen", "cir")

# Runs the CLI under a profiler; at exit writes {"run": [...files with a call], "imported": [...]}.
_HOOK = r"""
import atexit, json, sys, threading
root, out = sys.argv[1], sys.argv[2]
prefixes = tuple(f"{root}/{p}/" for p in ("datagen", "cir"))
seen = set()
def hook(frame, event, arg):
    if event == "call":
        f = frame.f_code.co_filename
        # functions only: module and class bodies run at import (no CO_NEWLOCALS flag, 0x2)
        if f.startswith(prefixes) and frame.f_code.co_flags & 0x2:
            seen.add(f[len(root) + 1:])
sys.setprofile(hook); threading.setprofile(hook)
def dump():
    sys.setprofile(None)
    imported = sorted({m.__file__[len(root) + 1:] for m in list(sys.modules.values())
                       if (getattr(m, "__file__", None) or "").startswith(prefixes)})
    json.dump({"run": sorted(seen), "imported": imported}, open(out, "w"))
atexit.register(dump)
sys.argv = ["cirgen"] + sys.argv[3:]
from cir.cli import main
main()
"""


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the datagen/cir modules it imports, at module level or inside a function."""
    files = {}
    for pkg in PACKAGES:
        for p in (root / pkg).rglob("*.py"):
            parts = list(p.relative_to(root).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        edges = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:      # `from pkg import module` or `import pkg.mod`
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    edges.add(name)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, 1972), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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


def _cli(root: Path, env: dict, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "cir.cli", *args], cwd=root, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"setup step `cirgen {' '.join(args)}` failed:\n{r.stderr[-2000:]}")


def _traced(root: Path, env: dict, work: Path, name: str, *args: str) -> dict:
    out = work / f"{name}.json"
    r = subprocess.run([sys.executable, "-c", _HOOK, str(root), str(out), *args], cwd=root, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"`cirgen {' '.join(args)}` failed:\n{r.stderr[-2000:]}")
    seen = json.loads(out.read_text())
    return {"files_run": len(seen["run"]), "files_imported": len(seen["imported"]), "run": seen["run"]}


def measure(root: Path) -> dict:
    """Files visited per command and the import circles of the checkout at `root`."""
    root = root.resolve()
    commands = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # The installed data packages may point at another checkout: map them to this one's folders.
        (work / "pkgs").mkdir()
        (work / "pkgs" / "cirgen_assets").symlink_to(root / "assets")
        (work / "pkgs" / "cirgen_recipes").symlink_to(root / "recipes")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(work / "pkgs")]),
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
        bench, trips, s1 = work / "bench", work / "trips", work / "s1"
        _cli(root, env, "benchmark", "shapes", "--format", "cirr", "--out", str(bench))
        _cli(root, env, "stage1", "--out", str(s1), "--set", "data.n=128", "--set", "train.batch_size=64",
             "--set", "train.epochs=1", "--set", "eval.scenes=20", "--set", f"cache_dir={work / 'cache'}")
        commands["triplets"] = _traced(root, env, work, "triplets", "triplets", "--n", "64", "--out", str(trips))
        commands["stage2"] = _traced(root, env, work, "stage2", "stage2", "--triplets", str(trips),
                                     "--stage1", str(s1), "--out", str(work / "s2"), "--set", "train.epochs=1",
                                     "--set", "train.batch_size=32")
        commands["eval"] = _traced(root, env, work, "eval", "eval", "--model", str(work / "s2"),
                                   "--dataset", "cirr", "--root", str(bench), "--split", "val")
    cycles = import_cycles(import_graph(root))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    return {"commit": commit, "commands": commands, "import_cycles": len(cycles),
            "modules_in_cycles": sum(len(c) for c in cycles), "cycles": cycles}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _emit import emit

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    emit(measure(args.root), args.json)


if __name__ == "__main__":
    main()
