"""Checkpoints that survive a killed process: mark the complete ones, resume only from those.

What the 🤗 Trainer does (transformers 5.23, checked by killing it with SIGKILL while it saved): it writes
`checkpoint-<step>/` in place, with no temporary folder and no rename, in this order: the weights
(`adapter_model.safetensors` for a peft model), `optimizer.pt`, `scheduler.pt`, `rng_state.pth`, and
`trainer_state.json` last. A process killed in between leaves a folder with the right name and part of
the files, and the Trainer's own `resume_from_checkpoint=True` (`get_last_checkpoint`) picks that
newest folder by its name and then fails (FileNotFoundError, or a JSON error for a half-written
`trainer_state.json`) instead of going back to the last good one. Worse, a re-run that writes into a
folder holding an older run's checkpoints can be killed after replacing only the weights: the folder
then mixes two runs and loads without any error.

The fix is a marker written last: `CompleteCheckpointCallback` writes `checkpoint_complete.json` (the
step and every file's size) after the Trainer has finished a checkpoint, atomically (temporary file,
fsync, rename), and removes an old marker before the Trainer starts writing into an existing folder.
A folder without a valid marker is not a checkpoint:

    trainer = Trainer(..., callbacks=[CompleteCheckpointCallback()])
    trainer.train(resume_from_checkpoint=latest_complete_checkpoint(output_dir))  # None: start fresh

Taught in notebooks/02_lora_training.ipynb (resuming from a checkpoint); tests/test_reliability.py kills a
training process mid-run and mid-save and checks that resuming gives the same adapter and losses.
Importing this module has no side effects (transformers is imported when the callback is created).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["MARKER", "CompleteCheckpointCallback", "IncompleteCheckpointError", "check_checkpoint",
           "complete_checkpoints", "incomplete_checkpoints", "is_complete_checkpoint", "latest_complete_checkpoint",
           "mark_complete", "remove_incomplete_checkpoints"]
MARKER = "checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class IncompleteCheckpointError(ValueError):
    """A checkpoint folder that must not be resumed from; the message says what is wrong with it."""


def _step(path: Path) -> int | None:
    found = _CHECKPOINT.match(path.name)
    return int(found.group(1)) if found else None


def _files(folder: Path) -> dict[str, int]:
    """Every file below `folder` but the marker (and its temporary twin), with its size in bytes."""
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(MARKER) and not path.name.startswith(f".{MARKER}"):
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
    return sizes


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(folder) -> Path:
    """Write `folder/checkpoint_complete.json` listing every file and its size; returns the marker's path.

    The files are flushed to disk first, then the marker is written to a temporary name, flushed and
    renamed, so the marker exists only once everything it lists is on disk. Call it only when the
    checkpoint is finished (`CompleteCheckpointCallback` does, from the Trainer's `on_save`).
    """
    folder = Path(folder)
    step = _step(folder)
    if step is None or not folder.is_dir():
        raise IncompleteCheckpointError(f"{folder} is not a checkpoint folder: expected a folder named checkpoint-<step>")
    files = _files(folder)
    for name in files:
        _fsync(folder / name)
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, folder / MARKER)
    _fsync(folder)
    return folder / MARKER


def _unmark(folder) -> bool:
    """Remove the marker of `folder` (before new files are written into it); True if there was one."""
    marker = Path(folder) / MARKER
    if marker.exists():
        marker.unlink()
        _fsync(Path(folder))
        return True
    return False


def check_checkpoint(path) -> Path:
    """Return `path` if it is a complete checkpoint; otherwise raise IncompleteCheckpointError saying why.

    Complete means: a folder named checkpoint-<step> with a `checkpoint_complete.json` for that step,
    every file it lists present with the size it had when the checkpoint was finished, and a
    `trainer_state.json` whose global_step is that step.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise IncompleteCheckpointError(f"{folder}: no such checkpoint folder")
    step = _step(folder)
    if step is None:
        raise IncompleteCheckpointError(f"{folder} is not a checkpoint folder: expected a name like checkpoint-<step>, "
                                        "inside the Trainer's output_dir")
    marker = folder / MARKER
    if not marker.is_file():
        raise IncompleteCheckpointError(
            f"{folder} has no {MARKER}: it was still being written when the process stopped, or it was saved "
            "without helpers.checkpoints.CompleteCheckpointCallback. Resume from an earlier complete "
            "checkpoint (latest_complete_checkpoint) or start again.")
    try:
        recorded = json.loads(marker.read_text())
        files, marked_step = dict(recorded["files"]), int(recorded["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise IncompleteCheckpointError(f"{marker} is unreadable ({error}); the checkpoint cannot be trusted") from None
    if marked_step != step:
        raise IncompleteCheckpointError(f"{marker} is for step {marked_step}, but the folder is step {step}")
    for name, size in files.items():
        file = folder / name
        if not file.is_file():
            raise IncompleteCheckpointError(f"{folder}: {name} is missing (the checkpoint listed it when it was finished)")
        if file.stat().st_size != size:
            raise IncompleteCheckpointError(f"{folder}: {name} is {file.stat().st_size} bytes, but was {size} when the "
                                            "checkpoint was finished (changed or overwritten since)")
    try:
        state_step = json.loads((folder / TRAINER_STATE).read_text())["global_step"]
    except (OSError, ValueError, KeyError) as error:
        raise IncompleteCheckpointError(f"{folder}: {TRAINER_STATE} is missing or unreadable ({error})") from None
    if state_step != step:
        raise IncompleteCheckpointError(f"{folder}: {TRAINER_STATE} says step {state_step}, the folder step {step}")
    return folder


def is_complete_checkpoint(path) -> bool:
    """True if `check_checkpoint(path)` accepts it."""
    try:
        check_checkpoint(path)
    except IncompleteCheckpointError:
        return False
    return True


def _checkpoint_folders(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected the Trainer's output_dir holding checkpoint-<step> folders)")
    return sorted((p for p in folder.iterdir() if p.is_dir() and _step(p) is not None), key=_step)


def complete_checkpoints(folder) -> list[Path]:
    """The complete checkpoint-<step> folders in the Trainer's output_dir `folder`, oldest step first."""
    return [p for p in _checkpoint_folders(folder) if is_complete_checkpoint(p)]


def incomplete_checkpoints(folder) -> list[Path]:
    """The checkpoint-<step> folders of `folder` that must not be resumed from, oldest step first."""
    return [p for p in _checkpoint_folders(folder) if not is_complete_checkpoint(p)]


def latest_complete_checkpoint(folder) -> Path | None:
    """The complete checkpoint with the highest step in `folder`, or None when there is none.

    Pass it to `trainer.train(resume_from_checkpoint=...)`: None starts from the beginning. Unlike the
    Trainer's `get_last_checkpoint`, a folder that was being written when the process died is skipped.
    """
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def remove_incomplete_checkpoints(folder) -> list[Path]:
    """Delete the incomplete checkpoint folders of `folder` (before resuming); returns what was removed.

    The Trainer keeps `save_total_limit` checkpoints by modification time, so a leftover partial folder
    would otherwise count as one of them and push a complete one out.
    """
    import shutil

    removed = incomplete_checkpoints(folder)
    for path in removed:
        shutil.rmtree(path)
    return removed


def _make_callback_class():
    from transformers import TrainerCallback

    class CompleteCheckpointCallback(TrainerCallback):
        """A `TrainerCallback` that marks each checkpoint complete once the Trainer has written all of it.

        `on_step_end` runs after the Trainer decided to save but before it writes: an existing marker in
        the folder about to be (over)written is removed there. `on_save` runs after the weights,
        optimizer, scheduler, random states and trainer_state.json are written: the marker is written
        then. Only the main process writes markers. Taught in notebooks/02_lora_training.ipynb.
        """

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save and state.is_world_process_zero:
                _unmark(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                mark_complete(folder)

    CompleteCheckpointCallback.__module__ = __name__
    CompleteCheckpointCallback.__qualname__ = "CompleteCheckpointCallback"
    return CompleteCheckpointCallback


def __getattr__(name: str):
    # `CompleteCheckpointCallback` subclasses transformers' TrainerCallback; the class is made on first
    # use so that importing this module stays cheap and free of side effects.
    if name == "CompleteCheckpointCallback":
        cls = globals()["CompleteCheckpointCallback"] = _make_callback_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
