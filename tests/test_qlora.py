"""helpers.quantization: measured bytes of 4-bit / int8 / float models, and the compute dtype choice; and what notebooks
03 (NF4, double quantization, paged optimizers, the memory model) and 03 (QLoRA training, its recipe) rely on from
bitsandbytes, transformers, peft and helpers.memory (the checks that guard them against their drift)."""
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


def _load_4bit(folder, double_quant: bool, quant_type: str = "nf4"):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
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


# --- recipes/04_qlora.py: the parts that must agree with what notebook 04 teaches ---------------------------------
def _recipe_functions(**namespace):
    """The recipe's functions, defined without running the script (it would load bloom-7b1)."""
    import ast
    import json
    import os
    import re

    from helpers.env import REPO_ROOT

    tree = ast.parse((REPO_ROOT / "recipes" / "04_qlora.py").read_text(encoding="utf-8"))
    functions = ast.Module([node for node in tree.body if isinstance(node, ast.FunctionDef)], type_ignores=[])
    namespace = {"json": json, "os": os, "re": re, **namespace}
    exec(compile(functions, "recipes/04_qlora.py", "exec"), namespace)
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


# --- What notebooks 03 and 04 rely on, moved from their cells (issue 18): the notebooks show these, the tests keep them
# bitsandbytes' 4-bit and 8-bit storage, as notebook 03 rebuilds it (sections 1 and 2, exercise 1).
def _nearest_code(x, code, blocksize):
    """Notebook 03's quantize_4bit_ours and pack: each block / its absmax -> nearest value, two codes a byte."""
    sorted_code, order = code.sort()
    blocks = x.reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax[:, None])
    index = order[torch.bucketize(scaled.reshape(-1), (sorted_code[1:] + sorted_code[:-1]) / 2)].to(torch.uint8)
    return (index[0::2] << 4) | index[1::2], absmax


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_bitsandbytes_4bit_bytes_are_the_nearest_code_two_a_byte(quant_type, blocksize):
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    x = torch.randn(256, 256)
    packed, absmax = _nearest_code(x, F.get_4bit_type(quant_type, device="cpu"), blocksize)
    theirs, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(packed, theirs.flatten()) and torch.equal(absmax, state.absmax)


def test_double_quantization_as_notebook_02_builds_it():
    import bitsandbytes.functional as F

    torch.manual_seed(1)
    w = torch.randn(4096, 4096) * 0.02  # the notebook's matrix: one bloom-7b1 attention output projection
    _, absmax = _nearest_code(w, F.get_4bit_type("nf4", device="cpu"), 64)
    dynamic = F.create_dynamic_map(signed=True)
    offset = absmax.mean()
    centred = (absmax - offset).reshape(-1, 256)
    scale = centred.abs().amax(dim=1)
    codes = torch.bucketize((centred / scale[:, None]).reshape(-1), (dynamic[1:] + dynamic[:-1]) / 2)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(offset, state.offset) and torch.equal(scale, state.state2.absmax)
    # bitsandbytes' CPU kernel finds each 8-bit code with an approximate search: measured on three seeds, 99.8% of
    # the codes identical and the others at most 0.0141 of the block scale away (neighbouring values of the map).
    same = (codes == state.absmax.long()).float().mean().item()
    apart = (dynamic[codes] - dynamic[state.absmax.long()]).abs().max().item()
    assert same > 0.99 and apart < 0.02
    # The reconstructed constants are within about 1% of the originals, ours no further than bitsandbytes'.
    ours_back = (dynamic[codes].reshape(-1, 256) * scale[:, None]).reshape(-1) + offset
    bnb_back = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    ours_error, bnb_error = (((back - absmax).abs() / absmax).max().item() for back in (ours_back, bnb_back))
    assert ours_error <= bnb_error * (1 + 1e-6) and bnb_error < 0.02
    # And the weights barely notice (measured: +0.05% MSE against exact constants).
    exact = ((F.dequantize_4bit(*F.quantize_4bit(w, quant_type="nf4")) - w) ** 2).mean().item()
    assert ((F.dequantize_4bit(packed, state) - w) ** 2).mean().item() < exact * 1.01


def test_fp4_is_bitsandbytes_default_so_the_course_always_says_nf4():
    import bitsandbytes as bnb

    assert transformers.BitsAndBytesConfig(load_in_4bit=True).bnb_4bit_quant_type == "fp4"
    assert bnb.nn.Linear4bit(64, 64).weight.quant_type == "fp4"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_paged_adamw_on_a_cpu_says_it_falls_back_and_is_adamw():
    import warnings

    import bitsandbytes as bnb

    torch.manual_seed(0)
    start = torch.randn(256, 64)
    ours, reference = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    paged, plain = bnb.optim.PagedAdamW32bit([ours], lr=1e-2), torch.optim.AdamW([reference], lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            grad = torch.randn_like(start)
            ours.grad, reference.grad = grad.clone(), grad.clone()
            paged.step()
            plain.step()
    assert (ours - reference).abs().max().item() < 1e-5
    assert any("Falling back to non-paged" in str(w.message) for w in caught)  # lesson 03, section 4 quotes it


# transformers and peft: what notebook 04's 4-bit model is made of (section 1, section 3, exercise 3).
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_a_4bit_load_builds_what_its_configuration_asks(tiny_dir, quant_type, double_quant):
    import bitsandbytes as bnb

    model = _load_4bit(tiny_dir, double_quant, quant_type)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * len(LINEARS)
    assert {(m.weight.quant_state.quant_type, m.weight.quant_state.nested) for m in layers} == {(quant_type, double_quant)}
    # FP4 is stored like NF4, so the notebook's prediction names only the storage ("nf4" or "nf4-dq").
    predicted = estimate_memory(model.config, weights="nf4-dq" if double_quant else "nf4", method="inference",
                                compute_dtype="fp32")
    assert weight_bytes(model)["weights"] == predicted.components["weights"]


def test_prepare_model_for_kbit_training_keeps_what_is_not_4bit_in_fp32_and_frozen(tiny_dir):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float16)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config, device_map="cpu",
                                                              dtype=torch.float16)
    norms = lambda m: {p.dtype for n, p in m.named_parameters() if "norm" in n}  # noqa: E731
    assert norms(model) == {torch.float16}  # as loaded: fp16 norms, which overflow in training
    model = get_peft_model(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["query_key_value"]))
    rest = {n: p for n, p in model.named_parameters() if type(p).__name__ != "Params4bit" and "lora_" not in n}
    assert rest and norms(model) == {torch.float32}
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in rest.values())
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


