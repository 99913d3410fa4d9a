"""helpers.memory: parameter counts, quantized bytes, LoRA/prefix sizes, ZeRO, activations (exact values)."""
import math

import pytest

from helpers.memory import (
    GB,
    GIB,
    KNOWN_CONFIGS,
    NF4_DQ_BITS,
    activation_elements_per_token,
    count_parameters_from_config,
    estimate_memory,
    lora_parameters,
    prefix_parameters,
    quantized_bytes,
    zero_model_states,
)

BLOOM = "bigscience/bloom-7b1"
BLOOM_TOTAL = 7_069_016_064
BLOOM_QUANTIZED = 30 * 12 * 4096**2  # the linear weights of 30 blocks: qkv 3h², dense h², MLP 8h²


@pytest.mark.parametrize("name, total", [
    (BLOOM, BLOOM_TOTAL),                               # FACTS.md / the model card: 7.07B
    ("EleutherAI/pythia-70m-deduped", 70_426_624),      # FACTS.md: 70.43M
    ("EleutherAI/pythia-14m", 14_067_712),              # FACTS.md: 14.07M
    ("EleutherAI/pythia-160m", 162_322_944),            # FACTS.md: 162.3M
    ("huggyllama/llama-7b", 6_738_415_616),             # LLaMA paper's 6.7B
    ("huggyllama/llama-13b", 13_015_864_320),
    ("huggyllama/llama-30b", 32_528_943_616),
    ("huggyllama/llama-65b", 65_285_660_672),
    ("THUDM/chatglm2-6b", 6_243_584_000),
    ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
])
def test_parameter_counts_of_known_models(name, total):
    assert count_parameters_from_config(name)["total"] == total


def test_pythia_70m_without_embeddings_is_18_9m():
    counts = count_parameters_from_config("EleutherAI/pythia-70m-deduped")
    assert counts["total"] - counts["embeddings"] == 18_915_328  # blocks + final norm (FACTS.md: 18.9M)
    assert counts["lm_head"] == 50304 * 512  # untied


def test_bloom_breakdown():
    counts = count_parameters_from_config(BLOOM)
    assert counts["embeddings"] == 250880 * 4096 and counts["lm_head"] == 0  # tied head
    assert counts["per_block_linear"] == 12 * 4096**2
    assert counts["quantizable"] == BLOOM_QUANTIZED
    assert [name for name, *_ in counts["linear_layers"]] == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@pytest.mark.parametrize("family", ["gpt_neox", "bloom", "llama"])
def test_counts_from_a_transformers_config_match_the_built_model(family):
    import torch
    import transformers

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)  # small for speed
    if family == "gpt_neox":
        config = transformers.GPTNeoXConfig(intermediate_size=256, **small)
    elif family == "bloom":
        config = transformers.BloomConfig(n_embed=64, n_layer=2, n_head=4, vocab_size=512)
    else:
        config = transformers.LlamaConfig(intermediate_size=160, num_key_value_heads=2, **small)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    built = sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once
    assert count_parameters_from_config(config)["total"] == built


def test_bloom_weights_in_every_format():
    other = BLOOM_TOTAL - BLOOM_QUANTIZED  # embeddings, norms and biases stay 16-bit
    expected = {
        "fp32": 4 * BLOOM_TOTAL,
        "fp16": 2 * BLOOM_TOTAL,
        "int8": BLOOM_QUANTIZED + 4 * 30 * (3 * 4096 + 4096 + 16384 + 4096) + 2 * other,
        "nf4": BLOOM_QUANTIZED // 2 + 4 * BLOOM_QUANTIZED // 64 + 2 * other,
        "nf4-dq": BLOOM_QUANTIZED // 2 + BLOOM_QUANTIZED // 64 + 4 * BLOOM_QUANTIZED // (64 * 256) + 4 * 120 + 2 * other,
    }
    for weights, nbytes in expected.items():
        est = estimate_memory(BLOOM, weights=weights, method="inference", seq_len=1)
        assert est.components["weights"] == nbytes, weights
    assert expected["nf4"] == 5_455_822_848 and expected["nf4-dq"] == 5_174_182_368
    # 4.5 bits and 4.127 bits a quantized parameter (QLoRA paper, section 3)
    assert (expected["nf4"] - 2 * other) * 8 / BLOOM_QUANTIZED == 4.5
    assert math.isclose((expected["nf4-dq"] - 2 * other - 480) * 8 / BLOOM_QUANTIZED, NF4_DQ_BITS)
    assert round(NF4_DQ_BITS, 3) == 4.127


