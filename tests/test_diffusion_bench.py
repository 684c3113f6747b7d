"""The diffusion benchmark and the GPU check script run (CPU smoke modes) and write their JSON."""
import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

BENCH = Path(__file__).resolve().parent / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    res = load("gpu_check_diffusion").main(["--dry-run", "--json", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["dry_run"] and res["device"] == "cpu" and res["dtype"] == "float32"
    assert res["plain"]["images_per_second"] > 0 and res["paired"]["images_per_second"] > 0
    assert res["overhead_ratio"] > 0 and set(res["checks"]) >= {"p1_identical_prompts_identical_8bit",
                                                                "p0_equals_plain_pipeline"}
    assert res["checks"]["p1_identical_prompts_identical_8bit"] and res["checks"]["p0_equals_plain_pipeline"]


def test_gpu_check_uses_sd15_sizes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from datagen.diffusion import tiny

    with torch.device("meta"):     # shapes only: no memory, no init time
        n = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in {
            "unet": UNet2DConditionModel(**tiny.SD15_UNET), "vae": AutoencoderKL(**tiny.SD15_VAE),
            "text": CLIPTextModel(CLIPTextConfig(**tiny.SD15_TEXT))}.items()}
    assert round(n["unet"], 1) == 859.5 and round(n["vae"], 1) == 83.7 and round(n["text"], 1) == 123.1


def test_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    res = load("bench_diffusion").main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == res
    for k in ("plain", "paired", "image_stage"):
        assert res[k]["images_per_second"] > 0
    assert res["overhead_ratio"] > 0 and isinstance(res["meets_target"], bool)
