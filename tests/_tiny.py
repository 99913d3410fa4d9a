"""The tiny random GPT-NeoX the tests share: its configuration, a word-level tokenizer over its vocabulary and a
small training set.

tests/conftest.py builds the model from TINY_CONFIG (`build_tiny_neox`, fixtures `tiny_neox` and
`tiny_model_dir`). This module is separate from conftest so that the subprocess driver tests/_train_for_kill.py,
which runs as a script where conftest cannot be imported, uses the same tokenizer and data.
"""
from __future__ import annotations

VOCAB = 96
# GPT-NeoX like Pythia (rotary on a quarter of each head, parallel residual), small for testing efficiency.
TINY_CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
                   bos_token_id=0, eos_token_id=0, pad_token_id=1)


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB tokens `t0 … t95` (t0 = EOS/BOS, t1 = padding), space separated."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", bos_token="t0", pad_token="t1", unk_token="t2")


def tiny_dataset(n: int = 48, seed: int = 0):
    """`n` tokenized examples of 6-14 tokens: a 'prompt' whose labels are -100, then a trained 'response'."""
    import random

    import datasets

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 8))]
        response = [(t * 7) % (VOCAB - 3) + 3 for t in prompt[:3]] + [0]  # learnable from the prompt
        rows.append({"input_ids": prompt + response, "attention_mask": [1] * (len(prompt) + len(response)),
                     "labels": [-100] * len(prompt) + response})
    return datasets.Dataset.from_list(rows)
