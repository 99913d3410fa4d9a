"""Taking an adapter out of the notebook: load it for inference, merge it into its base, save, reload, check.

    model, tokenizer = load_for_inference("EleutherAI/pythia-70m-deduped", "outputs/.../adapter")
    files = merge_and_save("EleutherAI/pythia-70m-deduped", "outputs/.../adapter", "outputs/.../merged",
                           max_shard_size="200MB")
    max_logit_difference(reference_model, AutoModelForCausalLM.from_pretrained(merged), input_ids)

A merged folder is a plain transformers model (safetensors shards + index + config + tokenizer): it
loads without peft, in any tool that reads Hugging Face checkpoints. Taught in
notebooks/12_merge_and_export.ipynb.

`answer_losses` scores a model's answers given their prompts (notebook 12 compares adapter blends with it,
notebook 13 asks whether the chat history helps). `save_training_record` writes beside an adapter what trained
it, and `reuse_or_train_adapter` copies such an adapter instead of training an equal one again: notebook 13
reuses notebook 12's chat adapter this way, and still runs alone.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

TRAINING_RECORD = "training.json"  # beside a saved adapter: what trained it (save_training_record)


def _check_adapter(adapter) -> Path:
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved peft adapter (no adapter_config.json); save one with "
                                "`peft_model.save_pretrained(folder)`")
    return path


def is_quantized(model) -> bool:
    """True if any layer of `model` holds bitsandbytes 4-bit or 8-bit weights (after `dequantize()`: False)."""
    return any(type(module).__name__ in ("Linear4bit", "Linear8bitLt") for module in model.modules())


def load_for_inference(model_name: str, adapter: str | Path | None = None, *, quantization: str | None = None,
                       merge: bool = False, dtype=None, verbose: bool = True):
    """The base model (optionally 4-/8-bit) with a saved adapter on top, in eval mode, and its tokenizer.

    Without `merge` the adapter stays a separate branch (`PeftModel`): the base weights are untouched,
    which is what a quantized base needs. `merge=True` folds the adapter into 16/32-bit weights (faster,
    no peft at run time); merging into a quantized base is refused here, because it would round the
    merged weights to 4 bits again (see lessons/12_merge_and_export.md).
    Taught in notebooks/12_merge_and_export.ipynb.
    """
    from .models import load_model, load_tokenizer

    if merge and quantization:
        raise ValueError(f"merge=True with quantization={quantization!r} would re-quantize the merged weights; "
                         "merge into a 16/32-bit base (quantization=None) or keep the adapter separate (merge=False)")
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, quantization=quantization, dtype=dtype, verbose=verbose)
    if adapter is not None:
        from peft import PeftModel

        from .tuning import repair_prefix_generation

        model = repair_prefix_generation(PeftModel.from_pretrained(model, str(_check_adapter(adapter)),
                                                                   is_trainable=False))
        if merge:
            model = model.merge_and_unload()
        if verbose:
            print(f"  + adapter {adapter}" + (" (merged into the base)" if merge else " (kept separate)"))
    model.eval()
    return model, tokenizer


def merge_and_save(model_name: str, adapter: str | Path, output_dir: str | Path, *, max_shard_size="200MB",
                   dtype=None, base_model=None) -> list[Path]:
    """Merge `adapter` into its base (W + (alpha/r)·B·A) and save a plain safetensors checkpoint, sharded.

    `base_model` lets you pass the base weights to merge into (e.g. a dequantized 4-bit base for a
    QLoRA adapter); otherwise `model_name` is loaded unquantized in `dtype`. The tokenizer is saved
    beside the weights so the folder is self-contained. Returns the files written, sorted.
    Taught in notebooks/12_merge_and_export.ipynb.
    """
    from peft import PeftModel

    from .models import load_model, load_tokenizer

    adapter = _check_adapter(adapter)  # before loading a base that may take minutes
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base_model if base_model is not None else load_model(model_name, dtype=dtype, verbose=False)
    if is_quantized(base):
        raise ValueError("merge into a quantized base would round the merged weights again: pass an unquantized "
                         "base, e.g. `base.dequantize()` of the 4-bit model the QLoRA adapter was trained on")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    load_tokenizer(model_name).save_pretrained(out)
    return sorted(p for p in out.iterdir() if p.is_file())


def max_logit_difference(model_a, model_b, input_ids) -> float:
    """Largest absolute difference between two models' logits on the same token ids (eval, no grad)."""
    import torch

    with torch.no_grad():
        a = model_a.eval()(input_ids=input_ids).logits.float()
        b = model_b.eval()(input_ids=input_ids).logits.float()
    if a.shape != b.shape:
        raise ValueError(f"the models disagree on the logits' shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).abs().max().item()


def answer_losses(model, tokenizer, prompts_and_answers, batch_size=16):
    """Negative log-likelihood per token of each answer (and its </s>) given its prompt ids: one value per answer.

    `prompts_and_answers` is a list of (prompt token ids, answer text). Returns a 1-D tensor, in order.
    Taught in notebooks/12_merge_and_export.ipynb; notebook 13 uses it on chats with and without their history.
    """
    import torch
    import torch.nn.functional as F

    from helpers.prompts import IGNORE_INDEX, collator

    features = []
    for prompt_ids, answer in prompts_and_answers:
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        features.append({"input_ids": prompt_ids + answer_ids, "attention_mask": [1] * (len(prompt_ids) + len(answer_ids)),
                         "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids})
    losses = []
    for start in range(0, len(features), batch_size):
        batch = collator(tokenizer)(features[start:start + batch_size])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]  # position t predicts token t+1
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        losses += (nll.sum(1) / (labels != IGNORE_INDEX).sum(1)).tolist()
    return torch.tensor(losses)


def training_record(method: str, train_dataset, **finetune_arguments) -> dict:
    """What decides the adapter `finetune(method, train_dataset, **finetune_arguments)` trains, as plain JSON.

    The method and its arguments (`output_dir` aside: only where the Trainer writes), the base model's files, a
    hash of the tokenized rows (input_ids and labels), the libraries, and the arithmetic that rounds the numbers
    (CPU kernel path, threads, the GPU): two equal records train the same adapter.
    Taught in notebooks/12_merge_and_export.ipynb.
    """
    import hashlib
    import importlib.metadata
    import os

    import torch

    from .models import DEFAULT_MODEL, resolve_model
    from .run_cache import model_fingerprint

    arguments = {key: value for key, value in finetune_arguments.items() if key != "output_dir"}
    rows = json.dumps([list(train_dataset[column]) for column in ("input_ids", "labels")], separators=(",", ":"))
    record = {
        "method": method, "arguments": arguments,
        "model": model_fingerprint(resolve_model(arguments.get("model_name", DEFAULT_MODEL))),
        "rows": {"count": len(train_dataset), "sha256": hashlib.sha256(rows.encode()).hexdigest()},
        "libraries": {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft")},
        "arithmetic": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                       **{name: os.environ.get(name) for name in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}},
    }
    return json.loads(json.dumps(record, default=str))  # plain JSON: what training.json holds, compared as read


def save_training_record(folder, result, train_dataset, **finetune_arguments) -> Path:
    """Write training.json into the adapter folder `folder`: the `training_record` of the run that trained it
    (`result`, finetune's FinetuneResult, with the arguments passed to finetune) and what the run measured
    (losses, steps, seconds). Returns the file. Taught in notebooks/12_merge_and_export.ipynb.
    """
    _check_adapter(folder)
    record = {"trained": training_record(result.method, train_dataset, **finetune_arguments),
              "run": {"losses": result.losses, "steps": result.steps, "seconds": result.seconds}}
    path = Path(folder) / TRAINING_RECORD
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return path


def reuse_or_train_adapter(folder, method: str, train_dataset, *, reuse=None, **finetune_arguments) -> dict:
    """The adapter `finetune(method, train_dataset, **finetune_arguments)` trains, saved in `folder` with its
    training.json; when the adapter folder `reuse` holds one whose record is equal, a copy of that one instead.

    Returns what training.json says (the record and the run's losses, steps and seconds) with "reused_from": the
    folder copied, or None when the adapter was trained here (no `reuse`, no record there, or a different one: other
    arguments, data, base model, libraries or arithmetic). Taught in notebooks/13_chat_and_api.ipynb, which reuses
    notebook 12's chat adapter this way and trains it itself when opened first.
    """
    from .tuning import finetune

    folder, wanted = Path(folder), training_record(method, train_dataset, **finetune_arguments)
    if reuse is not None:
        try:
            saved = json.loads((Path(reuse) / TRAINING_RECORD).read_text())
            if saved.get("trained") == wanted:
                shutil.copytree(_check_adapter(reuse), folder, dirs_exist_ok=True)
                return {**saved, "reused_from": str(reuse)}
        except (OSError, ValueError):  # no record, or one being rewritten: train instead
            pass
    result = finetune(method, train_dataset, **finetune_arguments)
    result.model.save_pretrained(folder)
    saved = json.loads(save_training_record(folder, result, train_dataset, **finetune_arguments).read_text())
    return {**saved, "reused_from": None}