def test_quantized_bytes_of_one_matrix():
    # 4096 x 4096 = 16,777,216 values: 8,388,608 bytes of 4-bit codes in 262,144 blocks of 64 (notebook 03 counts the
    # same bytes in the tensors bitsandbytes stores)
    assert quantized_bytes(4096, 4096, "nf4") == 8_388_608 + 4 * 262_144
    assert quantized_bytes(4096, 4096, "nf4-dq") == 8_388_608 + 262_144 + 4 * 1024 + 4
    assert quantized_bytes(4096, 1024, "int8") == 4096 * 1024 + 4 * 1024  # one fp32 scale per output row
    assert quantized_bytes(4096, 1024, "int4") == 4096 * 1024 // 2 + 2 * 1024  # one fp16 scale per output row
    assert quantized_bytes(3, 5, "nf4") == 8 + 4  # 15 values: half a byte rounds up, one partial block
    with pytest.raises(ValueError, match="weights must be one of"):
        quantized_bytes(64, 64, "fp16")


def test_lora_and_prefix_parameters():
    # bloom-7b1, r=64 on all four linear layers: 64 * (h+3h + h+h + h+4h + 4h+h) per block
    assert lora_parameters(BLOOM, 64, "all") == 30 * 64 * 16 * 4096
    assert lora_parameters(BLOOM, 8, "attention") == 30 * 8 * (4096 + 3 * 4096)
    assert lora_parameters("huggyllama/llama-7b", 8, ["q_proj", "v_proj"]) == 32 * 8 * 4 * 4096
    # ChatGLM-6B's P-Tuning v2 without projection: pre_seq_len x layers x 2 x hidden
    assert prefix_parameters("THUDM/chatglm-6b", 16) == 16 * 28 * 2 * 4096
    h, H, out = 4096, 512, 28 * 2 * 4096
    assert prefix_parameters("THUDM/chatglm-6b", 16, True, H) == 16 * h + h * H + H + H * out + out
    # ChatGLM2-6B keeps only its 2 multi-query groups of 128 channels: 28 x 2 x 128 x 2 = 14336 wide
    kv = 28 * 2 * 128 * 2
    assert prefix_parameters("THUDM/chatglm2-6b", 16) == 16 * kv == 229_376
    assert prefix_parameters("THUDM/chatglm2-6b", 16, True) == 16 * kv + kv * h + h + h * kv + kv


def test_zero_paper_example():
    # Rajbhandari et al. (arXiv:1910.02054), Figure 1: Psi = 7.5B, N = 64, K = 12
    totals = [zero_model_states(7.5e9, stage=s, num_devices=64)["total"] / GB for s in range(4)]
    assert totals == [120.0, 31.40625, 16.640625, 1.875]
    assert [round(t, 1) for t in totals] == [120.0, 31.4, 16.6, 1.9]
    two = zero_model_states(7.5e9, stage=2, num_devices=64)
    assert two["params"] == 15e9 and two["gradients"] == 2 * 7.5e9 / 64 and two["optimizer"] == 12 * 7.5e9 / 64


def test_zero_offload():
    off = zero_model_states(1_000_000, stage=2, num_devices=4, offload_optimizer=True)
    assert off["optimizer"] == 0 and off["gradients"] == 0 and off["params"] == 2_000_000
    assert off["cpu"] == 12_000_000 / 4 + 2_000_000 / 4
    inf = zero_model_states(1_000_000, stage=3, num_devices=4, offload_optimizer=True, offload_params=True)
    assert inf["total"] == 0 and inf["cpu"] == 16_000_000 / 4


