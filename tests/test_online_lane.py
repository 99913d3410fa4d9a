"""The online learner's lane: notebooks 00-06 as a learner with internet gets them.

Offline, the course resolves `EleutherAI/pythia-70m-deduped` to its stand-in. A learner with internet (every Colab
session, every connected `make lab`) gets the real model, which differs where the notebooks could go wrong: Pythia's
GPT-NeoX-20B tokenizer (byte-level BPE: a Chinese character is 1 to 3 tokens, prompts and labels are longer than with
the stand-in, no pad token in its config), a 50,304-row embedding, and a checkpoint stored in float16.

This lane builds a Hugging Face cache holding a model of that kind under the real name, exactly where a download
would have put it, and runs the notebooks against it (still offline: the cache answers, as after a download).
  tokenizer   Pythia's own, from tests/fixtures/pythia-tokenizer/ (Apache-2.0, see its README);
  model       GPT-NeoX with Pythia-70m's configuration (vocabulary 50,304, rotary on a quarter of each head,
              parallel residual, untied embeddings), scaled down in width and depth so the lane fits the test
              budget, random weights, saved in float16 as Pythia's checkpoints are.
Training loops are capped at LANE_STEPS (COURSE_MAX_STEPS, helpers.env.capped_steps): each step over a 50k
vocabulary costs several times the stand-in's, and this lane is about every cell running, not about learning.
What it asserts: every cell of every notebook runs (so every code-correctness assert holds on this model), and the
model really came from the cache, not the stand-in. Lesson checks (how well it learned) may print ✗ here: random
weights do not learn the task in a test run's steps, and a ✗ is a verdict, not a failure. The verdicts are written to
<outputs>/online_lane/<notebook>.md.
"""
import json
import os
import shutil
from pathlib import Path

import pytest

from benchmarks.robustness import execute_notebook
from helpers.env import REPO_ROOT, output_dir

PYTHIA = "EleutherAI/pythia-70m-deduped"
TOKENIZER = Path(__file__).parent / "fixtures" / "pythia-tokenizer"
COMMIT = "0" * 40  # the snapshot's name in the cache; any hash-like name works offline
# Pythia-70m: hidden 512, 6 layers, 8 heads, intermediate 2048. Scaled down (the vocabulary is not): at full width a
# training step takes ~8 s on 2 CPU cores (FACTS.md), and the lane must fit the test run.
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
LANE_STEPS = 10
NOTEBOOKS = ["00_setup_and_tour", "01_lora_from_scratch", "02_lora_training", "03_nf4_quantization",
             "04_qlora_training", "05_ptuning_v2", "06_comparing_methods"]


def build_pythia_cache(hf_home: Path) -> Path:
    """Write a Pythia-shaped float16 model and Pythia's tokenizer into a Hugging Face cache at hf_home."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    snapshot = hf_home / "hub" / f"models--{PYTHIA.replace('/', '--')}" / "snapshots" / COMMIT
    config = GPTNeoXConfig(vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
                           use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                           layer_norm_eps=1e-5, hidden_act="gelu", **SHAPE)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).to(torch.float16)
    model.save_pretrained(snapshot)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, snapshot / name)
    refs = snapshot.parents[1] / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    snapshot = build_pythia_cache(home)
    assert json.loads((snapshot / "config.json").read_text())["dtype"] == "float16"  # as Pythia's checkpoints
    return home


def test_the_tokenizer_fixture_is_pythias():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    assert len(tokenizer("实验室检查", add_special_tokens=False)["input_ids"]) == 8  # byte-level: 1-3 per character
    assert (TOKENIZER / "README.md").read_text().count("Apache License 2.0") == 1


def test_lengths_from_the_data_fit_pythias_tokenizer():
    """Notebook 02's lengths, measured with Pythia's tokenizer, neither refuse a prompt nor cut a label."""
    from transformers import AutoTokenizer

    from helpers.data import load_dataset
    from helpers.prompts import lengths_from_data, tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    train = load_dataset("promptcblue_ctc", split="train")
    lengths = lengths_from_data(tokenizer, train)
    assert lengths["max_source_length"] > 128 and lengths["max_target_length"] == 9  # the stand-in's 128/8 would fail
    features = tokenize_dataset(train, tokenizer, max_source_length=lengths["max_source_length"],
                                max_target_length=lengths["max_target_length"])
    full = tokenize_dataset(train, tokenizer)
    assert features["labels"] == full["labels"]  # nothing was cut


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_as_an_online_learner_gets_it(name, hf_home, tmp_path):
    verdicts = tmp_path / "checks.jsonl"
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", COURSE_SMOKE="1", COURSE_MAX_STEPS=str(LANE_STEPS),
               TOKENIZERS_PARALLELISM="false",
               COURSE_OUTPUTS=str(tmp_path / "outputs"), COURSE_CHECKS_LOG=str(verdicts), COURSE_NOTEBOOK=name,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("COURSE_CHECKS_STRICT", None)
    status, seconds, executed = execute_notebook(REPO_ROOT / "notebooks" / f"{name}.ipynb", env, timeout=600)
    assert status == "ran", f"{name} on the online lane: {status}"
    text = "\n".join(str(output.get("text", "")) for cell in executed.cells if cell.cell_type == "code"
                     for output in cell.get("outputs", []))
    assert "from the local Hugging Face cache" in text and "NOT Pythia" not in text, text[:2000]  # not the stand-in
    checks = [json.loads(line) for line in verdicts.read_text().splitlines()] if verdicts.exists() else []
    (output_dir("online_lane", clean=False) / f"{name}.md").write_text(f"## {name} ({seconds:.0f} s)\n\n" + "".join(
        f"- {'✓' if c['held'] else '✗'} {c['claim']}: {c['value']:.4g} {c['op']} {c['bar']:.4g}\n" for c in checks),
        encoding="utf-8")
