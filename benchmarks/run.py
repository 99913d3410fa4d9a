"""Speed and memory of the course's recipes on this machine, next to the memory model's prediction.

    python -m benchmarks.run --quick          # about a minute on 2 CPU cores (notebook 14 runs this)
    python -m benchmarks.run --quick --methods lora,qlora --skip-techniques   # a few seconds (the test)
    python -m benchmarks.run                  # longer runs, steadier numbers
    python benchmarks/run.py --out results.json

Measures, in one process and on the same data, with helpers.tuning.finetune:
  methods     full fine-tuning, LoRA, QLoRA, P-Tuning v2: tokens/s and peak memory growth during
              training (process RSS on a CPU, the CUDA allocator on a GPU), beside
              helpers.memory.estimate_memory's prediction for the same batch
  techniques  dynamic padding (+ length grouping) versus padding to max_source + max_target length;
              packing versus dynamic padding; gradient checkpointing's memory saved and time paid
Prints the tables and writes them as JSON (default outputs/benchmarks/results.json).
Taught in notebooks/14_speed_and_memory.ipynb; the formulas are in lessons/14_speed_and_memory.md.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.batching import pack, pad_to_length, padding_fraction  # noqa: E402

# quick: what the test runs; full: longer runs for steadier figures (same data, same model)
SIZES = {
    "quick": dict(seq_len=128, batch_size=8, steps=4, technique_steps=6),
    "full": dict(seq_len=256, batch_size=8, steps=20, technique_steps=30),
}
DATASET = "promptcblue_ctc"
# Fixed lengths as a training kit's flags set them: round numbers above the longest example of the data with the
# tokenizer that loads (notebook 02 measures them): 128 and 8 with the stand-in, 192 and 16 with Pythia's tokenizer.
LENGTH_STEPS = {"max_source_length": 64, "max_target_length": 8}


def fixed_lengths(tokenizer, dataset) -> dict[str, int]:
    """max_source_length and max_target_length rounded up to LENGTH_STEPS from the data's longest prompt and label."""
    from helpers.prompts import lengths_from_data

    measured = lengths_from_data(tokenizer, dataset)
    return {key: -(-measured[key] // step) * step for key, step in LENGTH_STEPS.items()}


PACK_BLOCK, PACK_BATCH = 256, 2                # about 8 examples a step, like a padded batch of 8
METHODS = ("full", "lora", "qlora", "ptuning-v2")
PREFIX = dict(pre_seq_len=16, prefix_projection=True)  # helpers.tuning's P-Tuning v2 defaults


def return_freed_memory_to_os() -> bool:
    """Make glibc give freed blocks above 256 KiB back to the OS at once, so that RSS follows live memory.

    By default glibc raises its mmap threshold after large frees and keeps freed memory for reuse:
    a second training run in the same process would then show almost no RSS growth. Returns False
    where this is not glibc (the measurement still runs, but reads low after the first run).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 256 * 1024)) and bool(libc.mallopt(m_trim_threshold, 256 * 1024))


def _finetune(method, dataset, out, model_name, steps, batch_size, **kwargs):
    """helpers.tuning.finetune with the Trainer's per-step log lines kept out of the table."""
    from helpers.tuning import finetune

    with contextlib.redirect_stdout(io.StringIO()):
        result = finetune(method, dataset, output_dir=out, model_name=model_name, max_steps=steps,
                          batch_size=batch_size, logging_steps=max(1, steps // 2), **kwargs)
    row = {"tokens_per_s": result.tokens_per_second, "s_per_step": result.seconds_per_step,
           "peak_mib": result.peak_memory_mib, "memory_kind": result.memory_kind,
           "trainable": result.trainable, "total": result.total, "first_loss": result.losses[0],
           "last_loss": result.losses[-1]}
    del result
    gc.collect()
    return row


def _predicted_mib(config, method, batch_size, seq_len, memory_kind, **kwargs) -> tuple[float, dict]:
    """The memory model's figure for what `finetune` measures.

    On a CPU finetune measures RSS growth during training: the weights and adapters were loaded
    before, so the prediction is gradients + optimizer states + activations. On a GPU it measures
    everything the allocator holds, so the prediction is the total.
    """
    from helpers.memory import estimate_memory

    est = estimate_memory(config, weights="nf4-dq" if method == "qlora" else "fp32", compute_dtype="fp32",
                          method=method, batch_size=batch_size, seq_len=seq_len, lora_r=8, lora_dropout=0.05,
                          **(PREFIX if method == "ptuning-v2" else {}), **kwargs)
    c = est.components
    nbytes = est.total if memory_kind == "cuda" else c["gradients"] + c["optimizer"] + c["activations"]
    return nbytes / 2**20, {k: round(v / 2**20, 2) for k, v in c.items()}


def run(quick: bool = True, model_name: str | None = None, out_dir: Path | None = None, seed: int = 42,
        methods: tuple[str, ...] = METHODS, techniques: bool = True) -> dict:
    """Run the measurements; returns the results as a dict (what --out writes).

    `methods` picks a subset of METHODS; techniques=False skips the batching and gradient-checkpointing
    runs (their lists are then empty). Both exist so that a test can exercise the script cheaply.
    """
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}; got {', '.join(methods) or 'none'}")
    import tempfile

    import transformers

    from helpers.data import load_dataset
    from helpers.env import environment_report
    from helpers.models import DEFAULT_MODEL, load_tokenizer, resolve_model
    from helpers.prompts import tokenize_dataset

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, once per run
    size = SIZES["quick" if quick else "full"]
    model_name = model_name or DEFAULT_MODEL
    returns_memory = return_freed_memory_to_os()
    choice = resolve_model(model_name)
    config = transformers.AutoConfig.from_pretrained(choice.path)
    tokenizer = load_tokenizer(model_name)
    pad = tokenizer.pad_token_id
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars of datasets.map
        raw = load_dataset(DATASET, split="train")
        fixed_to = fixed_lengths(tokenizer, raw)
        max_source, max_target = fixed_to["max_source_length"], fixed_to["max_target_length"]
        examples = tokenize_dataset(raw, tokenizer, max_source_length=max_source, max_target_length=max_target)
        blocks = pack(examples, size["seq_len"], pad, seed=seed)          # equal-length rows for the methods
        fixed = pad_to_length(examples, max_source + max_target, pad)
        packed = pack(examples, PACK_BLOCK, pad, seed=seed)
    work = Path(out_dir or tempfile.mkdtemp(prefix="bench-"))
    b, s, steps, tsteps = size["batch_size"], size["seq_len"], size["steps"], size["technique_steps"]

    # One short run first: imports, thread pools and caches are paid here, not in the first measurement.
    _finetune("lora", blocks, work / "warmup", model_name, 2, b, seed=seed)

    method_rows = []
    for method in methods:
        row = _finetune(method, blocks, work / method, model_name, steps, b, seed=seed)
        predicted, components = _predicted_mib(config, method, b, s, row["memory_kind"])
        method_rows.append({"method": method, **row, "predicted_mib": predicted,
                            "predicted_over_measured": predicted / row["peak_mib"],
                            "predicted_components_mib": components})
    lengths = [len(ids) for ids in examples["input_ids"]]
    common = {
        "quick": quick, "model": str(choice), "dataset": DATASET, "seed": seed,
        "settings": dict(size, max_source_length=max_source, max_target_length=max_target,
                         pack_block=PACK_BLOCK, pack_batch=PACK_BATCH, lora_r=8, lora_dropout=0.05, **PREFIX),
        "rss_follows_frees": returns_memory, "environment": environment_report(show=False),
        "machine": platform.machine(), "methods": method_rows,
        "example_lengths": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)},
    }
    if not techniques:
        return dict(common, gradient_checkpointing=None, batching=[], techniques=[])
    lora = next((m for m in method_rows if m["method"] == "lora"), None)
    if lora is None:
        raise ValueError("the techniques compare against the LoRA run: include lora in methods or skip the techniques")
    ckpt = _finetune("lora", blocks, work / "lora-gc", model_name, steps, b, seed=seed, gradient_checkpointing=True)
    ckpt_predicted, _ = _predicted_mib(config, "lora", b, s, ckpt["memory_kind"], gradient_checkpointing=True)

    runs = {
        "fixed": _finetune("lora", fixed, work / "fixed", model_name, tsteps, b, seed=seed),
        "dynamic": _finetune("lora", examples, work / "dynamic", model_name, tsteps, b, seed=seed),
        "grouped": _finetune("lora", examples, work / "grouped", model_name, tsteps, b, seed=seed,
                             group_by_length=True),
        "packed": _finetune("lora", packed, work / "packed", model_name, tsteps, PACK_BATCH, seed=seed),
    }
    pad_share = {
        "fixed": padding_fraction(lengths, b, "fixed", pad_to=max_source + max_target),
        "dynamic": padding_fraction(lengths, b, "dynamic", seed=seed),
        "grouped": padding_fraction(lengths, b, "grouped", seed=seed),
        "packed": 1 - sum(lengths) / (PACK_BLOCK * len(packed)),
    }
    batching = [{"batching": name, "padding_share": pad_share[name], **runs[name]} for name in runs]
    technique_rows = [
        {"technique": "dynamic padding + length grouping vs padding to max_source+max_target",
         "metric": "tokens/s", "baseline": runs["fixed"]["tokens_per_s"], "variant": runs["grouped"]["tokens_per_s"]},
        {"technique": "dynamic padding (no grouping) vs padding to max_source+max_target",
         "metric": "tokens/s", "baseline": runs["fixed"]["tokens_per_s"], "variant": runs["dynamic"]["tokens_per_s"]},
        {"technique": "packing vs dynamic padding + length grouping",
         "metric": "tokens/s", "baseline": runs["grouped"]["tokens_per_s"], "variant": runs["packed"]["tokens_per_s"]},
        {"technique": "gradient checkpointing: peak memory",
         "metric": f"peak MiB ({lora['memory_kind']})", "baseline": lora["peak_mib"], "variant": ckpt["peak_mib"],
         "predicted_ratio": ckpt_predicted / lora["predicted_mib"]},
        {"technique": "gradient checkpointing: time per step",
         "metric": "s/step", "baseline": lora["s_per_step"], "variant": ckpt["s_per_step"]},
    ]
    for t in technique_rows:
        t["ratio"] = t["variant"] / t["baseline"]
    return dict(common, gradient_checkpointing=ckpt, batching=batching, techniques=technique_rows)


TABLES = ("methods", "batching", "techniques")


def tables(results: dict):
    """The results as three pandas DataFrames: methods, batching, techniques."""
    import pandas as pd

    kind = results["methods"][0]["memory_kind"]
    methods = pd.DataFrame([{"method": m["method"], "trainable": m["trainable"], "tokens/s": round(m["tokens_per_s"]),
                             "s/step": round(m["s_per_step"], 3), f"measured MiB ({kind})": round(m["peak_mib"], 1),
                             "predicted MiB": round(m["predicted_mib"], 1),
                             "predicted/measured": round(m["predicted_over_measured"], 2)} for m in results["methods"]])
    batching = pd.DataFrame([{"batching": r["batching"], "padding %": round(100 * r["padding_share"], 1),
                              "tokens/s": round(r["tokens_per_s"]), "s/step": round(r["s_per_step"], 3),
                              "last loss": round(r["last_loss"], 3)} for r in results["batching"]])
    techniques = pd.DataFrame([{"technique": t["technique"], "metric": t["metric"], "baseline": round(t["baseline"], 2),
                                "variant": round(t["variant"], 2), "ratio": round(t["ratio"], 2)}
                               for t in results["techniques"]])
    return methods, batching, techniques


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (what the test and the notebook's smoke run use)")
    parser.add_argument("--model", default=None, help="model name or folder (default: the course's base model)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (default outputs/benchmarks/results.json)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the data order and the adapters' initialisation")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--skip-techniques", action="store_true",
                        help="skip the batching and gradient-checkpointing runs (they need lora in --methods)")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods must be a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}")
    if not args.skip_techniques and "lora" not in methods:
        parser.error("the techniques compare against the LoRA run: add lora to --methods or pass --skip-techniques")

    import pandas as pd

    from helpers.env import output_dir

    out = args.out or output_dir("benchmarks") / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run(quick=args.quick, model_name=args.model, out_dir=out.parent / "runs", seed=args.seed,
                  methods=methods, techniques=not args.skip_techniques)
    results["seconds"] = time.perf_counter() - started
    frames = tables(results)
    # the tables as rows too, so that a reader of the JSON (notebook 14) shows them without importing this script
    results["tables"] = {name: frame.to_dict(orient="records") for name, frame in zip(TABLES, frames)}
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str))
    with pd.option_context("display.width", 200, "display.max_colwidth", 80):
        for title, frame in zip(("Methods", "Batching", "Techniques (ratio = variant / baseline)"), frames):
            if frame.empty:
                continue
            print(f"\n{title}\n{frame.to_string(index=False)}")
    print(f"\n{results['seconds']:.0f} s; wrote {out}")
    return results


if __name__ == "__main__":
    main()
