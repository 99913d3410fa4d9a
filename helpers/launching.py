"""Launching a script on several processes from a notebook: the launcher, the environment, the port, the log.

Taught in notebooks/08_multi_gpu_training.ipynb. A launcher (deepspeed, torchrun, accelerate launch) starts N copies of
a script and tells each one who it is through environment variables; the notebook shows every command it runs. What
is left is plumbing, kept here:

    executable(name)            the launcher installed next to this Python (else on the PATH)
    launch_env(num_processes)   what each launch adds to the environment: each process's share of the cores, and,
                                without a GPU per process, DeepSpeed on the CPU with CUDA hidden
    free_port()                 a port the OS says is free, for the launcher's rendezvous (helpers.env)
    Launcher(log_dir, env)      launch(name, command): run it from the repository root, print the command and the
                                script's summary lines, keep the whole output in <log_dir>/<name>.log

Nothing here runs on import. scripts/train_lora.py does not use it: a launcher starts that script, not this module.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .env import REPO_ROOT, free_port, repo_relative

__all__ = ["Launcher", "executable", "free_port", "launch_env"]


def executable(name: str) -> str:
    """The path of the command-line tool `name` (deepspeed, torchrun, accelerate) installed next to this Python, so
    that a notebook whose virtual environment is not activated launches the course's own versions; else the one on
    the PATH. Taught in notebooks/08_multi_gpu_training.ipynb."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is installed neither next to {sys.executable} nor on the PATH "
                                "(pip install -e '.[deepspeed]' installs deepspeed, torchrun and accelerate)")
    return found


def launch_env(num_processes: int) -> dict[str, str]:
    """The variables every launch of `num_processes` processes adds to this process's environment.

    Each process gets its share of the cores (OMP_NUM_THREADS = cores // processes; processes that each start a
    thread per core fight over them) and no tokenizer threads. With fewer GPUs than processes the processes run on
    the CPU: DS_ACCELERATOR=cpu tells DeepSpeed so and CUDA_VISIBLE_DEVICES="" hides a lone GPU, so that PyTorch's
    gloo backend carries the traffic. Taught in notebooks/08_multi_gpu_training.ipynb.
    """
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    import torch

    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_processes)), "TOKENIZERS_PARALLELISM": "false"}
    if torch.cuda.device_count() < num_processes:
        env.update({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})
    return env


class Launcher:
    """`launch = Launcher(log_dir, env)`, then `launch(name, command)`: run one command, return its wall-clock seconds.

    The command runs from `cwd` (the repository root, so relative paths read as a reader types them) with this
    process's environment plus `env`. It prints the command as typed (`$ deepspeed --num_gpus 2 ...`: the program by
    its name, not its path; `show` replaces it), then every output line that starts with `summary_prefix` (the
    training script's own summary, prefix removed), then the seconds and the log's path. The whole output goes to
    `<log_dir>/<name>.log`; a command that fails prints the log's last 30 lines and raises. `commands` keeps every
    command as printed, by name. Taught in notebooks/08_multi_gpu_training.ipynb.
    """

    def __init__(self, log_dir, env: dict[str, str] | None = None, cwd=REPO_ROOT,
                 summary_prefix: str = "[train_lora] "):
        self.log_dir, self.env, self.cwd = Path(log_dir), dict(env or {}), Path(cwd)
        self.summary_prefix = summary_prefix
        self.commands: dict[str, str] = {}

    def shown(self, command) -> str:
        """The command as a reader types it: the program by its name, every part quoted for a shell."""
        return " ".join(shlex.quote(Path(part).name if i == 0 else part) for i, part in enumerate(map(str, command)))

    def __call__(self, name: str, command, show: str | None = None) -> float:
        command = [str(part) for part in command]
        log_path = self.log_dir / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.commands[name] = show or self.shown(command)
        print("$", self.commands[name])
        started = time.perf_counter()
        with open(log_path, "w") as log:
            done = subprocess.run(command, cwd=self.cwd, env={**os.environ, **self.env}, stdout=log,
                                  stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        lines = log_path.read_text().splitlines()
        if done.returncode != 0:
            print("\n".join(lines[-30:]))
            raise RuntimeError(f"{name} failed with exit code {done.returncode}; the whole log: {log_path}")
        for line in lines:
            if line.startswith(self.summary_prefix.rstrip()):
                print("  " + line.removeprefix(self.summary_prefix))
        print(f"  {seconds:.0f} s wall clock, log in {repo_relative(log_path)}")
        return seconds
