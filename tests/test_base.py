"""The base layer: the device resolver (one answer for every stage's `device` setting) and configs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from datagen.base.config import at_least
from datagen.base.device import DeviceError, check_device_name, resolve_device, wants_cuda
from datagen.base.errors import CirgenError


def test_auto_is_cuda_when_torch_sees_one_else_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(want)
    assert wants_cuda("auto") is torch.cuda.is_available()


def test_named_devices_that_need_no_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")
    assert not wants_cuda("cpu") and not wants_cuda("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_explicit_cuda_without_a_gpu_is_one_line_naming_the_device(name):
    with pytest.raises(DeviceError) as e:
        resolve_device(name)
    msg = str(e.value)
    assert isinstance(e.value, CirgenError) and "\n" not in msg
    assert msg.startswith(f"device {name!r} requested but torch sees no CUDA device (torch {torch.__version__}")
    assert wants_cuda(name)


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "", "cpu ", 0, None])
def test_unknown_names_are_refused_before_torch_is_asked(name):
    with pytest.raises(DeviceError, match="expected auto, cpu, cuda, cuda:N, mps or meta"):
        check_device_name(name)
    with pytest.raises(DeviceError):
        resolve_device(name)


def test_config_numbers_written_as_yaml_1_1_reads_them():
    """`--set train.eps=1e-8` is text to YAML 1.1 (no dot): a float field takes it as the number;
    text that is no number stays an error naming the key."""
    from dataclasses import dataclass

    import pytest

    from datagen.base.config import ConfigError, apply_overrides, from_dict

    @dataclass
    class C:
        eps: float = 1e-6
        kind: str = "mixed"

    assert from_dict(C, apply_overrides({}, ["eps=1e-8"])).eps == 1e-8
    assert from_dict(C, apply_overrides({}, ["kind=off"])).kind == "off"      # YAML 1.1: off is false
    with pytest.raises(ConfigError, match="eps: expected a number, got 'tiny'"):
        from_dict(C, {"eps": "tiny"})


@dataclasses.dataclass
class _Bounded:
    max_distance: int = at_least(0, 4)
    scale: float | None = at_least(0.5, None)


@dataclasses.dataclass
class _Outer:          # module level: from_dict resolves the annotations by name
    inner: _Bounded = dataclasses.field(default_factory=_Bounded)


def test_a_field_bound_is_checked_with_the_dotted_key_and_the_value():
    import pytest

    from datagen.base.config import ConfigError, from_dict

    Outer = _Outer
    assert from_dict(Outer, {}).inner.max_distance == 4                     # the default stays
    assert from_dict(Outer, {"inner": {"max_distance": 0, "scale": None}}).inner.max_distance == 0
    with pytest.raises(ConfigError, match=r"^inner\.max_distance: must be >= 0, got -1$"):
        from_dict(Outer, {"inner": {"max_distance": -1}})
    with pytest.raises(ConfigError, match=r"inner\.scale: must be >= 0.5, got 0.25"):
        from_dict(Outer, {"inner": {"scale": 0.25}})


def test_extra_architecture_configs_come_from_cirgen_model_configs(tmp_path, monkeypatch):
    """Experiments (the shapes-CLIP sweep) keep architecture variants out of the package and name
    their folder in $CIRGEN_MODEL_CONFIGS; only shapes-clip itself ships."""
    import shutil


    from datagen.base.assets import asset_path
    from datagen.base.clip_loader import load_clip

    shutil.copy(asset_path("shapes_clip") / "shapes-clip.json", tmp_path / "my-shapes-variant.json")
    monkeypatch.setenv("CIRGEN_MODEL_CONFIGS", str(tmp_path))
    clip = load_clip("my-shapes-variant", random_init=True)
    assert clip.name == "my-shapes-variant"
    assert sorted(p.name for p in asset_path("shapes_clip").glob("*.json")) == ["shapes-clip.json"]


def test_one_dtype_rule_for_llms_and_diffusion_models(monkeypatch):
    from datagen.base.device import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cuda") == torch.float16 and resolve_dtype("fp32", "cuda") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)    # e.g. a V100 or T4
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="dtype 'half': expected auto, float32, bfloat16 or float16"):
        resolve_dtype("half", "cpu")
