"""Shared test settings: the unit tests run offline, like the notebooks in the test run. And the tiny random
GPT-NeoX the tests build instead of waiting for the course's stand-in: `build_tiny_neox`, fixtures `tiny_neox`
and `tiny_model_dir`."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# tests/_tiny.py and the driver tests/_train_for_kill.py are imported by name. pytest's default import mode puts
# this folder on sys.path; this keeps it there under --import-mode=importlib too.
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from _tiny import TINY_CONFIG  # noqa: E402


def build_tiny_neox(folder=None, *, tokenizer=None, seed: int = 0, model_class=None, **overrides):
    """A randomly initialised tiny GPT-NeoX: the same weights for the same arguments.

    Its configuration is TINY_CONFIG (tests/_tiny.py: vocabulary 96, hidden 32, 2 layers of 2 heads, MLP 64,
    64 positions, untied head, bos = eos = 0, pad = 1), then the vocabulary size and bos/eos/pad ids of
    `tokenizer` where one is given, then `overrides`. `model_class` is GPTNeoXForCausalLM unless given
    (test_rewards: GPTNeoXForSequenceClassification). Without `folder` it returns the model; with one it saves
    the model (safetensors) and `tokenizer`, if given, there and returns the folder.

    Built here (overrides are the shape a test counts or needs):
      TINY_CONFIG as it is   test_bad_input, test_safety, test_reliability (the base of tests/_train_for_kill.py,
                             whose word tokenizer `t0 … t95` covers its vocabulary), test_models (float16 loading)
      course tokenizer       test_generation (4 heads, 256 positions)
      400-token tokenizer    test_tuning (hidden 16, MLP 32, 1024 positions; it asserts exact trainable counts)
      vocabulary 128         test_qlora (hidden 64, 4 heads, MLP 256: its parameter count is worked out by hand)
      vocabulary 7           test_ppo, test_rewards (one layer, hidden 16, MLP 32, and a 7-word tokenizer of
                             their own, so that sampled tokens are whole words and ids can be written down)
    Kept separate, because the shape or the configuration itself is what they test:
      test_online_lane   Pythia-70m's real vocabulary and shape in float16, laid out as a Hub cache for the notebooks
      test_memory        counts from a configuration against the model built from it (GPT-NeoX, BLOOM, Llama)
      test_models        one tiny model per architecture family, to check the LoRA target-module table
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    settings = dict(TINY_CONFIG)
    if tokenizer is not None:
        settings.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = (model_class or GPTNeoXForCausalLM)(GPTNeoXConfig(**settings))
    if folder is None:
        return model
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_neox():
    """`build_tiny_neox`, for tests and fixtures of any scope: `tiny_neox(tmp_path / "m")`, `tiny_neox(**overrides)`."""
    return build_tiny_neox


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The tiny model of TINY_CONFIG (seed 0), saved once per test module (test_tuning has its own)."""
    return build_tiny_neox(tmp_path_factory.mktemp("tiny") / "model")
