"""The README's two commands, CI and the shipped recipes stay in step."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    cmds = _commands()
    assert len(cmds) == 2
    assert "cirgen triplets --n 20000" in cmds[0]
    assert cmds[1] == "bash tests/setup_and_test.sh"      # installs what the suite needs, then pytest
    assert cmds[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "gen").glob("*.yaml")), ids=lambda p: p.name)
def test_every_gen_recipe_loads(path):
    from datagen.recipe import load_gen_recipe

    r = load_gen_recipe(str(path))
    assert r.expected_cost and r.hash()


def _loader(kind: str):
    from cir.shapes_clip import load_pretrain_recipe
    from cir.stage1 import load_stage1_recipe
    from cir.stage2 import load_stage2_recipe
    from cir.study import load_study_recipe

    return {"pretrain-clip": load_pretrain_recipe, "stage1": load_stage1_recipe, "stage2": load_stage2_recipe,
            "study": load_study_recipe}[kind]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "train").glob("*.yaml"))
                         + sorted((ROOT / "recipes" / "study").glob("*.yaml")), ids=lambda p: p.name)
def test_every_train_and_study_recipe_loads_and_validates(path):
    import yaml

    data = yaml.safe_load(path.read_text())
    kind = data["kind"]
    r = _loader(kind)(str(path))
    assert data.get("expected_cost"), f"{path.name}: say what it costs"
    if kind == "study":        # the recipes it names exist and load too
        from datagen.recipe import load_gen_recipe

        for t in r.tiers:
            load_gen_recipe(t.gen, list(t.overrides))
        _loader("stage1")(r.stage1.recipe, list(r.stage1.overrides))
        _loader("stage2")(r.stage2.recipe, list(r.stage2.overrides))
    if kind == "pretrain-clip":  # its architecture is a shipped config
        assert (ROOT / "assets" / "shapes_clip" / f"{r.model}.json").exists()


def test_recipes_folder_holds_only_known_kinds():
    kinds = {p.parent.name for p in (ROOT / "recipes").rglob("*.yaml")}
    assert kinds <= {"gen", "train", "study"}


def test_import_datagen_does_not_import_cir_or_torch():
    import subprocess
    import sys

    code = "import sys, datagen.pipeline, datagen.schema; print('cir' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# Import name -> distribution name, where they differ.
_DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "open_clip": "open-clip-torch"}


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_every_test_import_is_declared_in_dependencies_or_the_dev_extra():
    """A fresh machine runs `pip install -e ".[dev]"` (tests/setup_and_test.sh): every third-party
    module the tests and tests/bench import must come from the dependencies or the dev extra."""
    import ast
    import sys

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"] + project["optional-dependencies"]["dev"])
    local = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {"datagen", "cir"}
    missing: dict[str, str] = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top == "__future__":
                    continue
                dist = _DISTRIBUTION.get(top, top).lower().replace("_", "-")
                if dist not in declared:
                    missing.setdefault(dist, str(path.relative_to(ROOT)))
    assert not missing, f"imported by the tests but not declared (add to the dev extra): {missing}"


def test_ci_makes_a_fresh_venv_and_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "rm -rf" in ci and "-m venv" in ci and "activate" in ci
    assert ci.index("-m venv") < ci.index(_commands()[1])
    script = (ROOT / "tests" / "setup_and_test.sh").read_text()
    assert "chromium-driver" in script and '".[dev]"' in script and "pytest" in script


def _import_graph() -> dict[str, set[str]]:
    sys.path.insert(0, str(ROOT / "tests" / "bench"))
    from bench_reading_path import import_graph

    return import_graph(ROOT)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    from bench_reading_path import import_cycles

    return import_cycles(graph)


def test_no_import_cycles_in_datagen_or_cir_counting_imports_inside_functions():
    graph = _import_graph()
    assert {"datagen.pipeline", "datagen.unit", "datagen.store", "cir.cli"} <= graph.keys()
    assert "datagen.unit" in graph["datagen.ray_runner"]          # the walker sees real edges
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# cir's application layer drives both packages (the CLI's generation commands, the study's
# generate-then-train grid); the rest of cir is the model library.
CIR_APPLICATION = {"cir.cli", "cir.study"}
# What the model library may use of datagen: the base layer (config, recipe loading, CLIP loader,
# assets, io, errors, device, images), the dataset schema, the shapes world and the HTML viewer.
CIR_MAY_USE = ("datagen.base", "datagen.schema", "datagen.world", "datagen.report")


def test_cir_library_uses_only_datagens_base_layer_schema_world_and_viewer():
    graph = _import_graph()
    reached = {(mod, dep) for mod, deps in graph.items() if mod.startswith("cir") and mod not in CIR_APPLICATION
               for dep in deps if dep.startswith("datagen")}
    assert ("cir.clip", "datagen.base.clip_loader") in reached            # the walker sees real edges
    bad = sorted((m, d) for m, d in reached if not any(d == a or d.startswith(a + ".") for a in CIR_MAY_USE))
    assert bad == []


def test_the_base_layer_imports_nothing_above_it():
    graph = _import_graph()
    base = {m for m in graph if m.startswith("datagen.base")}
    assert {"datagen.base.config", "datagen.base.recipes", "datagen.base.clip_loader"} <= base
    assert sorted((m, d) for m in base for d in graph[m] if d not in base) == []


def test_every_python_package_is_listed_for_installation():
    """A package missing from pyproject's list works in an editable install and breaks a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for pkg in ("datagen", "cir")
             for p in (ROOT / pkg).rglob("__init__.py")}
    assert found - listed == set()


def test_every_public_function_and_class_has_a_docstring():
    """Public = not `_`-prefixed, at module level or in a public class (methods, properties,
    `forward`, `validate` and config dataclasses included)."""
    import ast

    missing = []
    for pkg in ("datagen", "cir"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            def walk(node, prefix=""):
                for c in ast.iter_child_nodes(node):
                    if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                            and not c.name.startswith("_"):
                        if not ast.get_docstring(c):
                            missing.append(f"{path.relative_to(ROOT)}:{c.lineno} {prefix}{c.name}")
                        if isinstance(c, ast.ClassDef):
                            walk(c, f"{c.name}.")
            walk(ast.parse(path.read_text()))
    assert missing == []


def test_code_and_recipes_cite_no_document_outside_the_repository():
    """The design notes the project was started from are not shipped: code, tests and recipes cite
    the paper or the public code instead (a reader cannot open `protocols.md §5`)."""
    notes = ("tscir.md", "protocols.md", "design.md", "generation.md", "apis.md", "peers.md")
    dangling = []
    for ext in ("py", "yaml", "sh"):
        for path in ROOT.rglob(f"*.{ext}"):
            if {".git", "runs"} & set(path.parts) or any(p.startswith(".venv") for p in path.parts):
                continue
            text = path.read_text(errors="replace")
            dangling += [f"{path.relative_to(ROOT)}: {n}" for n in notes if n in text and path.name != "test_repo.py"]
    assert dangling == []
