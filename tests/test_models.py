"""helpers.models: offline resolution to the stand-in, loading, LoRA targets per family, counting."""
import pytest
import torch
import transformers

from helpers import models
from helpers.models import DEFAULT_MODEL, LORA_TARGET_MODULES, lora_target_modules, resolve_model


def test_default_model_resolves_to_the_standin_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choice = resolve_model()
    assert choice.standin and choice.requested == DEFAULT_MODEL
    assert "HF_HUB_OFFLINE=1" in choice.reason
    assert "NOT Pythia" in str(choice)  # a stand-in is never presented as Pythia


def test_other_hub_models_fail_offline_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="stands in only for EleutherAI/pythia-70m-deduped"):
        resolve_model("bigscience/bloom-7b1")


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_model_name_must_be_a_nonempty_string(bad):
    with pytest.raises(ValueError, match="model name"):
        resolve_model(bad)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(OSError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_cached_real_model_wins_over_the_standin(monkeypatch):
    monkeypatch.setattr(models, "_cached", lambda name: True)
    choice = resolve_model()
    assert not choice.standin and choice.path == DEFAULT_MODEL


def test_standin_is_pythia_shaped_and_generates():
    tokenizer = models.load_tokenizer()
    model = models.load_model(verbose=False)
    config = model.config
    assert config.model_type == "gpt_neox" and config.use_parallel_residual
    assert config.rope_parameters["partial_rotary_factor"] == 0.25  # Pythia's rotary_pct
    assert not config.tie_word_embeddings
    names = {name for name, _ in model.named_modules()}
    for part in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
        assert any(name.endswith(part) for name in names), part
    text = "3 加 4 等于"
    ids = tokenizer(text, return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0]) == text  # byte-level BPE round-trips Chinese
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_bad_load_arguments():
    with pytest.raises(ValueError, match="quantization"):
        models.load_model(quantization="int3")
    with pytest.raises(ValueError, match="head"):
        models.load_model(head="seq2seq")


# Tiny random models of the families transformers ships, to check the target-module table.
TINY = {
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "mistral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
}


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("which", ["attention", "all"])
def test_target_modules_match_real_layers(family, which):
    from peft import LoraConfig, get_peft_model

    config = transformers.AutoConfig.for_model(family, vocab_size=128, **TINY[family])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    targets = lora_target_modules(model, which)
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(targets) <= leaf_names, set(targets) - leaf_names
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    adapted = {name.split(".")[-4] for name, _ in peft_model.named_parameters() if "lora_A" in name}  # …q_proj.lora_A.default.weight
    assert adapted == set(targets)


def test_remote_code_families_are_in_the_table():
    for family in ("chatglm", "baichuan", "qwen"):
        assert lora_target_modules(family, "attention")
    assert set(LORA_TARGET_MODULES) >= set(TINY)


def test_unknown_family_is_rejected_with_the_known_list():
    with pytest.raises(ValueError, match="known: .*gpt_neox"):
        lora_target_modules("t5")
    with pytest.raises(ValueError, match="which"):
        lora_target_modules("gpt_neox", "mlp")


def test_parameter_table_adds_up():
    model = models.load_model(verbose=False)
    table = models.parameter_table(model)
    counts = models.count_parameters(model)
    assert table["parameters"].sum() == counts["total"] == counts["trainable"]
    assert abs(table["share_%"].sum() - 100) < 0.1


def test_a_float16_checkpoint_loads_in_float32_on_a_cpu(tmp_path, tiny_neox):
    # Pythia's Hub checkpoints are stored in float16 and transformers 5 keeps the stored dtype by default; on a CPU
    # the course loads float32 (float16 there is slow, lossy for training, and clashes with float32 adapters).
    tiny_neox().to(torch.float16).save_pretrained(tmp_path / "fp16")
    assert {p.dtype for p in models.load_model(str(tmp_path / "fp16"), verbose=False).parameters()} == {torch.float32}
    kept = models.load_model(str(tmp_path / "fp16"), dtype=torch.float16, verbose=False)  # asked for: kept
    assert {p.dtype for p in kept.parameters()} == {torch.float16}


