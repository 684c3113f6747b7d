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


def test_import_datagen_does_not_import_cir_or_torch():
    import subprocess
    import sys

    code = "import sys, datagen.pipeline, datagen.schema; print('cir' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
