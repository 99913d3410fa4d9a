"""Reliable by default: the same run gives the same numbers, a killed run resumes to the same result, and a
notebook can be re-run from the top, twice in one kernel and in a fresh one.

Tolerances, measured on this machine (x86-64, torch 2.13 CPU):
- Two fine-tuning runs with the same seed and one torch thread: identical losses and adapter weights,
  difference 0 (bitwise). The tests allow nothing: with one thread the order of every floating-point sum
  is fixed. (With several threads a matrix product may split its sums differently from run to run.)
- A run killed with SIGKILL and resumed from its last complete checkpoint: the Trainer restores weights,
  optimizer, scheduler and random states and skips the batches already seen, so the remaining steps do
  the same arithmetic: measured difference 0 in every later loss and every adapter weight. The test
  allows 1e-6 (absolute) so that a different math library on another machine, which would change the
  last bits of both runs alike, cannot make it flaky while any real divergence (a skipped or repeated
  batch changes the loss in the 2nd-3rd digit) still fails it.
- Notebook re-runs: every printed measurement (parameter counts, token counts, accuracy, generations)
  must be the same text in all three runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers.checkpoints import (MARKER, CompleteCheckpointCallback, IncompleteCheckpointError, check_checkpoint,
                                 complete_checkpoints, incomplete_checkpoints, is_complete_checkpoint,
                                 latest_complete_checkpoint, mark_complete, remove_incomplete_checkpoints)
from helpers.env import OUTPUT_ROOT, REPO_ROOT, output_dir

import _train_for_kill as kill_driver  # tests/_train_for_kill.py; its base model is conftest's `tiny_model_dir`
from _tiny import tiny_dataset, tiny_tokenizer

DRIVER = Path(__file__).with_name("_train_for_kill.py")

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
STANDIN = REPO_ROOT / "models" / "tiny-neox-standin"
MAX_STEPS, SAVE_STEPS = 20, 5
RESUME_ATOL = 1e-6  # see the module docstring


def _code(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _subprocess_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(extra)
    return env


# --- Determinism ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_sets_its_seed_visibly_in_the_config_cell(path):
    config_cells = [c for c in _code(path) if re.search(r"^CONFIG\s*=\s*\{", c, re.M)]
    assert config_cells, f"{path.name}: no configuration cell (CONFIG = {{...}})"
    cell = config_cells[0]
    assert re.search(r"""["']seed["']\s*:\s*\S""", cell), f"{path.name}: CONFIG has no 'seed'"
    assert re.search(r"""set_seed\(\s*CONFIG\[["']seed["']\]\s*\)""", cell), \
        f"{path.name}: the config cell must call set_seed(CONFIG['seed']) where the reader sees it"


def _finetune(base, out, seed):
    from helpers.tuning import finetune

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = finetune("lora", tiny_dataset(), output_dir=out, model_name=str(base),
                          tokenizer=tiny_tokenizer(), max_steps=6, batch_size=4, logging_steps=1,
                          seed=seed, lora_r=4, lora_alpha=8)
    finally:
        torch.set_num_threads(threads)
    weights = {n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n}
    return result.losses, weights


def test_finetune_twice_with_the_same_seed_gives_identical_losses_and_weights(tiny_model_dir, tmp_path):
    first, first_weights = _finetune(tiny_model_dir, tmp_path / "a", seed=42)
    second, second_weights = _finetune(tiny_model_dir, tmp_path / "b", seed=42)
    assert len(first) == 6
    assert first == second  # tolerance 0: one thread, same seed (module docstring)
    assert all(torch.equal(first_weights[n], second_weights[n]) for n in first_weights)
    other, _ = _finetune(tiny_model_dir, tmp_path / "c", seed=7)
    assert other != first, "another seed must change the run, or the test above proves nothing"


def test_dataset_splits_are_seeded():
    from helpers.data import load_dataset

    first = load_dataset("alpaca_en", dev_ratio=0.2, seed=1)
    again = load_dataset("alpaca_en", dev_ratio=0.2, seed=1)
    other = load_dataset("alpaca_en", dev_ratio=0.2, seed=2)
    assert first["dev"]["instruction"] == again["dev"]["instruction"]
    assert first["dev"]["instruction"] != other["dev"]["instruction"]


# --- Interruption ----------------------------------------------------------------------------------------

class _Run:
    """A training subprocess whose stdout lines are read on a thread, so waiting can time out."""

    def __init__(self, *args: str):
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=_subprocess_env())
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 180.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.kill()
                raise AssertionError(f"never printed {pattern!r}; output:\n" + "\n".join(self.seen[-40:]))
            self.seen.append(line)
            found = re.fullmatch(pattern, line)
            if found:
                return found

    def kill(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def killed_runs(tiny_model_dir, tmp_path_factory):
    """Two training processes started side by side and killed with SIGKILL:
    'between': after checkpoint-10 is complete, a couple of steps into the next stretch;
    'inside':  while it writes checkpoint-10 (adapter written, optimizer.pt half written)."""
    root = tmp_path_factory.mktemp("killed")
    between = _Run(str(tiny_model_dir), str(root / "between"), "--max-steps", str(MAX_STEPS), "--save-steps",
                   str(SAVE_STEPS), "--step-sleep", "0.25")
    inside = _Run(str(tiny_model_dir), str(root / "inside"), "--max-steps", str(MAX_STEPS), "--save-steps",
                  str(SAVE_STEPS), "--stall-in-save", "10")
    try:
        between.wait_for(r"SAVED 10")
        killed_at = int(between.wait_for(r"STEP (1[1-9])").group(1))
        between_rc = between.kill()
        inside.wait_for(r"STALLED 10")
        inside_rc = inside.kill()
    finally:
        between.kill()
        inside.kill()
    return {"between": (root / "between", between_rc, killed_at, between.seen),
            "inside": (root / "inside", inside_rc, 10, inside.seen)}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    return kill_driver.train(tiny_model_dir, tmp_path_factory.mktemp("reference") / "run", max_steps=MAX_STEPS,
                             save_steps=SAVE_STEPS)


def _assert_same_run(resumed, reference, from_step):
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    later = [s for s in reference["losses"] if s > from_step]
    assert later and all(s in resumed["losses"] for s in later)
    for step in later:
        assert abs(resumed["losses"][step] - reference["losses"][step]) <= RESUME_ATOL, step
    assert resumed["adapter"].keys() == reference["adapter"].keys()
    for name, tensor in reference["adapter"].items():
        torch.testing.assert_close(resumed["adapter"][name], tensor, rtol=0, atol=RESUME_ATOL, msg=name)


def test_sigkill_mid_run_resumes_to_the_same_adapter_and_losses(killed_runs, uninterrupted, tiny_model_dir):
    out, returncode, killed_at, output = killed_runs["between"]
    assert returncode == -signal.SIGKILL
    assert not any(line.startswith("FINISHED") for line in output), "the run must die before its end"
    latest = latest_complete_checkpoint(out)
    assert latest is not None
    start = int(latest.name.split("-")[1])
    assert 10 <= start < MAX_STEPS and killed_at < MAX_STEPS  # killed a few steps after checkpoint-10
    resumed = kill_driver.train(tiny_model_dir, out, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, resume=latest)
    _assert_same_run(resumed, uninterrupted, start)
    # The resumed run's log starts with the checkpoint's history: nothing was lost before it either.
    for step in range(1, start + 1):
        assert resumed["losses"][step] == uninterrupted["losses"][step]


def test_sigkill_while_a_checkpoint_is_written_leaves_no_valid_looking_folder(killed_runs, uninterrupted,
                                                                              tiny_model_dir):
    from transformers.trainer_utils import get_last_checkpoint

    out, returncode, _, _ = killed_runs["inside"]
    assert returncode == -signal.SIGKILL
    partial = out / "checkpoint-10"
    files = {p.name for p in partial.iterdir()}
    # What transformers 5.23 leaves (helpers/checkpoints.py): the weights are whole, optimizer.pt is cut
    # short, the rest was never written -- and its own "latest checkpoint" is this folder.
    assert "adapter_model.safetensors" in files and "optimizer.pt" in files
    assert "trainer_state.json" not in files and MARKER not in files
    assert Path(get_last_checkpoint(str(out))) == partial
    assert not is_complete_checkpoint(partial)
    with pytest.raises(IncompleteCheckpointError, match=f"no {MARKER}.*being written"):
        check_checkpoint(partial)
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-5"]
    assert incomplete_checkpoints(out) == [partial]
    assert latest_complete_checkpoint(out) == out / "checkpoint-5"
    assert remove_incomplete_checkpoints(out) == [partial] and not partial.exists()
    resumed = kill_driver.train(tiny_model_dir, out, max_steps=MAX_STEPS, save_steps=SAVE_STEPS,
                                resume=latest_complete_checkpoint(out))
    _assert_same_run(resumed, uninterrupted, 5)
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-10", "checkpoint-15", "checkpoint-20"]


def _fake_checkpoint(folder: Path, step: int) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"w" * 64)
    (path / "optimizer.pt").write_bytes(b"o" * 128)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_marker_is_removed_before_the_trainer_overwrites_a_checkpoint_folder(tmp_path):
    """A re-run writing into a folder that holds an older run's checkpoint-10: the old marker must go
    before the first new file lands, or a kill mid-save would leave old marker + mixed files."""
    path = _fake_checkpoint(tmp_path, 10)
    mark_complete(path)
    assert is_complete_checkpoint(path)
    callback = CompleteCheckpointCallback()
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=10, is_world_process_zero=True)
    callback.on_step_end(args, state, SimpleNamespace(should_save=False))
    assert is_complete_checkpoint(path), "no save due at this step: the marker stays"
    callback.on_step_end(args, state, SimpleNamespace(should_save=True))
    assert not (path / MARKER).exists() and not is_complete_checkpoint(path)
    callback.on_save(args, state, SimpleNamespace())
    assert is_complete_checkpoint(path)


