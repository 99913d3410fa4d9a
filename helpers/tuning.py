"""One function that fine-tunes the base model with any of the course's methods, from the same arguments.

    result = finetune("lora", train_set, output_dir=out, max_steps=60)

Methods: "lora" (notebooks/02_lora_training.ipynb), "qlora" (notebooks/04_qlora_training.ipynb), and
"ptuning-v2", "freeze", "full" (notebooks/06_comparing_methods.ipynb), which compares all of them.
The 🤗 Trainer does the loop; this module prepares the model, builds the TrainingArguments and measures the
run. Training once and reusing the run in later notebooks is helpers.run_cache.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

from .models import DEFAULT_MODEL, count_parameters, load_model, load_tokenizer, lora_target_modules
from .prompts import collator

METHODS = ("lora", "qlora", "ptuning-v2", "freeze", "full")
# Learning rates that work on the course's tiny model; the comments give the seeds' full-size values.
DEFAULT_LR = {
    "lora": 2e-3,        # LLMs_train / ChatGLM Efficient Tuning LoRA: 2e-4 to 5e-5
    "qlora": 2e-3,       # QLoRA paper: 2e-4
    # ChatGLM P-Tuning v2: 2e-2. Exploratory runs on the stand-in (2026-12-02, 60 steps, seeds 1-5): 2e-2 mostly
    # collapsed to one answer (10-17% of the test split; a constant answer scores 10.4%), 1e-2 reached 11-26% and
    # 5e-3 13-24%. At 120 steps, 1e-2 is swept in lessons/06_comparing_methods.md.
    "ptuning-v2": 1e-2,
    "freeze": 1e-3,      # ChatGLM Efficient Tuning freeze: 1e-4 to 5e-5
    "full": 5e-4,        # full fine-tuning: 1e-5
}


def prepare_model(model, method: str, *, lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.05,
                  target_modules=None, pre_seq_len: int = 16, prefix_projection: bool = True,
                  prefix_hidden_size: int | None = None, num_trainable_layers: int = 2,
                  gradient_checkpointing: bool = False):
    """Make `model` trainable the way `method` says; returns the (possibly peft-wrapped) model."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model, prepare_model_for_kbit_training

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("lora", "qlora"):
        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        targets = target_modules or lora_target_modules(model, "all")
        config = LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=targets)
        return get_peft_model(model, config)
    if method == "ptuning-v2":
        if not isinstance(pre_seq_len, int) or pre_seq_len < 1:
            raise ValueError(f"pre_seq_len (virtual tokens per layer) must be a positive integer, got {pre_seq_len!r}")
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=pre_seq_len,
                                    prefix_projection=prefix_projection,
                                    encoder_hidden_size=prefix_hidden_size or model.config.hidden_size)
        return repair_prefix_generation(get_peft_model(model, config))
    if method == "freeze":
        # ChatGLM Efficient Tuning's Freeze: only the MLPs of the last N transformer layers learn.
        n_layers = model.config.num_hidden_layers
        if not 1 <= num_trainable_layers <= n_layers:
            raise ValueError(f"num_trainable_layers must be in 1..{n_layers}, got {num_trainable_layers}")
        keep = set(range(n_layers - num_trainable_layers, n_layers))
        pattern = re.compile(r"\.(\d+)\.mlp\.")
        for name, param in model.named_parameters():
            found = pattern.search(name)
            param.requires_grad = bool(found) and int(found.group(1)) in keep
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("freeze found no '<layer>.mlp.' parameters to train in this model family")
        return model
    for param in model.parameters():  # full
        param.requires_grad = True
    return model


