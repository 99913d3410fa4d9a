"""Taking an adapter out of the notebook: load it for inference, merge it into its base, save, reload, check.

    model, tokenizer = load_for_inference("EleutherAI/pythia-70m-deduped", "outputs/.../adapter")
    files = merge_and_save("EleutherAI/pythia-70m-deduped", "outputs/.../adapter", "outputs/.../merged",
                           max_shard_size="200MB")
    max_logit_difference(reference_model, AutoModelForCausalLM.from_pretrained(merged), input_ids)

A merged folder is a plain transformers model (safetensors shards + index + config + tokenizer): it
loads without peft, in any tool that reads Hugging Face checkpoints. Taught in
notebooks/10_merge_and_export.ipynb.
"""
from __future__ import annotations

from pathlib import Path


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
    merged weights to 4 bits again (see lessons/10_merge_and_export.md).
    Taught in notebooks/10_merge_and_export.ipynb.
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
    Taught in notebooks/10_merge_and_export.ipynb.
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