def test_a_checkpoint_changed_after_it_was_marked_is_not_complete(tmp_path):
    path = _fake_checkpoint(tmp_path, 5)
    mark_complete(path)
    with open(path / "optimizer.pt", "ab") as f:
        f.write(b"more")
    with pytest.raises(IncompleteCheckpointError, match="optimizer.pt is 132 bytes, but was 128"):
        check_checkpoint(path)
    path = _fake_checkpoint(tmp_path, 6)
    mark_complete(path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(IncompleteCheckpointError, match="adapter_model.safetensors is missing"):
        check_checkpoint(path)
    path = _fake_checkpoint(tmp_path, 7)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    mark_complete(path)
    with pytest.raises(IncompleteCheckpointError, match="trainer_state.json says step 3"):
        check_checkpoint(path)
    assert latest_complete_checkpoint(tmp_path) is None


# --- Re-running notebooks --------------------------------------------------------------------------------

def test_output_dir_is_emptied_on_purpose_so_reruns_never_mix():
    name = f"test_reliability_{os.getpid()}"
    try:
        first = output_dir(name)
        (first / "from_run_1.txt").write_text("old")
        second = output_dir(name)
        assert second == first == OUTPUT_ROOT / name and list(second.iterdir()) == []  # outputs/ unless COURSE_OUTPUTS
        (second / "kept.txt").write_text("x")
        assert (output_dir(name, clean=False) / "kept.txt").exists()  # clean=False only when asked
    finally:
        shutil.rmtree(OUTPUT_ROOT / name, ignore_errors=True)
    assert "outputs/" in (REPO_ROOT / ".gitignore").read_text().split()


# Calls whose first argument is where they write, and Path(...).write_text/write_bytes (the path is the receiver).
WRITE_CALL = re.compile(r"\b(save_pretrained|save_model|to_csv|to_json|savefig|torch\.save|save_file)\(\s*([^,)]*)")
LITERAL_PATH_WRITE = re.compile(r"""(?:Path\(\s*[rf]?["'][^"']*["']\s*\)|[rf]?["'][^"']*["'])\.write_(?:text|bytes)\(""")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_write_only_into_their_own_output_folder(path):
    code = "\n".join(_code(path))
    names = [re.findall(r"""["']([^"']+)["']""", args)[0] for args in re.findall(r"\boutput_dir\(([^)]*)\)", code)
             if re.search(r"""["']""", args)]
    assert all(name == path.stem for name in names), f"{path.name} writes to outputs/{names}, not outputs/{path.stem}"
    writes = WRITE_CALL.findall(code)
    if writes or re.search(r"""open\([^)]*["'][wa]b?["']|\.write_(text|bytes)\(""", code):
        assert names, f"{path.name} writes files but never calls output_dir({path.stem!r})"
    literal = [f"{call}({target})" for call, target in writes if re.match(r"""^[rf]?["']""", target.strip())]
    literal += LITERAL_PATH_WRITE.findall(code)
    assert not literal, f"{path.name} writes to literal paths {literal}: write under OUT = output_dir(...)"
    assert "output_dir=\"" not in code and "output_dir='" not in code, f"{path.name}: a literal Trainer output_dir"


def _copy_course(dest: Path) -> Path:
    """The parts of the course notebook 00 reads, so that a run can be checked to write nothing else."""
    ignore = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints")
    for part in ("helpers", "data", "notebooks"):
        shutil.copytree(REPO_ROOT / part, dest / part, ignore=ignore)
    shutil.copytree(STANDIN, dest / "models" / STANDIN.name)
    return dest


def _snapshot(root: Path) -> dict[str, str]:
    found = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] != "outputs" and "__pycache__" not in rel.parts \
                and ".ipynb_checkpoints" not in rel.parts:
            found[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


TQDM_BAR = re.compile(r"^.*\d+%\|.*\|.*$", re.M)


def _measurements(nb) -> list[tuple[str, list[str]]]:
    """Per code cell: everything it printed to stdout (joined: how the kernel splits a stream into messages
    varies), and the text of what it displayed. Progress bars and stderr (warnings, some shown only once
    per kernel) are left out. An error output fails the test."""
    cells = []
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        printed, shown = [], []
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
            if out.output_type == "stream" and out.name == "stdout":
                printed.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                shown.append(out.data.get("text/plain", ""))
        cells.append((TQDM_BAR.sub("", "".join(printed).replace("\r", "\n")), shown))
    return cells


def test_notebook_00_reruns_identically_twice_in_one_kernel_and_in_a_fresh_one(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    assert (STANDIN / "config.json").is_file(), "the stand-in is missing: make standin"
    course = _copy_course(tmp_path / "course")
    notebook = course / "notebooks" / "00_setup_and_tour.ipynb"
    env = _subprocess_env(PYTHONPATH=str(course), COURSE_SMOKE="1", HF_HOME=str(tmp_path / "hf-home"),
                          HF_HUB_CACHE=str(tmp_path / "hf-home" / "hub"), MPLBACKEND="Agg")
    env.pop("CI", None)
    before = _snapshot(course)
    fresh_file = tmp_path / "fresh.ipynb"
    fresh = subprocess.Popen([sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute",
                              "--ExecutePreprocessor.timeout=300", "--output", str(fresh_file), str(notebook)],
                             cwd=notebook.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = [nbformat.read(notebook, as_version=4) for _ in range(2)]
    client = NotebookClient(runs[0], timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}})
    with client.setup_kernel(env=env):
        for run in runs:  # the same notebook from the top, twice, in one kernel
            client.nb = run
            for index, cell in enumerate(run.cells):
                client.execute_cell(cell, index)
        probe = nbformat.v4.new_code_cell("import helpers.env; print(helpers.env.REPO_ROOT)")
        runs[1].cells.append(probe)
        client.execute_cell(probe, len(runs[1].cells) - 1)
        runs[1].cells.pop()
    log, _ = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, log[-3000:]
    assert probe.outputs[0].text.strip() == str(course), "the kernel must import the copied course"

    once, twice, elsewhere = (_measurements(nb) for nb in (runs[0], runs[1], nbformat.read(fresh_file, as_version=4)))
    assert once == twice, "re-running in the same kernel changed an output"
    assert once == elsewhere, "a fresh kernel printed something else"
    printed = "\n".join(text for text, _ in once)
    assert re.search(r"base model, exact-match accuracy on \d+ test questions: [\d.]+%", printed)
    assert "stand-in" in printed  # offline, the notebook says it runs on the stand-in
    assert _snapshot(course) == before, "the notebook wrote or changed files outside outputs/"
    hub = tmp_path / "hf-home" / "hub"
    assert not hub.exists() or not any(hub.iterdir()), "nothing may be downloaded into the Hugging Face cache"


def test_repo_relative_shows_paths_inside_the_repository_relative_and_others_as_they_are(tmp_path):
    from helpers.env import repo_relative

    assert repo_relative(REPO_ROOT / "outputs" / "x") == Path("outputs/x")
    assert repo_relative(tmp_path / "x") == tmp_path / "x"  # COURSE_OUTPUTS may point outside the repository