def test_estimate_memory_full_fine_tuning_is_the_zero_formula():
    for stage in range(4):
        est = estimate_memory(7_500_000_000, weights="fp16", method="full", zero_stage=stage, num_devices=64)
        assert est.total == zero_model_states(7.5e9, stage=stage, num_devices=64)["total"]
        assert est.components["activations"] == 0  # a bare count has no architecture


def test_qlora_65b_fits_in_48_gb():
    # QLoRA paper: LLaMA-65B fine-tuned on one 48 GB GPU (batch 1, seq 512, gradient checkpointing)
    est = estimate_memory("huggyllama/llama-65b", weights="nf4-dq", method="qlora", lora_r=64,
                          optimizer="paged-adamw-32bit", batch_size=1, seq_len=512, gradient_checkpointing=True)
    assert est.gib() < 48
    assert est.parameters["adapter"] == lora_parameters("huggyllama/llama-65b", 64)
    # fp32 adapter, fp32 gradient, two fp32 moments: 16 bytes an adapter parameter
    assert est.components["adapter"] + est.components["gradients"] + est.components["optimizer"] == 16 * est.parameters["adapter"]


def test_optimizer_states():
    n = 1_000_000
    fp32 = estimate_memory(n, weights="fp32", method="full")
    assert fp32.components == {"weights": 4 * n, "adapter": 0, "gradients": 4 * n, "optimizer": 8 * n, "activations": 0}
    eight = estimate_memory(n, weights="bf16", method="full", optimizer="adamw-8bit")
    assert eight.components["optimizer"] == n * (4 + 2 + 2 * 4 / 256)  # master copy + two 8-bit moments


def test_activations_and_gradient_checkpointing():
    a = activation_elements_per_token("EleutherAI/pythia-70m-deduped")
    h, i = 512, 2048
    assert a["total"] == 2 * h + 5 * h + h + 2 * i
    eager = activation_elements_per_token("EleutherAI/pythia-70m-deduped", seq_len=128, attention="eager")
    assert eager["total"] - a["total"] == 8 * 128
    kwargs = dict(weights="fp32", method="full", batch_size=8, seq_len=128)
    plain = estimate_memory("EleutherAI/pythia-70m-deduped", **kwargs)
    ckpt = estimate_memory("EleutherAI/pythia-70m-deduped", gradient_checkpointing=True, **kwargs)
    tokens, e = 8 * 128, 4
    assert plain.components["activations"] - ckpt.components["activations"] == tokens * e * (6 * a["total"] - 6 * h - a["total"])
    assert plain.components["weights"] == ckpt.components["weights"]


def test_lora_dropout_keeps_a_copy_of_every_adapted_input():
    kwargs = dict(weights="fp32", method="lora", batch_size=2, seq_len=16)
    plain = estimate_memory("EleutherAI/pythia-70m-deduped", **kwargs)
    dropped = estimate_memory("EleutherAI/pythia-70m-deduped", lora_dropout=0.05, **kwargs)
    h, i = 512, 2048  # inputs of qkv, dense, dense_h_to_4h (h each) and dense_4h_to_h (i), fp32 + 1-byte mask
    assert dropped.components["activations"] - plain.components["activations"] == 6 * (3 * h + i) * 32 * (4 + 1)
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        estimate_memory("EleutherAI/pythia-70m-deduped", lora_dropout=1.5)


def test_memory_estimate_views():
    est = estimate_memory("EleutherAI/pythia-70m-deduped", weights="fp32", method="lora")
    table = est.table()
    assert list(table["component"]) == ["weights", "adapter", "gradients", "optimizer", "activations", "total"]
    assert table["bytes"].iloc[-1] == round(est.total)
    assert est.gib() == est.total / GIB and est.gib("weights") == 4 * 70_426_624 / GIB


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights="fp8"), "weights must be one of"),
    (dict(method="prompt"), "method must be one of"),
    (dict(optimizer="sgd"), "optimizer must be one of"),
    (dict(weights="nf4", method="full"), "cannot be stored as nf4"),
    (dict(weights="fp16", method="qlora"), "LoRA over 4-bit weights"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(lora_targets=["c_attn"]), "not linear layers of this model"),
])
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory("EleutherAI/pythia-70m-deduped", **kwargs)