def repair_prefix_generation(model):
    """Make `generate` see a prefix-tuned (P-Tuning v2) model's prefix; returns the same model.

    peft 0.21 hands the prefix to the model as `past_key_values`. transformers 5.23 renamed that argument
    `cache` and, given both, keeps `cache`, which `generate` always passes (empty at the first step): the
    prefix is dropped without an error and the model answers as if it had never been tuned, while
    training, which goes through `forward`, is unaffected. This moves the prefix into `cache` at the
    first step and drops peft's fresh copy at the later ones. Other models are returned untouched, and
    so is everything once peft passes the prefix as `cache` itself. Notebook 05 checks that `generate`
    scores the first new token exactly as `forward` does.
    Taught in notebooks/05_ptuning_v2.ipynb.
    """
    from peft import PeftModel, PeftType

    if not isinstance(model, PeftModel) or getattr(model, "_prefix_generation_repaired", False):
        return model
    if model.active_peft_config.peft_type != PeftType.PREFIX_TUNING:
        return model
    prepare = model.prepare_inputs_for_generation

    def prepare_inputs_for_generation(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        if "cache" in inputs and "past_key_values" in inputs:
            prefix, cache = inputs.pop("past_key_values"), inputs["cache"]
            if prefix is not None and (cache is None or cache.get_seq_length() == 0):
                inputs["cache"] = prefix
        return inputs

    model.prepare_inputs_for_generation = prepare_inputs_for_generation
    model._prefix_generation_repaired = True
    return model


class _PeakRSS:
    """Peak resident memory of this process above its level at the start (CPU), sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


@dataclass
class FinetuneResult:
    method: str
    model: object = field(repr=False)
    tokenizer: object = field(repr=False)
    losses: list[float]
    steps: int
    seconds: float
    seconds_per_step: float
    tokens_per_second: float
    peak_memory_mib: float
    memory_kind: str
    trainable: int
    total: int
    trainable_share_pct: float
    output_dir: str

    def row(self) -> dict:
        """The measurements as one table row (no model)."""
        return {"method": self.method, "trainable_%": round(self.trainable_share_pct, 3),
                "trainable": self.trainable, "s/step": round(self.seconds_per_step, 3),
                "tokens/s": round(self.tokens_per_second), f"peak MiB ({self.memory_kind})": round(self.peak_memory_mib, 1),
                "first loss": round(self.losses[0], 3), "last loss": round(self.losses[-1], 3)}


def expected_training_time(model, batch: dict, steps: int, gradient_accumulation_steps: int = 1) -> float:
    """Time one training step on a real batch here and print what the whole run should take; return s/step.

    One forward and backward pass (the optimizer's update is small beside it), with the random state saved and
    restored and the gradients cleared, so the run that follows is exactly the run it would have been. The first
    step pays some one-off costs, so the estimate errs long. Taught in notebooks/02_lora_training.ipynb.
    """
    import torch

    was_training = model.training
    model.train()
    batch = {key: value.to(model.device) for key, value in batch.items()}
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        started = time.perf_counter()
        model(**batch).loss.backward()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - started) * gradient_accumulation_steps
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    total = per_step * steps
    shown = f"{total:.0f} s" if total < 120 else f"{total / 60:.0f} min" if total < 7200 else f"{total / 3600:.1f} h"
    where = torch.cuda.get_device_name() if model.device.type == "cuda" else f"this CPU ({torch.get_num_threads()} threads)"
    print(f"expected: {steps} steps x {per_step:.2f} s = about {shown} on {where} (one step measured just now)")
    return per_step


def training_arguments(output_dir, *, max_steps: int, learning_rate: float, batch_size: int = 8,
                       gradient_accumulation_steps: int = 1, seed: int = 42, logging_steps: int = 5,
                       save_steps: int | None = None, save_total_limit: int | None = 2, optim: str = "adamw_torch",
                       lr_scheduler_type: str = "cosine", warmup_steps: int | None = None, max_grad_norm: float = 1.0,
                       gradient_checkpointing: bool = False, group_by_length: bool = False, quiet: bool = True,
                       **more):
    """The course's 🤗 `TrainingArguments`, one recipe for `finetune` and scripts/train_lora.py.

    Cosine schedule with a warm-up of max_steps // 20 (at least 1) unless `warmup_steps` says, no weight decay,
    the data order seeded like the weights, checkpoints only when `save_steps` is given, the CPU when there is
    no CUDA GPU, and nothing reported anywhere. `more` goes to `TrainingArguments` as it is (deepspeed=, fp16=,
    bf16=, ddp_find_unused_parameters=, ...). Taught in notebooks/02_lora_training.ipynb.
    """
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler_type, warmup_steps=max(1, max_steps // 20) if warmup_steps is None else warmup_steps,
        weight_decay=0.0, logging_steps=min(logging_steps, max_steps),
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=save_total_limit,
        seed=seed, data_seed=seed, optim=optim, report_to="none", use_cpu=not torch.cuda.is_available(),
        # transformers 5 renamed gradient_checkpointing to activation_checkpointing, replaced
        # `group_by_length=True` by this sampler choice, and always saves weights as safetensors
        # (the old `save_safetensors` flag is gone).
        activation_checkpointing=gradient_checkpointing,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        remove_unused_columns=False, disable_tqdm=quiet, dataloader_num_workers=0,
        max_grad_norm=max_grad_norm, **more)


def finetune(method: str, train_dataset, *, output_dir, model_name: str = DEFAULT_MODEL, max_steps: int = 60,
             batch_size: int = 8, gradient_accumulation_steps: int = 1, learning_rate: float | None = None,
             seed: int = 42, logging_steps: int = 5, save_steps: int | None = None, save_total_limit: int | None = 2,
             resume_from_checkpoint=None, optim: str = "adamw_torch", gradient_checkpointing: bool = False,
             group_by_length: bool = False, model=None, tokenizer=None, quiet: bool = True,
             max_grad_norm: float = 1.0, announce: bool = False, **method_kwargs) -> FinetuneResult:
    """Fine-tune with `method` on a tokenized dataset (input_ids, attention_mask, labels) via the 🤗 Trainer.

    Pass `model` to train one you already prepared; otherwise the base model is loaded (4-bit NF4 with
    double quantization for "qlora"). Returns the trained model, its loss per logging step, and
    measurements: seconds per step, tokens per second, peak memory (CUDA allocator on a GPU, process RSS
    growth on a CPU) and the trainable share. `announce=True` first prints the run's expected time from one
    measured step (`expected_training_time`; the run itself is unchanged).
    """
    import torch
    from transformers import Trainer, set_seed

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    missing = {"input_ids", "labels"} - set(train_dataset.column_names)
    if missing:
        raise ValueError(f"train_dataset must be tokenized (see helpers.prompts.tokenize_dataset); missing {missing}")
    set_seed(seed)
    tokenizer = tokenizer or load_tokenizer(model_name)
    if model is None:
        model = load_model(model_name, quantization="nf4" if method == "qlora" else None, verbose=not quiet)
        model = prepare_model(model, method, gradient_checkpointing=gradient_checkpointing, **method_kwargs)
    elif method_kwargs:
        raise ValueError(f"method options {sorted(method_kwargs)} only apply when finetune loads the model")
    counts = count_parameters(model)
    cuda = torch.cuda.is_available()
    tokens_seen = [0]
    base_collate = collator(tokenizer)

    def counting_collate(features):
        batch = base_collate(features)
        tokens_seen[0] += int(batch["attention_mask"].sum())
        return batch

    args = training_arguments(
        output_dir, max_steps=max_steps, batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate or DEFAULT_LR[method], seed=seed, logging_steps=logging_steps,
        save_steps=save_steps, save_total_limit=save_total_limit, optim=optim,
        gradient_checkpointing=gradient_checkpointing and method != "ptuning-v2", group_by_length=group_by_length,
        quiet=quiet, max_grad_norm=max_grad_norm)  # the QLoRA paper clips at 0.3 (notebooks/04_qlora_training.ipynb)
    # Saved checkpoints get a completion marker, so a run killed mid-save never resumes from a
    # half-written folder; `resume_from_checkpoint=True` means the latest *complete* one.
    from .checkpoints import CompleteCheckpointCallback, latest_complete_checkpoint

    if resume_from_checkpoint is True:
        resume_from_checkpoint = latest_complete_checkpoint(output_dir)
        if resume_from_checkpoint is None:
            raise ValueError(f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint")
        resume_from_checkpoint = str(resume_from_checkpoint)
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=counting_collate,
                      callbacks=[CompleteCheckpointCallback()] if save_steps else None)
    if quiet:  # without a progress bar the Trainer prints every log dictionary; quiet means no wall of logs
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if announce:
        first = base_collate([train_dataset[i] for i in range(min(batch_size, len(train_dataset)))])
        expected_training_time(model, first, max_steps, gradient_accumulation_steps)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with _PeakRSS() as rss:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    seconds = time.perf_counter() - started
    peak, kind = (torch.cuda.max_memory_allocated() / 2**20, "cuda") if cuda else (rss.mib, "cpu rss growth")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    steps = trainer.state.global_step
    model.eval()
    return FinetuneResult(method=method, model=model, tokenizer=tokenizer, losses=losses, steps=steps,
                          seconds=seconds, seconds_per_step=seconds / max(steps, 1),
                          tokens_per_second=tokens_seen[0] / seconds, peak_memory_mib=peak, memory_kind=kind,
                          trainable=int(counts["trainable"]), total=int(counts["total"]),
                          trainable_share_pct=counts["share_%"], output_dir=str(output_dir))
