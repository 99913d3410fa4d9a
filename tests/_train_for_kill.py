"""A tiny LoRA training run with the 🤗 Trainer and the course's checkpoint marker, for the reliability tests.

tests/test_reliability.py runs it as a subprocess and kills it with SIGKILL, then resumes in-process with
the same `train` function and compares against an uninterrupted run:

    python tests/_train_for_kill.py BASE_DIR OUT_DIR [--max-steps 20] [--save-steps 5]
                                    [--step-sleep 0.3] [--stall-in-save 10]

It prints `STEP n` after every optimizer step and `SAVED n` once checkpoint-n is complete (flushed), so
the test can time its kill. `--stall-in-save n` makes the process hang while it writes checkpoint-n:
after the adapter weights, in the middle of optimizer.pt (half of its bytes are on disk), which is where
a SIGKILL then lands. The base model is tests/conftest.py's tiny random GPT-NeoX (fixture `tiny_model_dir`),
and the tokenizer and data are tests/_tiny.py's, so nothing waits for the course's stand-in.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
TESTS = str(Path(__file__).resolve().parent)  # on sys.path already when run as a script or under pytest
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from _tiny import tiny_dataset, tiny_tokenizer  # noqa: E402


def _stall_inside(step: int, out_dir: Path) -> None:
    """Hang, half-way through writing optimizer.pt of checkpoint-`step`, until the test kills us."""
    import io

    import torch

    real_save = torch.save
    target = out_dir / f"checkpoint-{step}" / "optimizer.pt"

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f) == target:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as handle:
                handle.write(data[: len(data) // 2])
            print(f"STALLED {step}", flush=True)
            time.sleep(600)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def train(base_dir, out_dir, *, max_steps: int = 20, save_steps: int = 5, seed: int = 42, resume=None,
          step_sleep: float = 0.0, stall_in_save: int | None = None, announce: bool = False) -> dict:
    """LoRA (all linear layers of the blocks, dropout 0.1) on `tiny_dataset`, one torch thread.

    Returns {"losses": {step: loss}, "adapter": {name: tensor}, "global_step": int}.
    """
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from helpers.checkpoints import CompleteCheckpointCallback
    from helpers.models import load_model, lora_target_modules
    from helpers.prompts import collator

    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every process: bitwise-comparable runs
    try:
        set_seed(seed)
        model = load_model(str(base_dir), verbose=False)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1,
                                                 target_modules=lora_target_modules(model, "all")))
        tokenizer = tiny_tokenizer()

        class Announce(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if announce:
                    print(f"STEP {state.global_step}", flush=True)
                if step_sleep:
                    time.sleep(step_sleep)

            def on_save(self, args, state, control, **kwargs):
                if announce:
                    print(f"SAVED {state.global_step}", flush=True)

        if stall_in_save is not None:
            _stall_inside(stall_in_save, out_dir)
        args = TrainingArguments(
            output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
            lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, save_strategy="steps", save_steps=save_steps,
            save_total_limit=3, seed=seed, data_seed=seed, report_to="none", use_cpu=True, disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False)
        # The marker callback comes before Announce, so "SAVED n" is printed after the marker is written.
        trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(), data_collator=collator(tokenizer),
                          callbacks=[CompleteCheckpointCallback(), Announce()])
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
        adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        return {"losses": losses, "adapter": adapter, "global_step": trainer.state.global_step}
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--stall-in-save", type=int, default=None)
    args = parser.parse_args(argv)
    result = train(args.base_dir, args.out_dir, max_steps=args.max_steps, save_steps=args.save_steps,
                   step_sleep=args.step_sleep, stall_in_save=args.stall_in_save, announce=True)
    print(f"FINISHED {result['global_step']}", flush=True)


if __name__ == "__main__":
    main()
