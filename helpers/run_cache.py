"""Train once, reuse everywhere: `train_or_load` trains a method once and later calls load the saved run.

    model, tokenizer, info = train_or_load("ptuning-v2", **comparison_arguments(SMOKE))

Infrastructure, not a lesson: notebook 06 uses it to compare the methods, notebook 11 to score the same runs
without training them again. Its public surface is `train_or_load`, `load_cached_run`, `cache_key`,
`cache_root`, `model_fingerprint` (which model files a run saw; notebook 13's adapter reuse checks it too) and the
comparison's settings (`comparison_arguments`, `comparison_steps`); the rest (the other fingerprints,
the atomic rename) is private. Taught in notebooks/06_comparing_methods.ipynb.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from .data import load_dataset
from .env import OUTPUT_ROOT, capped_steps, course_seed, environment_report
from .models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model
from .prompts import tokenize_dataset
from .tuning import DEFAULT_LR, METHODS, finetune, prepare_model, repair_prefix_generation

# Notebook 06 trains every method once; notebook 11 (BLEU/ROUGE) calls `train_or_load` with the same
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
# The comparison's optimizer steps: at test size (the smoke run) and at a learner's size. Notebook 06
# trains with these; 11 passes the same value to `train_or_load` and gets the same runs back.
# 120 at test size: at 60, Freeze and P-Tuning v2 sometimes still gave one answer to every question (a knife
# edge that fell differently on different CPUs); the sweep in lessons/06_comparing_methods.md is at 120.
COMPARISON_STEPS = {"smoke": 120, "learner": 300}
COMPARISON_SEED = 42


def comparison_steps(smoke: bool) -> int:
    """max_steps of the method comparison: COMPARISON_STEPS["smoke"] in the test run, else ["learner"].

    COURSE_MAX_STEPS caps it (helpers.env.capped_steps).

    Taught in notebooks/06_comparing_methods.ipynb; notebook 11 reuses its runs with it.
    """

    return capped_steps(COMPARISON_STEPS["smoke" if smoke else "learner"])


# The rest of the comparison's training settings, as notebook 06's configuration cell shows them.
COMPARISON = {"dataset": "promptcblue_ctc", "model_name": DEFAULT_MODEL, "batch_size": 8, "lora_r": 8,
              "pre_seq_len": 16, "num_trainable_layers": 2}


def comparison_arguments(smoke: bool) -> dict:
    """`train_or_load`'s arguments (besides the method) of notebook 06's comparison, once for every notebook that
    reuses its saved runs: the cache finds a run only when every argument is equal (notebook 11 passes these).

    The seed is COMPARISON_SEED unless COURSE_SEED says (helpers.env.course_seed), as in notebook 06.
    Taught in notebooks/06_comparing_methods.ipynb.
    """

    return {**COMPARISON, "max_steps": comparison_steps(smoke), "seed": course_seed(COMPARISON_SEED)}


def cache_root():
    """outputs/cache/: where `train_or_load` keeps its runs (ignored by git, like all of outputs/)."""

    return OUTPUT_ROOT / "cache"


def _digest(data: bytes) -> str:

    return hashlib.sha256(data).hexdigest()


def model_fingerprint(choice) -> dict:
    """What identifies the base model (a helpers.models.ModelChoice): its resolved location and, for a local folder
    of at most 512 MiB (the stand-in), the SHA-256 of its config and weights, so a rebuilt stand-in is a new key."""

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
                 "model": model_fingerprint(choice or resolve_model(model_name)), "lengths": lengths,
                 "arguments": arguments}
    key = _digest(json.dumps(described, sort_keys=True, default=str).encode())[:12]
    return f"{method}-{key}", described


def _load_split(dataset: str, split: str):
    return load_dataset(dataset, split=split)


def _tokenized_train_split(rows, tokenizer, max_source_length: int, max_target_length: int):
    """The training rows tokenized in their own format (read from their columns: helpers.data.format_of)."""
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

    Notebook 06 trains the comparison; 11 reuses it by passing the same arguments (comparison_arguments).
    Taught in notebooks/06_comparing_methods.ipynb.
    """

    lengths = {k: finetune_kwargs.get(k, default) for k, default in TRAIN_OR_LOAD_DEFAULTS.items()}

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

