"""The README's two commands, CI and the shipped recipes stay in step."""
import re
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
    assert "pytest" in cmds[1]
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
