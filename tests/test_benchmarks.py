"""benchmarks/: the batching helpers (exact values), `python -m benchmarks.run --quick`, and the GPU script's CPU skip."""
import json
import os
import subprocess
import sys

import pytest

from helpers.env import REPO_ROOT
from helpers.prompts import IGNORE_INDEX


def _tokenized(lengths):
    from datasets import Dataset

    rows = [{"input_ids": [10 + i] * n, "attention_mask": [1] * n, "labels": [IGNORE_INDEX] + [10 + i] * (n - 1)}
            for i, n in enumerate(lengths)]
    return Dataset.from_list(rows)


def test_pad_to_length():
    from benchmarks.batching import pad_to_length

    padded = pad_to_length(_tokenized([2, 3]), 5, pad_token_id=1)
    assert padded[0] == {"input_ids": [10, 10, 1, 1, 1], "attention_mask": [1, 1, 0, 0, 0],
                         "labels": [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]}
    with pytest.raises(ValueError, match="more than length=2"):
        pad_to_length(_tokenized([2, 3]), 2, pad_token_id=1)


def test_pack_keeps_examples_whole_and_their_labels():
    from benchmarks.batching import pack

    data = _tokenized([3, 4, 2, 5, 1])  # 15 tokens
    packed = pack(data, 6, pad_token_id=1, seed=0)
    assert all(len(row["input_ids"]) == 6 for row in packed)
    assert sum(sum(row["attention_mask"]) for row in packed) == 15
    assert len(packed) == 3  # 15 tokens need at least 3 blocks of 6; first fit finds 3
    # every example appears once, whole: its token repeated exactly its length
    tokens = [t for row in packed for t, m in zip(row["input_ids"], row["attention_mask"]) if m]
    assert sorted(tokens) == sorted(t for row in data for t in row["input_ids"])
    assert sum(label != IGNORE_INDEX for row in packed for label in row["labels"]) == 15 - 5  # one masked each
    with pytest.raises(ValueError, match="longer than block_size=4"):
        pack(data, 4, pad_token_id=1)


def test_padding_fraction():
    from benchmarks.batching import padding_fraction

    lengths = [2, 4, 2, 4]
    assert padding_fraction(lengths, 2, "fixed", pad_to=8) == 1 - 12 / 32
    assert padding_fraction(lengths, 4, "dynamic") == 1 - 12 / 16  # one batch, padded to 4
    assert padding_fraction([3, 3, 3, 3], 2, "dynamic") == padding_fraction([3, 3, 3, 3], 2, "grouped") == 0.0
    spread = [(7 * i) % 97 + 1 for i in range(400)]  # lengths 1..97
    assert padding_fraction(spread, 4, "grouped") < padding_fraction(spread, 4, "dynamic") / 5
    with pytest.raises(ValueError, match="how must be"):
        padding_fraction(lengths, 2, "sorted")


def test_quick_benchmark_prints_and_writes_json(tmp_path):
    # Notebook 14 runs the whole `--quick` benchmark and checks its batching and checkpointing
    # ratios; here the command line, the JSON and the memory model's band are checked on two methods.
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--methods", "lora,qlora",
                           "--skip-techniques", "--out", str(out)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Methods" in done.stdout and "Batching" not in done.stdout and "Techniques" not in done.stdout
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert [m["method"] for m in results["methods"]] == ["lora", "qlora"]
    assert results["batching"] == results["techniques"] == [] and results["gradient_checkpointing"] is None
    for m in results["methods"]:
        assert m["tokens_per_s"] > 0 and m["peak_mib"] > 0
        # the band notebook 14 checks on the full quick run; a model that drifts past it is wrong
        assert 0.7 < m["predicted_over_measured"] < 1.4, m
    # LoRA r=8 on every linear layer trains a few percent of the model (notebook 14 prints the share; QLoRA's total
    # counts its 4-bit weights as bitsandbytes packs them, two to an element, so only LoRA's is a model's count)
    lora = next(m for m in results["methods"] if m["method"] == "lora")
    assert 20 * lora["trainable"] < lora["total"], lora


@pytest.mark.parametrize("seed", [42, 1, 2, 3, 4, 5])  # notebook 14's seed, and the robustness sweep's
def test_padding_shares_of_the_course_data(seed):
    # Notebook 14's batching table, from the data alone (what benchmarks/run.py computes beside its timed runs):
    # padding to max_source + max_target wastes a third of the positions, grouping by length almost none.
    from benchmarks.batching import padding_fraction
    from benchmarks.run import SIZES, fixed_lengths
    from helpers.data import load_dataset
    from helpers.models import load_tokenizer
    from helpers.prompts import tokenize_dataset

    tokenizer, raw = load_tokenizer(), load_dataset("promptcblue_ctc", split="train")
    fixed_to = fixed_lengths(tokenizer, raw)
    lengths = [len(ids) for ids in tokenize_dataset(raw, tokenizer, **fixed_to)["input_ids"]]
    b = SIZES["quick"]["batch_size"]
    fixed = padding_fraction(lengths, b, "fixed", pad_to=sum(fixed_to.values()))
    dynamic = padding_fraction(lengths, b, "dynamic", seed=seed)
    grouped = padding_fraction(lengths, b, "grouped", seed=seed)
    assert fixed > 0.30 and grouped < 0.03 and fixed > dynamic > grouped, (fixed, dynamic, grouped)

@pytest.mark.parametrize("argv, message", [
    (["--methods", "lora,adapter"], "--methods must be a comma-separated subset of full,lora,qlora,ptuning-v2"),
    (["--methods", "qlora"], "add lora to --methods or pass --skip-techniques"),
])
def test_benchmark_rejects_bad_methods(argv, message, capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_gpu_script_skips_on_cpu_and_its_arithmetic():
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.gpu_qlora_bloom7b1 import model_flops_per_token, peak_tflops
    from helpers.memory import KNOWN_CONFIGS

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA A100-SXM4-40GB") == 312 and peak_tflops("Some GPU") is None
    facts = KNOWN_CONFIGS["bigscience/bloom-7b1"]
    flops = model_flops_per_token(facts, 0, 512)
    assert flops == 4 * (30 * 12 * 4096**2 + 250880 * 4096) + 12 * 30 * 4096 * 512
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run for real (it is not part of the tests)")
    done = subprocess.run([sys.executable, "benchmarks/gpu_qlora_bloom7b1.py"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("SKIPPED: no CUDA GPU"), done.stdout + done.stderr


def test_fixed_lengths_round_the_datas_longest_up_like_a_kits_flags():
    from transformers import AutoTokenizer

    from benchmarks.run import fixed_lengths
    from helpers.data import load_dataset
    from helpers.models import load_tokenizer

    train = load_dataset("promptcblue_ctc", split="train")
    assert fixed_lengths(load_tokenizer(), train) == {"max_source_length": 128, "max_target_length": 8}
    pythia = AutoTokenizer.from_pretrained(REPO_ROOT / "tests" / "fixtures" / "pythia-tokenizer")
    assert fixed_lengths(pythia, train) == {"max_source_length": 192, "max_target_length": 16}
