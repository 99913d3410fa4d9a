"""bf16 detection: native bf16 needs compute capability 8.0, whatever torch.cuda.is_bf16_supported() says."""
import re

import pytest
import torch

from helpers.env import REPO_ROOT, bf16_supported, environment_report
from helpers.quantization import preferred_compute_dtype

GPUS = {"T4": (7, 5), "V100": (7, 0), "A100": (8, 0), "L4": (8, 9), "H100": (9, 0)}


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a GPU of the given name is present; torch itself claims bf16 on all of them, as on a T4."""
    def install(name):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: GPUS[name])
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Tesla {name}")
        properties = type("Properties", (), {"total_memory": 16 * 2**30})
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    return install


@pytest.mark.parametrize("name, native", [("T4", False), ("V100", False), ("A100", True), ("L4", True), ("H100", True)])
def test_bf16_only_from_compute_capability_8(gpu, name, native):
    gpu(name)
    assert bf16_supported() is native
    assert bf16_supported("cuda:0") is native
    assert preferred_compute_dtype() is (torch.bfloat16 if native else torch.float16)


def test_environment_report_says_no_bf16_on_a_t4_although_torch_says_yes(gpu, monkeypatch):
    # Importing bitsandbytes for the first time under a pretended GPU leaves it half-imported for later tests.
    monkeypatch.setattr("helpers.env.bitsandbytes_4bit_status", lambda: (True, "not checked in this test"))
    gpu("T4")
    assert torch.cuda.is_bf16_supported()  # what torch answers on a real T4
    report = environment_report(show=False)
    assert report["device"].startswith("cuda (Tesla T4")
    assert report["bf16"].startswith("no (use fp16")


def test_bf16_on_cpu_is_true(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bf16_supported() is True and bf16_supported("cpu") is True
    assert environment_report(show=False)["bf16"] == "yes"


def test_bf16_rejects_unknown_devices_and_a_missing_gpu(monkeypatch):
    with pytest.raises(ValueError, match="'cpu' and 'cuda'"):
        bf16_supported("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        bf16_supported("cuda")


def test_nothing_trusts_torch_cuda_is_bf16_supported():
    code = [*REPO_ROOT.glob("helpers/*.py"), *REPO_ROOT.glob("benchmarks/*.py"), *REPO_ROOT.glob("scripts/*.py"),
            *REPO_ROOT.glob("notebooks/*.ipynb")]
    calls = [path.name for path in code if re.search(r"[^`]torch\.cuda\.is_bf16_supported\(", path.read_text())]
    assert not calls, f"{calls} call torch.cuda.is_bf16_supported(), which says yes on a T4: use bf16_supported()"


def test_course_max_steps_caps_training_loops(monkeypatch):
    from helpers.env import capped_steps

    monkeypatch.delenv("COURSE_MAX_STEPS", raising=False)
    assert capped_steps(120) == 120
    monkeypatch.setenv("COURSE_MAX_STEPS", "10")
    assert capped_steps(120) == 10 and capped_steps(5) == 5
    for bad in ("ten", "0"):
        monkeypatch.setenv("COURSE_MAX_STEPS", bad)
        with pytest.raises(ValueError, match="COURSE_MAX_STEPS"):
            capped_steps(120)
