"""One function that fine-tunes the base model with any of the course's methods, from the same arguments,
and a cache so that later notebooks reuse the same runs instead of training again.

    result = finetune("lora", train_set, output_dir=out, max_steps=60)
    model, tokenizer, info = train_or_load("ptuning-v2", max_steps=comparison_steps(SMOKE), seed=42)

Methods: "lora" (notebooks/01_lora_basics.ipynb), "qlora" (notebooks/02_qlora.ipynb), and
"ptuning-v2", "freeze", "full" (notebooks/03_ptuning_and_methods.ipynb), which compares all of them and
teaches `train_or_load`; notebook 06 reuses its runs. The 🤗 Trainer does the loop; this module
only prepares the model, measures the run and keeps it.
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
    # 5e-3 13-24%. At 120 steps, 1e-2 is swept in lessons/03_ptuning_and_methods.md.
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
    so is everything once peft passes the prefix as `cache` itself. Notebook 03 checks that `generate`
    scores the first new token exactly as `forward` does.
    Taught in notebooks/03_ptuning_and_methods.ipynb.
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
    step pays some one-off costs, so the estimate errs long. Taught in notebooks/01_lora_basics.ipynb.
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
    bf16=, ddp_find_unused_parameters=, ...). Taught in notebooks/01_lora_basics.ipynb.
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
        quiet=quiet, max_grad_norm=max_grad_norm)  # the QLoRA paper clips at 0.3 (notebooks/02_qlora.ipynb)
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


# --- Training once, reusing everywhere (taught in notebooks/03_ptuning_and_methods.ipynb) ----------
# Notebook 03 trains every method once; notebook 06 (BLEU/ROUGE) calls `train_or_load` with the same
# arguments (comparison_arguments) and gets the same runs back from outputs/cache/.
CACHE_VERSION = 1  # bump when a change to the training code makes older cached runs stale
TRAIN_OR_LOAD_DEFAULTS = {
    # promptcblue_ctc prompts are 60-110 tokens with the course tokenizer; 256 leaves room for other
    # datasets. A longer prompt is an error, never silently cut (helpers.prompts.tokenize_prompt_response).
    "max_source_length": 256,
    # the longest label ("治疗或手术") is a few tokens; 16 includes EOS with room to spare
    "max_target_length": 16,
}
ADAPTER_METHODS = ("lora", "qlora", "ptuning-v2")  # saved as peft adapters; freeze/full as whole models
_NOT_CACHE_ARGUMENTS = {"output_dir", "model", "tokenizer", "resume_from_checkpoint"}
# The comparison's optimizer steps: at test size (the smoke run) and at a learner's size. Notebook 03
# trains with these; 06 passes the same value to `train_or_load` and gets the same runs back.
# 120 at test size: at 60, Freeze and P-Tuning v2 sometimes still gave one answer to every question (a knife
# edge that fell differently on different CPUs); the sweep in lessons/03_ptuning_and_methods.md is at 120.
COMPARISON_STEPS = {"smoke": 120, "learner": 300}
COMPARISON_SEED = 42


def comparison_steps(smoke: bool) -> int:
    """max_steps of the method comparison: COMPARISON_STEPS["smoke"] in the test run, else ["learner"].

    COURSE_MAX_STEPS caps it (helpers.env.capped_steps).

    Taught in notebooks/03_ptuning_and_methods.ipynb; notebook 06 reuses its runs with it.
    """
    from .env import capped_steps

    return capped_steps(COMPARISON_STEPS["smoke" if smoke else "learner"])


# The rest of the comparison's training settings, as notebook 03's configuration cell shows them.
COMPARISON = {"dataset": "promptcblue_ctc", "model_name": DEFAULT_MODEL, "batch_size": 8, "lora_r": 8,
              "pre_seq_len": 16, "num_trainable_layers": 2}


def comparison_arguments(smoke: bool) -> dict:
    """`train_or_load`'s arguments (besides the method) of notebook 03's comparison, once for every notebook that
    reuses its saved runs: the cache finds a run only when every argument is equal (notebook 06 passes these).

    The seed is COMPARISON_SEED unless COURSE_SEED says (helpers.env.course_seed), as in notebook 03.
    Taught in notebooks/03_ptuning_and_methods.ipynb.
    """
    from .env import course_seed

    return {**COMPARISON, "max_steps": comparison_steps(smoke), "seed": course_seed(COMPARISON_SEED)}


def cache_root():
    """outputs/cache/: where `train_or_load` keeps its runs (ignored by git, like all of outputs/)."""
    from .env import OUTPUT_ROOT

    return OUTPUT_ROOT / "cache"


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _model_fingerprint(choice) -> dict:
    """What identifies the base model (a helpers.models.ModelChoice): its resolved location and, for a local folder
    of at most 512 MiB (the stand-in), the SHA-256 of its config and weights, so a rebuilt stand-in is a new key."""
    from pathlib import Path

    fingerprint = {"requested": choice.requested, "path": choice.path, "standin": choice.standin}
    folder = Path(choice.path)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file())
        if sum(p.stat().st_size for p in files) <= 512 * 2**20:
            fingerprint["files"] = {p.name: _digest(p.read_bytes())[:16] for p in files}
        else:
            fingerprint["files"] = {p.name: p.stat().st_size for p in files}
    if choice.standin:  # the absolute path differs between machines; the content is what matters
        fingerprint["path"] = "stand-in"
    return fingerprint


def _effective_arguments(method: str, max_steps: int, seed: int, finetune_kwargs: dict) -> dict:
    """Every argument that shapes a run: finetune's and prepare_model's defaults, overridden by the
    caller's, with the method's default learning rate filled in (so editing a default makes a new key)."""
    import inspect

    skip = {"self", "method", "train_dataset", "model", "tokenizer", "output_dir", "resume_from_checkpoint",
            "quiet", "method_kwargs", "gradient_checkpointing"}
    arguments = {}
    for fn in (prepare_model, finetune):
        for name, parameter in inspect.signature(fn).parameters.items():
            if name not in skip and parameter.default is not inspect.Parameter.empty:
                arguments[name] = parameter.default
    arguments["gradient_checkpointing"] = False
    unknown = set(finetune_kwargs) - set(arguments) - {"quiet"}
    if unknown:
        raise ValueError(f"train_or_load got unknown arguments {sorted(unknown)}; it accepts those of finetune "
                         f"and prepare_model: {sorted(arguments)}")
    arguments.update({k: v for k, v in finetune_kwargs.items() if k != "quiet"})
    arguments.update(max_steps=max_steps, seed=seed)
    if arguments.get("learning_rate") is None:
        arguments["learning_rate"] = DEFAULT_LR[method]
    return arguments


def cache_key(method: str, *, dataset: str = "promptcblue_ctc", max_steps: int = 60, seed: int = 42,
              **finetune_kwargs) -> tuple[str, dict]:
    """The folder name `train_or_load` uses, `<method>-<12 hex digits>`, and what was hashed.

    The hash covers the method, the dataset's training rows, the base model's files, the tokenization
    lengths and every effective training argument (defaults included), and CACHE_VERSION.
    """
    return _cache_key(method, _load_split(dataset, "train"), dataset=dataset, max_steps=max_steps, seed=seed,
                      **finetune_kwargs)


def _cache_key(method: str, rows, *, dataset: str, max_steps: int, seed: int, choice=None,
               **finetune_kwargs) -> tuple[str, dict]:
    """cache_key of the training rows already loaded and the model already resolved (train_or_load does each once,
    for the key and to train)."""
    import json

    from .models import resolve_model

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    passed = _NOT_CACHE_ARGUMENTS & set(finetune_kwargs)
    if passed:
        raise ValueError(f"train_or_load chooses {sorted(passed)} itself (it loads the base model and writes "
                         "to outputs/cache/); call finetune directly to pass them")
    lengths = {k: finetune_kwargs.pop(k, default) for k, default in TRAIN_OR_LOAD_DEFAULTS.items()}
    model_name = finetune_kwargs.get("model_name", DEFAULT_MODEL)
    arguments = _effective_arguments(method, max_steps, seed, finetune_kwargs)
    described = {"version": CACHE_VERSION, "method": method, "dataset": dataset,
                 "dataset_sha256": _digest(json.dumps(rows.to_list(), ensure_ascii=False, sort_keys=True).encode())[:16],
                 "model": _model_fingerprint(choice or resolve_model(model_name)), "lengths": lengths,
                 "arguments": arguments}
    key = _digest(json.dumps(described, sort_keys=True, default=str).encode())[:12]
    return f"{method}-{key}", described


def _load_split(dataset: str, split: str):
    from .data import load_dataset

    return load_dataset(dataset, split=split)


def _tokenized_train_split(rows, tokenizer, max_source_length: int, max_target_length: int):
    """The training rows tokenized in their own format (read from their columns: helpers.data.format_of)."""
    from .prompts import tokenize_dataset

    from datasets.utils import logging as datasets_logging

    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # no "tokenizing" bar in the middle of a notebook's table
    try:
        return tokenize_dataset(rows, tokenizer, max_source_length=max_source_length,
                                max_target_length=max_target_length)
    finally:
        if shown:
            datasets_logging.enable_progress_bar()


def _is_complete(folder) -> bool:
    """A cached run is complete when info.json is there and names weights that exist."""
    import json

    info_file = folder / "info.json"
    if not info_file.is_file():
        return False
    try:
        info = json.loads(info_file.read_text())
    except ValueError:
        return False
    return bool(info.get("weights")) and all((folder / name).is_file() for name in info["weights"])


def load_cached_run(folder, *, verbose: bool = False, choice=None):
    """Load a run that `train_or_load` saved: (model, tokenizer, info). Adapters are put back on their
    base model (4-bit NF4 for qlora); freeze/full runs are whole models. The model is in eval mode.
    `choice`: the base model already resolved (helpers.models.ModelChoice), else its name in info.json is."""
    import json
    from pathlib import Path

    from .models import load_model

    folder = Path(folder)
    if not _is_complete(folder):
        raise FileNotFoundError(f"{folder} is not a complete train_or_load run (no info.json, or weights missing)")
    info = json.loads((folder / "info.json").read_text())
    method, model_name = info["method"], info["arguments"]["model_name"]
    if choice is not None and choice.requested == model_name:
        model_name = choice
    tokenizer = load_tokenizer(model_name)
    if method in ADAPTER_METHODS:
        from peft import PeftModel

        base = load_model(model_name, quantization="nf4" if method == "qlora" else None, verbose=verbose)
        model = repair_prefix_generation(PeftModel.from_pretrained(base, str(folder / "model")))
    else:
        model = load_model(str(folder / "model"), verbose=verbose)
    model.eval()
    return model, tokenizer, info


def train_or_load(method: str, *, dataset: str = "promptcblue_ctc", max_steps: int = 60, seed: int = 42,
                  retrain: bool = False, verbose: bool = False, **finetune_kwargs):
    """Train `method` on `dataset`'s train split once; afterwards load the saved run instead.

    Returns (model, tokenizer, info). Arguments:
      method       "lora", "qlora", "ptuning-v2", "freeze" or "full" (see METHODS).
      dataset      a name from data/dataset_info.json; its "train" split is tokenized with
                   helpers.prompts.tokenize_dataset (loss on the response only).
      max_steps    optimizer steps (the same for every method in a comparison).
      seed         seeds the model's new weights, the data order and dropout.
      retrain      True: train again even if a saved run exists (and replace it).
      verbose      print what is loaded (load_model's line) and whether the cache was used.
      max_source_length (default 256), max_target_length (default 16): token limits of
                   tokenize_prompt_response; a longer prompt is an error, a longer response is cut.
      **finetune_kwargs  any other argument of `finetune` (model_name, batch_size, learning_rate,
                   gradient_accumulation_steps, logging_steps, optim, group_by_length, ...) or of
                   `prepare_model` (lora_r, lora_alpha, lora_dropout, target_modules, pre_seq_len,
                   prefix_projection, prefix_hidden_size, num_trainable_layers). Not accepted:
                   output_dir, model, tokenizer, resume_from_checkpoint (call finetune for those).

    The run is saved in outputs/cache/<method>-<hash of all effective arguments, the data and the base
    model's files>/ : model/ (a peft adapter for lora, qlora and ptuning-v2; the whole model and its
    tokenizer for freeze and full; safetensors only) and info.json (the arguments and the measurements
    of finetune: losses, seconds per step, tokens per second, peak memory, trainable share, plus the
    machine they were measured on). It is written to a temporary folder and renamed at the end, so a
    half-written run is never taken for a finished one. The model returned is always the one loaded
    back from that folder, so a fresh run and a cached one behave the same. info["from_cache"] says
    which happened; info["path"] where it lives.

    Notebook 03 trains the comparison; 06 reuses it by passing the same arguments (comparison_arguments).
    Taught in notebooks/03_ptuning_and_methods.ipynb.
    """
    import json
    import os
    import shutil
    import uuid
    from datetime import datetime, timezone

    lengths = {k: finetune_kwargs.get(k, default) for k, default in TRAIN_OR_LOAD_DEFAULTS.items()}
    from .models import resolve_model

    rows = _load_split(dataset, "train")  # loaded once: for the key and to train
    choice = resolve_model(finetune_kwargs.get("model_name", DEFAULT_MODEL))  # resolved once for every load below
    name, described = _cache_key(method, rows, dataset=dataset, max_steps=max_steps, seed=seed, choice=choice,
                                 **finetune_kwargs)
    folder = cache_root() / name
    if folder.exists() and not retrain and _is_complete(folder):
        model, tokenizer, info = load_cached_run(folder, verbose=verbose, choice=choice)
        info.update(from_cache=True, path=str(folder))
        if verbose:
            print(f"{method}: loaded the saved run {folder.name} (trained {info['created']})")
        return model, tokenizer, info

    train_kwargs = {k: v for k, v in finetune_kwargs.items() if k not in TRAIN_OR_LOAD_DEFAULTS}
    quiet = train_kwargs.pop("quiet", not verbose)
    train_kwargs["model_name"] = choice
    tokenizer = load_tokenizer(choice)
    train_set = _tokenized_train_split(rows, tokenizer, **lengths)
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = cache_root() / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        result = finetune(method, train_set, output_dir=tmp / "trainer", max_steps=max_steps, seed=seed,
                          tokenizer=tokenizer, quiet=quiet, **train_kwargs)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        result.model.save_pretrained(str(tmp / "model"))  # safetensors (peft and transformers 5 default)
        if method not in ADAPTER_METHODS:
            tokenizer.save_pretrained(str(tmp / "model"))
        weights = sorted(str(p.relative_to(tmp)) for p in (tmp / "model").glob("*.safetensors"))
        if not weights or any((tmp / "model").glob("*.bin")):
            raise RuntimeError(f"saving {method} did not produce safetensors only: {sorted(os.listdir(tmp / 'model'))}")
        from .env import environment_report

        report = environment_report(show=False)
        info = {"method": method, "dataset": dataset, "name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "arguments": described["arguments"], "lengths": described["lengths"], "key": described,
                "train_rows": len(train_set), "weights": weights, "row": result.row(), "losses": result.losses,
                "steps": result.steps, "seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
                "tokens_per_second": result.tokens_per_second, "peak_memory_mib": result.peak_memory_mib,
                "memory_kind": result.memory_kind, "trainable": result.trainable, "total": result.total,
                "trainable_share_pct": result.trainable_share_pct,
                "measured_on": {k: report[k] for k in ("platform", "device", "torch", "transformers", "peft")}}
        (tmp / "info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False, default=str) + "\n")
        del result
        if folder.exists():  # retrain=True, or an incomplete folder from an older crash
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same run first: keep theirs
            if not _is_complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model, tokenizer, info = load_cached_run(folder, verbose=verbose, choice=choice)
    info.update(from_cache=False, path=str(folder))
    if verbose:
        print(f"{method}: trained {info['steps']} steps in {info['seconds']:.1f} s and saved {folder.name}")
    return model, tokenizer, info