def test_bad_models_and_stages():
    with pytest.raises(ValueError, match="unknown model"):
        estimate_memory("gpt5")
    with pytest.raises(ValueError, match="needs trainable_params"):
        estimate_memory(1_000_000, method="lora")
    with pytest.raises(ValueError, match="stage must be"):
        zero_model_states(10, stage=4, num_devices=2)
    with pytest.raises(ValueError, match="offload_optimizer needs ZeRO stage"):
        zero_model_states(10, stage=0, num_devices=2, offload_optimizer=True)
    assert set(KNOWN_CONFIGS) >= {BLOOM, "huggyllama/llama-65b", "THUDM/chatglm-6b", "EleutherAI/pythia-70m-deduped"}


def test_glm4_9b_from_its_config():
    from helpers.memory import count_parameters_from_config

    counts = count_parameters_from_config("THUDM/glm-4-9b-chat-hf")
    assert round(counts["total"] / 1e9, 1) == 9.4  # "GLM-4-9B": 9.4B with its untied 151,552-row head
    names = [name for name, *_ in counts["linear_layers"]]
    assert names == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_parameters_equal_peft_on_grouped_query_attention(projection):
    """peft's prefix for GQA holds only the key/value heads (token_dim = head_dim * num_key_value_heads)."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import GlmConfig, GlmForCausalLM

    from helpers.memory import lora_parameters, prefix_parameters

    config = GlmConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                       eos_token_id=1, bos_token_id=None)
    model = get_peft_model(GlmForCausalLM(config), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == prefix_parameters(config, 5, projection)
    assert lora_parameters(config, 4) == 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + (64 + 192) + (96 + 64))


def test_recipe_constants_read_literals_and_tuples_only(tmp_path):
    from helpers.memory import recipe_constants

    script = tmp_path / "01_x.py"
    script.write_text('import os\nMODEL = "m"\nA, B = 1, (2, 3)\nC = os.getcwd()\nlower = 5\nD: int = 4\n')
    assert recipe_constants(script) == {"MODEL": "m", "A": 1, "B": (2, 3)}


# The figures notebook 14 prints, pinned here (they were asserts in the notebook, issue 18): a change to the memory
# model that moves one of them fails this file, and lessons/14_speed_and_memory.md must be looked at again.
NOTEBOOK_14_RECIPE = dict(weights="nf4-dq", method="qlora", lora_r=64, lora_dropout=0.05, lora_targets="all",
                          optimizer="paged-adamw-32bit", batch_size=4, seq_len=512, gradient_checkpointing=True,
                          compute_dtype="bf16", attention="eager")  # notebook 14's CONFIG["recipe"]


def test_notebook_14_full_fine_tuning_against_qlora_on_bloom_7b1():
    batch = dict(batch_size=4, seq_len=512, gradient_checkpointing=True, attention="eager")
    full = estimate_memory(BLOOM, weights="bf16", method="full", **batch).gib()
    qlora = estimate_memory(BLOOM, weights="nf4-dq", method="qlora", lora_r=64, compute_dtype="bf16", **batch).gib()
    assert full > 100          # 16 bytes x 7.07B parameters = 105 GiB of model states before any activation
    assert qlora < 16          # fits a 16-24 GB GPU, as notebook 04's recipe promises
    assert full / qlora > 8


def test_notebook_14_checkpointing_leaves_the_logits():
    plain = estimate_memory(BLOOM, **dict(NOTEBOOK_14_RECIPE, gradient_checkpointing=False)).gib("activations")
    ckpt = estimate_memory(BLOOM, **NOTEBOOK_14_RECIPE).gib("activations")
    logits = 4 * 512 * 250880 * (2 + 8) / GIB  # 16-bit logits, the fp32 log-softmax and its fp32 gradient
    assert plain > 2.5 * ckpt  # what checkpointing saves (3.3x at 4 x 512 tokens)
    assert logits > 0.5 * ckpt  # the vocabulary dominates what is left (83%)


_CHATGLM_V100 = dict(lora_r=8, lora_targets="attention", lora_dropout=0.1, pre_seq_len=16, num_trainable_layers=3,
                     seq_len=512, gradient_checkpointing=True, compute_dtype="fp16", attention="eager")
_CHATGLM_ROWS = [  # ChatGLM Efficient Tuning's V100 table: (setting, published GB, estimate_memory arguments)
    ("LoRA r=8, batch 16, FP16", 28, dict(weights="fp16", method="lora", batch_size=16)),
    ("LoRA r=8, batch 8, FP16", 24, dict(weights="fp16", method="lora", batch_size=8)),
    ("LoRA r=8, batch 4, FP16", 20, dict(weights="fp16", method="lora", batch_size=4)),
    ("LoRA r=8, batch 4, INT8", 10, dict(weights="int8", method="lora", batch_size=4)),
    ("LoRA r=8, batch 4, INT4", 8, dict(weights="int4", method="qlora", batch_size=4)),
    ("P-Tuning p=16, batch 4, FP16", 20, dict(weights="fp16", method="ptuning-v2", batch_size=4)),
    ("P-Tuning p=16, batch 4, INT8", 16, dict(weights="int8", method="ptuning-v2", batch_size=4)),
    ("P-Tuning p=16, batch 4, INT4", 12, dict(weights="int4", method="ptuning-v2", batch_size=4)),
    ("Freeze l=3, batch 4, FP16", 24, dict(weights="fp16", method="freeze", batch_size=4)),
    ("Freeze l=3, batch 4, INT8", 12, dict(weights="int8", method="freeze", batch_size=4)),
]


def test_notebook_14_rows_outside_25_percent_of_the_published_figures():
    ratios = {setting: estimate_memory("THUDM/chatglm-6b", **dict(_CHATGLM_V100, **kwargs)).gib() / published
              for setting, published, kwargs in _CHATGLM_ROWS}
    for size, name, published in [("65B", "huggyllama/llama-65b", 41), ("33B", "huggyllama/llama-30b", 21),
                                  ("13B", "huggyllama/llama-13b", 10), ("7B", "huggyllama/llama-7b", 6)]:
        deployed = estimate_memory(name, weights="nf4-dq", method="inference", batch_size=1, seq_len=512)
        ratios[f"Guanaco {size} deployed, 4-bit"] = (deployed.total + 2 * lora_parameters(name, 64, "all")) / GIB / published
    # each miss has a cause the lesson explains (section 5); a new miss, or one that comes in, means revisiting it
    assert {setting for setting, ratio in ratios.items() if abs(ratio - 1) > 0.25} == {
        "LoRA r=8, batch 4, FP16",        # 0.74: fixed CUDA/allocator overhead, largest share at the smallest batch
        "P-Tuning p=16, batch 4, FP16",   # 0.74: as above, and the P-Tuning rows fit without checkpointing (below)
        "P-Tuning p=16, batch 4, INT8",   # 0.60
        "P-Tuning p=16, batch 4, INT4",   # 0.58
        "Freeze l=3, batch 4, INT8",      # 1.26: a row the README later removed
        "Guanaco 7B deployed, 4-bit",     # 0.70: about 1.8 GiB of runtime overhead on a 4 GiB model
    }


def test_notebook_14_ptuning_rows_fit_without_checkpointing():
    for setting, published, kwargs in _CHATGLM_ROWS:
        if not setting.startswith("P-Tuning"):
            continue
        with_ckpt = estimate_memory("THUDM/chatglm-6b", **dict(_CHATGLM_V100, **kwargs)).gib() / published
        without = estimate_memory("THUDM/chatglm-6b", **dict(_CHATGLM_V100, **kwargs,
                                                            gradient_checkpointing=False)).gib() / published
        assert abs(without - 1) < abs(with_ckpt - 1), setting  # closer to the published figure
        assert abs(without - 1) < 0.3, setting                  # 1.15, 1.10, 1.25
