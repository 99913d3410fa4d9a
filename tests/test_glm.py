"""GLM-4 (transformers' GlmForCausalLM) with peft's prefix tuning; recipes/05_glm_ptuning.py on a tiny random GLM."""
import copy
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from helpers.env import REPO_ROOT
from helpers.standin import TINY_GLM, build_tiny_glm
from helpers.tuning import repair_prefix_generation

RECIPE = REPO_ROOT / "recipes" / "05_glm_ptuning.py"
DATA = REPO_ROOT / "data" / "promptcblue_ctc" / "train.json"
PROMPT = "请对下面这条临床试验入组或排除条件进行分类。\n经临床诊断为肝硬化\n答："


@pytest.fixture(scope="module")
def tiny_glm(tmp_path_factory):
    return build_tiny_glm(tmp_path_factory.mktemp("glm") / "tiny-glm")


def test_tiny_glm_is_grouped_query_and_reproducible(tiny_glm, tmp_path):
    config = AutoModelForCausalLM.from_pretrained(tiny_glm).config
    assert config.model_type == "glm" and config.num_key_value_heads < config.num_attention_heads
    assert {key: getattr(config, key) for key in TINY_GLM} == TINY_GLM
    again = build_tiny_glm(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny_glm / "model.safetensors").read_bytes()


def test_peft_prefix_on_glm_holds_the_key_value_heads(tiny_glm):
    """peft 0.21 sizes the prefix by num_key_value_heads x head_dim (grouped-query attention), and its logits
    equal those of the same prefix handed to the model by hand as a cache of that shape."""
    base = AutoModelForCausalLM.from_pretrained(tiny_glm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_glm)
    cfg, n = base.config, 4
    model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)).eval()
    kv_width = cfg.num_key_value_heads * cfg.head_dim   # 2 x 16 = 32, not hidden_size 64
    peft_config = model.peft_config["default"]
    assert (peft_config.num_attention_heads, peft_config.token_dim) == (cfg.num_key_value_heads, kv_width)
    table = model.prompt_encoder["default"].embedding.weight
    assert tuple(table.shape) == (n, cfg.num_hidden_layers * 2 * kv_width)

    enc = tokenizer([PROMPT], return_tensors="pt")
    kv = table.detach().view(n, cfg.num_hidden_layers * 2, cfg.num_key_value_heads, cfg.head_dim).permute(1, 2, 0, 3)
    cache = DynamicCache([(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(cfg.num_hidden_layers)])
    with torch.no_grad():
        by_hand = base(input_ids=enc["input_ids"], past_key_values=cache,
                       attention_mask=torch.cat([torch.ones(1, n, dtype=torch.long), enc["attention_mask"]], 1)).logits
        with_peft = model(**enc).logits
        plain = base(**enc).logits
    assert torch.allclose(by_hand, with_peft, atol=1e-5)
    assert not torch.allclose(plain, with_peft, atol=1e-3)   # the prefix changes what the model computes


def run_recipe(tmp_path, model_dir, **overrides):
    """Execute the recipe as the notebook does: its own text, with some top-level assignments replaced."""
    source = RECIPE.read_text(encoding="utf-8")
    values = {"MODEL": str(model_dir), "DATA": str(DATA), "OUTPUT_DIR": str(tmp_path / "run"), **overrides}
    for name, value in values.items():
        source, found = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, count=1, flags=re.M)
        assert found == 1, name
    namespace = {}
    exec(compile(source, str(RECIPE), "exec"), namespace)
    return namespace


def test_recipe_trains_saves_resumes_and_reloads(tiny_glm, tmp_path):
    out = tmp_path / "run"
    done = run_recipe(tmp_path, tiny_glm, MAX_STEPS=4, SAVE_STEPS=2)
    losses = [entry["loss"] for entry in done["trainer"].state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    uninterrupted = load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]
    assert tuple(uninterrupted.shape) == (128, TINY_GLM["num_hidden_layers"] * 2 * 2 * TINY_GLM["head_dim"])

    # A run stopped after step 2, with a checkpoint folder that was being written (no trainer_state.json):
    shutil.rmtree(out / "checkpoint-4")
    (out / "adapter_model.safetensors").unlink()
    (out / "checkpoint-3").mkdir()
    resumed = run_recipe(tmp_path, tiny_glm, MAX_STEPS=4, SAVE_STEPS=2)
    assert resumed["resume"] == str(out / "checkpoint-2")
    assert (out / "checkpoint-3").is_dir()  # skipped, not deleted: nothing already written is lost
    assert torch.equal(load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"], uninterrupted)

    # The saved prefix reloads, and generate sees it once repaired (notebook 05, section 1).
    tokenizer = AutoTokenizer.from_pretrained(out)
    glm = repair_prefix_generation(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_glm), str(out)))
    enc = tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        forward = glm.eval()(**enc).logits[0, -1]
        scores = glm.generate(**enc, max_new_tokens=2, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id).scores[0][0]
    assert (forward - scores).abs().max().item() < 1e-4


def test_recipe_lora_on_glm(tiny_glm, tmp_path):
    run_recipe(tmp_path, tiny_glm, MAX_STEPS=1, METHOD="lora")
    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    targets = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in saved}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_recipe_refuses_checkpointing_with_prefix_tuning(tiny_glm, tmp_path):
    with pytest.raises(ValueError, match="gradient checkpointing"):
        run_recipe(tmp_path, tiny_glm, MAX_STEPS=1, GRADIENT_CHECKPOINTING=True)