# helpers.memory: the paper's figures notebook 03 reproduces (section 3); notebook 04's recipe predictions (section 4).
def test_guanaco_sizes_and_the_double_quantization_saving():
    from helpers.memory import GB, lora_parameters

    # The paper's Table 1, whole GB; ours: NF4 weights + bf16 adapter (r = 64, all layers) + a 512-token KV cache.
    # The paper's numbers are rounded measurements with runtime buffers our count leaves out: within 1.5 GB.
    paper = {"huggyllama/llama-65b": 41, "huggyllama/llama-30b": 21, "huggyllama/llama-13b": 10,
             "huggyllama/llama-7b": 6}
    for name, reported in paper.items():
        adapter = lora_parameters(name, 64, "all") * 2
        ours = (estimate_memory(name, weights="nf4", method="inference", batch_size=1, seq_len=512).total + adapter) / GB
        assert abs(reported - ours) <= 1.5, (name, ours)
    vicuna = estimate_memory("huggyllama/llama-13b", weights="fp16", method="inference").components["weights"] / GB
    assert abs(26 - vicuna) <= 1.5
    # "approximately 3 GB for a 65B model" (section 3)
    saving = [estimate_memory("huggyllama/llama-65b", weights=w, method="inference", batch_size=1, seq_len=512).total
              for w in ("nf4", "nf4-dq")]
    assert 2.5 < (saving[0] - saving[1]) / GB < 3.5


def _notebook_full_size():
    """The full-size values of notebook 04's configuration cell (SIZES: setting -> (tiny, full size))."""
    import ast
    import json

    from helpers.env import REPO_ROOT

    cells = json.loads((REPO_ROOT / "notebooks" / "04_qlora_training.ipynb").read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if cell["cell_type"] == "code" and "SIZES = {" in "".join(cell["source"]):
            for node in ast.parse("".join(cell["source"])).body:
                if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "SIZES":
                    return {ast.literal_eval(k): ast.literal_eval(v.elts[1]) for k, v in zip(node.value.keys,
                                                                                               node.value.values)}
    raise AssertionError("notebook 04 has no SIZES in its configuration cell")


def test_notebook_04_full_size_is_its_recipe():
    from helpers.env import REPO_ROOT
    from helpers.memory import recipe_constants

    recipe = recipe_constants(REPO_ROOT / "recipes" / "04_qlora.py")
    full = _notebook_full_size()
    names = {"MODEL": "model_name", "MAX_LENGTH": "max_length", "LORA_R": "lora_r", "BATCH_SIZE": "per_device_train_batch_size",
             "GRADIENT_ACCUMULATION": "gradient_accumulation_steps", "LEARNING_RATE": "learning_rate",
             "GRADIENT_CHECKPOINTING": "gradient_checkpointing", "SAVE_STEPS": "save_steps"}
    assert {ours: recipe[ours] for ours in names} == {ours: full[setting] for ours, setting in names.items()}


def test_recipe_03_memory_predictions_the_notebook_prints():
    from helpers.env import REPO_ROOT
    from helpers.memory import CUDA_RESERVE_GIB, GIB, GPU_PROFILES, recipe_constants, recipe_memory

    script = REPO_ROOT / "recipes" / "04_qlora.py"
    recipe = recipe_constants(script)
    usable = {gpu: profile["memory_gib"] - CUDA_RESERVE_GIB for gpu, profile in GPU_PROFILES.items()}
    # The same run as 16-bit LoRA does not fit an L4: why the notebook's 16-bit comparison runs only at tiny size.
    lora16 = estimate_memory(recipe["MODEL"], weights="bf16", method="lora", lora_r=recipe["LORA_R"],
                             lora_dropout=recipe["LORA_DROPOUT"], batch_size=recipe["BATCH_SIZE"],
                             seq_len=recipe["MAX_LENGTH"], gradient_checkpointing=True)
    assert lora16.gib() > usable["L4"]
    t4 = recipe_memory(script, "T4")
    upcast = t4.components["fp32 upcast"]

    def qlora_step(batch, seq):  # the notebook's table of options, computed as it computes them
        e = estimate_memory(recipe["MODEL"], weights="nf4-dq", method="qlora", lora_r=recipe["LORA_R"],
                            lora_dropout=recipe["LORA_DROPOUT"], optimizer="paged-adamw-32bit", batch_size=batch,
                            seq_len=seq, gradient_checkpointing=True, compute_dtype="fp16")
        return (e.total + upcast) / GIB

    # Its row for the recipe's own batch is recipe_fit's prediction, and a T4 takes one 1024-token chat at a time.
    assert round(qlora_step(recipe["BATCH_SIZE"], recipe["MAX_LENGTH"]), 1) == round(t4.gib(), 1)
    assert qlora_step(1, 1024) <= usable["T4"]
