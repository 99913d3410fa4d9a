"""Where the course runs: the environment report, the smoke switch and the output folder.

Taught in notebooks/00_setup_and_tour.ipynb; every notebook calls `environment_report()` first.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Everything the notebooks write. COURSE_OUTPUTS moves it (the robustness sweep gives each run its own); a relative
# path is taken from the repository root, not from wherever a kernel or a subprocess happens to start.
OUTPUT_ROOT = REPO_ROOT / Path(os.environ.get("COURSE_OUTPUTS") or "outputs").expanduser()

_TRUE = {"1", "true", "yes", "on"}
_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate", "deepspeed")


def capped_steps(steps: int) -> int:
    """`steps`, or fewer when `COURSE_MAX_STEPS` caps every training loop (at least 1).

    For a first pass through a notebook on a slow machine, and for the test run's online-learner lane, which
    checks that every cell runs on a Pythia-shaped model rather than how well it learns (its 50k vocabulary makes
    each step several times dearer than the stand-in's). A capped run learns less: its lesson checks may say ✗.
    Used by the configuration cells of notebooks 02-06 (README, "Which model you get").
    """
    value = os.environ.get("COURSE_MAX_STEPS", "").strip()
    if not value:
        return steps
    try:
        cap = int(value)
    except ValueError:
        raise ValueError(f"COURSE_MAX_STEPS must be a whole number of steps, got {value!r}") from None
    if cap < 1:
        raise ValueError(f"COURSE_MAX_STEPS must be at least 1, got {cap}")
    return min(steps, cap)


def smoke() -> bool:
    """True when the notebooks should run at test size.

    `COURSE_SMOKE=1` turns it on, `COURSE_SMOKE=0` off; without it, the `CI` variable that CI
    services set decides. A learner's run and the test run execute the same cells; only sizes
    change. Taught in notebooks/00_setup_and_tour.ipynb.
    """
    value = os.environ.get("COURSE_SMOKE")
    if value is None:
        value = os.environ.get("CI", "")
    return value.strip().lower() in _TRUE


def course_seed(default: int = 42) -> int:
    """The seed a notebook trains with: `default`, unless `COURSE_SEED` says otherwise.

    The robustness sweep (`python -m benchmarks.robustness`) reruns the notebooks with other seeds to
    measure how much a result moves; a learner can do the same. Taught in notebooks/02_lora_training.ipynb.
    """
    value = os.environ.get("COURSE_SEED", "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"COURSE_SEED must be an integer, got {value!r}") from None


def offline() -> bool:
    """True when the Hugging Face Hub must not be contacted (`HF_HUB_OFFLINE=1`).

    Taught in notebooks/00_setup_and_tour.ipynb.
    """
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def where() -> str:
    """'Colab', 'Kaggle' or 'local'. Taught in notebooks/00_setup_and_tour.ipynb."""
    if "google.colab" in sys.modules:
        return "Colab"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "Kaggle"
    return "local"


def bitsandbytes_4bit_status() -> tuple[bool, str]:
    """Whether bitsandbytes can quantize to 4 bits here, and why (not).

    bitsandbytes 0.50 runs NF4 on CUDA and on x86 CPUs. Importing it is the only honest check.
    Taught in notebooks/00_setup_and_tour.ipynb.
    """
    import logging

    # On CPUs with AVX512-BF16 the import logs a failed optional kernel download; it is harmless.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as F
        import torch

        F.quantize_4bit(torch.zeros(64), quant_type="nf4")
    except Exception as error:  # any failure means 4-bit is not usable here
        return False, f"{type(error).__name__}: {error}"
    return True, "quantize_4bit(nf4) works"


def library_versions() -> dict[str, str]:
    """Installed versions of the course's main libraries. Taught in notebooks/00_setup_and_tour.ipynb."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def bf16_supported(device=None) -> bool:
    """Whether `device` (default: the GPU if there is one, else the CPU) should compute in bf16.

    On a CUDA GPU: only with compute capability 8.0 or newer (A100, A10, L4, RTX 30/40, H100), where
    bf16 is native. `torch.cuda.is_bf16_supported()` also says True on a T4 (7.5), where bf16 is only
    emulated and slow; older GPUs (T4, V100) train in fp16 with loss scaling instead. On a CPU: True,
    because PyTorch computes bf16 on any CPU (natively where AVX512-BF16 exists, emulated elsewhere).
    Its answer is the bf16 line of `environment_report()` (notebooks/00_setup_and_tour.ipynb); notebooks 09
    and 10 train in bf16 with it, and notebooks/04_qlora_training.ipynb explains the fp16 alternative.
    """
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        raise ValueError(f"the course knows 'cpu' and 'cuda' devices, got {device.type!r}")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU here")
    return torch.cuda.get_device_capability(device) >= (8, 0)


def environment_report(show: bool = True) -> dict[str, str]:
    """Collect (and print) where this notebook runs: platform, device, bf16, 4-bit, hub, versions.

    Every notebook prints it first, so a result can always be traced to the machine that made it.
    Taught in notebooks/00_setup_and_tour.ipynb.
    """
    import torch

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    else:
        device = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    ok4, why4 = bitsandbytes_4bit_status()
    report = {
        "platform": f"{where()} / {platform.system()} {platform.machine()}",
        "device": device,
        "bf16": "yes" if bf16_supported() else "no (use fp16 with loss scaling on this GPU)",
        "bitsandbytes 4-bit": "usable" if ok4 else f"not usable: {why4}",
        "hub": "offline (HF_HUB_OFFLINE=1)" if offline() else "online if reachable",
        "smoke run": "yes (test size)" if smoke() else "no (learner size)",
    }
    report.update(library_versions())
    if show:
        width = max(map(len, report))
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return report


def quiet_known_warnings() -> None:
    """Silence harmless notices that would otherwise clutter every notebook's outputs.

    - transformers 5 renamed gradient checkpointing to activation checkpointing and peft 0.21 still calls the
      old names (`is_gradient_checkpointing`, ...), a FutureWarning each time;
    - transformers draws a "Loading weights" progress bar for every `from_pretrained`, and 🤗 datasets one
      for every `map` (the "tokenizing" bars);
    - DeepSpeed, imported by the Trainer, warns that it found no GPU: we tell it the CPU is meant
      (`DS_ACCELERATOR=cpu`) when there is no CUDA device.
    Call it explicitly (every notebook's configuration cell does, checked by tests/test_hygiene.py); importing
    helpers changes nothing. Taught in notebooks/00_setup_and_tour.ipynb.
    """
    import warnings

    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def output_dir(name: str, clean: bool = True) -> Path:
    """The folder a notebook writes to: `outputs/<name>/`, ignored by git.

    With `clean=True` (the default) it is emptied first, on purpose, so that re-running a notebook
    never mixes files of two runs. Taught in notebooks/00_setup_and_tour.ipynb.
    """
    if not isinstance(name, str):
        raise TypeError(f"output_dir name must be a string such as the notebook's slug ('02_lora_training'), "
                        f"got {type(name).__name__}")
    if not name.strip() or Path(name).name != name or name in {".", ".."}:
        raise ValueError(f"output_dir name must be a plain folder name such as the notebook's slug "
                         f"('02_lora_training'), not a path; got {name!r}")
    path = OUTPUT_ROOT / name
    if clean and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_deepspeed_cpu_op() -> str:
    """Compile DeepSpeed's CPU communication op now, instead of inside the first multi-process run.

    On a machine without CUDA, DeepSpeed builds its shared-memory all-reduce (`ShareMemCommBuilder`) with
    g++ the first time a process group starts, about 40 s on 2 cores, and caches it in
    ~/.cache/torch_extensions (or TORCH_EXTENSIONS_DIR). `make install` calls this, so that notebook 08
    and its tests start without that wait. Returns what it did. Taught in notebooks/08_multi_gpu_training.ipynb.
    """
    import importlib.util

    import torch

    if torch.cuda.is_available():
        return "CUDA present: DeepSpeed uses NCCL, no CPU op to build"
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (pip install -e '.[deepspeed]'): nothing to build"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return "this DeepSpeed has no CPU communication op: nothing to build"
    builder.load(verbose=False)
    return f"DeepSpeed's {builder.absolute_name()} is built and cached"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print where the course runs; optionally prepare DeepSpeed.")
    parser.add_argument("--build-deepspeed-op", action="store_true",
                        help="compile DeepSpeed's CPU communication op once (make install does)")
    if parser.parse_args().build_deepspeed_op:
        import time

        started = time.perf_counter()
        print(f"{build_deepspeed_cpu_op()} ({time.perf_counter() - started:.0f} s)")
    else:
        environment_report()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it): for a launcher's rendezvous
    (notebooks/08_multi_gpu_training.ipynb) or a server (notebooks/13_chat_and_api.ipynb)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def repo_relative(path) -> Path:
    """`path` as a reader types it: relative to the repository root when it is inside it (commands run from there),
    else as it is, so that COURSE_OUTPUTS may point anywhere. Taught in notebooks/08_multi_gpu_training.ipynb."""
    path = Path(path)
    try:
        return path.resolve().relative_to(REPO_ROOT)
    except ValueError:
        return path