def test_evaluating_puts_mode_and_padding_back_also_after_an_error():
    model, tokenizer = torch.nn.Linear(2, 2).train(), models.load_tokenizer()
    with models.evaluating(model, tokenizer):
        assert not model.training and tokenizer.padding_side == "left"
    assert model.training and tokenizer.padding_side == "right"
    with pytest.raises(RuntimeError, match="boom"), models.evaluating(model.eval(), tokenizer):
        model.train()  # whatever happens inside, the state from before comes back
        raise RuntimeError("boom")
    assert not model.training and tokenizer.padding_side == "right"


def _recorded_load(monkeypatch, cuda: bool, **load_kwargs):
    """load_model's from_pretrained arguments with torch.cuda.is_available() answering `cuda` (no GPU needed)."""
    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def recording(path, **kwargs):
        seen.update(kwargs)
        return real(path, **{k: v for k, v in kwargs.items() if k != "device_map"})  # built here, on the CPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    model = models.load_model(verbose=False, **load_kwargs)
    return seen, model


def test_with_a_gpu_a_model_loads_straight_onto_it(monkeypatch):
    # A 7B model must never be staged in CPU RAM and then moved: device_map puts every tensor on GPU 0 as it loads.
    # (The model comes back on the CPU here, where there is no GPU; a .to("cuda") after loading would fail.)
    seen, model = _recorded_load(monkeypatch, cuda=True, dtype=torch.bfloat16)
    assert seen["device_map"] == {"": 0} and seen["dtype"] is torch.bfloat16
    assert next(model.parameters()).device.type == "cpu"


def test_on_a_cpu_a_model_loads_as_before(monkeypatch):
    seen, _ = _recorded_load(monkeypatch, cuda=False)
    assert "device_map" not in seen and seen["dtype"] is torch.float32  # float32, no device map
    seen, _ = _recorded_load(monkeypatch, cuda=False, quantization="nf4", compute_dtype=torch.float32)
    assert seen["device_map"] == "cpu" and seen["quantization_config"].bnb_4bit_quant_type == "nf4"


# --- 4-bit weights on AVX512-BF16 CPUs (notebook 04, section 3; moved from the notebook's cell, issue 18) ---------
def _has_avx512bf16() -> bool:
    import bitsandbytes.functional as F

    return bool(F.has_avx512bf16())


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_a_4bit_load_keeps_its_weights_trainable_through_an_evaluation(tiny_neox, tmp_path, quantization):
    # load_model switches bitsandbytes' in-place CPU repacking off on every Linear4bit (keep_cpu_4bit_weights_trainable),
    # so an evaluation forward leaves every 4-bit weight as it was and the model still trains afterwards.
    import bitsandbytes as bnb

    folder = tiny_neox(tmp_path / "tiny")
    model = models.load_model(str(folder), quantization=quantization, verbose=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 8 and {m.weight.quant_state.quant_type for m in layers} == {quantization}
    if not torch.cuda.is_available():
        assert not any(m.support_avx512bf16_for_cpu for m in layers)
    assert models.keep_cpu_4bit_weights_trainable(model) == len(layers)  # and it says how many layers it changed
    before = [m.weight.detach().clone() for m in layers]
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]], device=model.device))
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, before))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


@pytest.mark.skipif(torch.cuda.is_available() or not _has_avx512bf16(),
                    reason="the repacking happens on CPUs with AVX512-BF16 only")
def test_an_unprotected_4bit_layer_repacks_itself_on_an_avx512bf16_cpu():
    # The pitfall the helper exists for (FACTS.md): if bitsandbytes stops repacking, notebook 04's section 3 and
    # keep_cpu_4bit_weights_trainable can be simplified.
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(128, 128, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict(torch.nn.Linear(128, 128).state_dict())
    layer = layer.to("cpu")  # moving a Linear4bit to its device is what quantizes it
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 128))
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
