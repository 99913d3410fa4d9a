"""helpers.quantization: measured bytes of 4-bit / int8 / float models, and the compute dtype choice."""
import logging

import pytest
import torch
import transformers

from helpers.memory import estimate_memory
from helpers.quantization import preferred_compute_dtype, weight_bytes

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a harmless optional-kernel message on import

# Small for testing efficiency: 2 blocks of hidden 64, MLP 256, vocabulary 128 (conftest's tiny_neox in this shape).
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            max_position_embeddings=64, rotary_pct=0.25, tie_word_embeddings=False)
# One block's linear layers (in, out): query_key_value, dense, dense_h_to_4h, dense_4h_to_h.
LINEARS = [(64, 192), (64, 64), (64, 256), (256, 64)]
N_PARAMS = 116_480  # counted by hand below


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_neox):
    return tiny_neox(tmp_path_factory.mktemp("tiny-neox"), **TINY)


def _load_4bit(folder, double_quant: bool):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=double_quant,
                                             bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")


def test_parameter_count_of_the_tiny_config():
    blocks = sum(i * o + o for i, o in LINEARS) + 2 * 2 * 64  # weights + biases + two LayerNorms
    assert 2 * 128 * 64 + 2 * blocks + 2 * 64 == N_PARAMS  # embeddings + head + blocks + final norm


def test_float_model_is_four_bytes_a_parameter(tiny_dir):
    parts = weight_bytes(transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32))
    assert parts["weights"] == parts["other parameters"] == 4 * N_PARAMS
    assert parts["quantized values"] == parts["quantization constants"] == parts["lookup tables"] == 0


def test_nf4_without_double_quantization(tiny_dir):
    parts = weight_bytes(_load_4bit(tiny_dir, double_quant=False))
    quantized = 2 * sum(i * o for i, o in LINEARS)  # 98,304 weights in the blocks' linear layers
    assert parts["quantized values"] == quantized // 2  # two codes a byte
    assert parts["quantization constants"] == 4 * quantized // 64  # one fp32 absmax per block of 64
    assert parts["other parameters"] == 4 * (N_PARAMS - quantized)
    assert parts["lookup tables"] == 8 * 16 * 4  # each of the 8 layers keeps its own 16-value fp32 table


def test_nf4_with_double_quantization(tiny_dir):
    parts = weight_bytes(_load_4bit(tiny_dir, double_quant=True))
    blocks = [i * o // 64 for i, o in LINEARS] * 2  # absmax values per layer: 192, 64, 256, 256
    # 8-bit absmax codes + one fp32 scale per 256 of them + one fp32 offset, per layer
    assert parts["quantization constants"] == sum(b + 4 * -(-b // 256) + 4 for b in blocks)
    assert parts["quantized values"] == sum(i * o for i, o in LINEARS)


@pytest.mark.parametrize("double_quant", [False, True])
def test_measurement_equals_the_prediction_from_the_config(tiny_dir, double_quant):
    model = _load_4bit(tiny_dir, double_quant)
    predicted = estimate_memory(model.config, weights="nf4-dq" if double_quant else "nf4", method="inference",
                                compute_dtype="fp32")
    assert weight_bytes(model)["weights"] == predicted.components["weights"]


def test_int8_values_and_row_scales(tiny_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_dir, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    parts = weight_bytes(model)
    assert parts["quantized values"] == 2 * sum(i * o for i, o in LINEARS)  # one byte a weight
    assert parts["quantization constants"] == 2 * sum(4 * o for _, o in LINEARS)  # one fp32 scale per row
    predicted = estimate_memory(model.config, weights="int8", method="inference", compute_dtype="fp32")
    assert parts["weights"] == predicted.components["weights"]


def test_weight_bytes_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        weight_bytes({"weight": torch.zeros(3)})


def test_compute_dtype_on_cpu_is_fp32():
    assert preferred_compute_dtype("cpu") is torch.float32


def test_compute_dtype_rejects_other_devices():
    with pytest.raises(ValueError, match="'cpu' and 'cuda'"):
        preferred_compute_dtype("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no GPU exists")
def test_compute_dtype_asks_for_a_gpu_that_is_not_there():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        preferred_compute_dtype("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compute_dtype_on_gpu_follows_the_compute_capability():
    major, _ = torch.cuda.get_device_capability()
    assert preferred_compute_dtype("cuda") is (torch.bfloat16 if major >= 8 else torch.float16)


# --- recipes/02_qlora.py: the parts that must agree with what notebook 02 teaches ---------------------------------
def _recipe_functions(**namespace):
    """The recipe's functions, defined without running the script (it would load bloom-7b1)."""
    import ast
    import json
    import os
    import re

    from helpers.env import REPO_ROOT

    tree = ast.parse((REPO_ROOT / "recipes" / "02_qlora.py").read_text(encoding="utf-8"))
    functions = ast.Module([node for node in tree.body if isinstance(node, ast.FunctionDef)], type_ignores=[])
    namespace = {"json": json, "os": os, "re": re, **namespace}
    exec(compile(functions, "recipes/02_qlora.py", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("max_length", [1024, 24])
def test_recipe_formats_chats_as_the_notebook_teaches(max_length):
    # The recipe writes the <s>q1</s>a1</s>q2</s>a2</s> format out in plain code; it must equal
    # helpers.prompts.tokenize_conversation, token for token and label for label, cut or not.
    from helpers.data import load_dataset
    from helpers.models import load_tokenizer
    from helpers.prompts import IGNORE_INDEX, tokenize_conversation

    tokenizer = load_tokenizer()
    tokenize = _recipe_functions(tokenizer=tokenizer, MAX_LENGTH=max_length)["tokenize"]
    cut = 0
    for row in load_dataset("conversations"):
        ours = tokenize(row)
        try:
            assert ours == tokenize_conversation(tokenizer, row["conversation"], max_length)
        except ValueError:  # the first answer lies beyond max_length: the recipe filters such rows out
            assert set(ours["labels"]) == {IGNORE_INDEX}
        cut += len(ours["input_ids"]) == max_length
    assert (cut > 0) == (max_length == 24)  # the short limit really cuts conversations


def test_recipe_resumes_from_the_last_complete_checkpoint(tmp_path):
    last_complete_checkpoint = _recipe_functions()["last_complete_checkpoint"]
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    assert last_complete_checkpoint(str(tmp_path)) is None
    for step, state in [(10, '{"global_step": 10}'), (20, '{"global_st'), (30, None)]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-final").mkdir()  # not a checkpoint-<step> folder
    # 30: killed before trainer_state.json (written last); 20: killed while writing it. 10 is the last complete one.
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
