"""helpers.tuning: what each method trains, finetune on transformers 5, and the train_or_load cache.

A tiny GPT-NeoX (hidden 16, 2 layers) with a 400-token tokenizer trained here keeps every test fast and
independent of the course's stand-in.
"""
import json

import pytest
import torch

from helpers import run_cache, tuning

HIDDEN, LAYERS, HEADS, MLP = 16, 2, 2, 32


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_neox):
    """conftest's tiny GPT-NeoX in this shape, saved with a 400-token tokenizer (bos = eos = 0, pad = 1)."""
    from helpers.data import load_dataset
    from helpers.standin import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-neox")
    corpus = folder / "corpus.txt"
    rows = load_dataset("promptcblue_ctc", split="train")
    corpus.write_text("\n".join(list(rows["input"][:200]) + list(rows["target"])), encoding="utf-8")
    tokenizer = train_tokenizer(corpus, vocab_size=400)
    tiny_neox(folder, tokenizer=tokenizer, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              intermediate_size=MLP, max_position_embeddings=1024)
    corpus.unlink()
    return str(folder)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setattr(run_cache, "cache_root", lambda: root)
    return root


# Small settings shared by the cache tests: the 400-token tokenizer spells Chinese mostly in bytes.
SMALL = {"max_source_length": 1000, "batch_size": 2}


def _logits(model, tokenizer):
    batch = tokenizer(["判断临床试验筛选标准的类别：年龄18至65岁"], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


# --- prepare_model: exact trainable counts -----------------------------------------------------
def _base(tiny_model_dir):
    from helpers.models import load_model

    return load_model(tiny_model_dir, verbose=False)


def test_freeze_trains_only_the_last_layers_mlp(tiny_model_dir):
    model = tuning.prepare_model(_base(tiny_model_dir), "freeze", num_trainable_layers=1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["gpt_neox.layers.1.mlp.dense_h_to_4h.weight", "gpt_neox.layers.1.mlp.dense_h_to_4h.bias",
                     "gpt_neox.layers.1.mlp.dense_4h_to_h.weight", "gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == HIDDEN * MLP + MLP + MLP * HIDDEN + HIDDEN


def test_ptuning_v2_count_matches_the_formula(tiny_model_dir):
    n, hidden = 4, 8
    model = tuning.prepare_model(_base(tiny_model_dir), "ptuning-v2", pre_seq_len=n, prefix_hidden_size=hidden)
    width = LAYERS * 2 * HIDDEN
    expected = n * HIDDEN + (HIDDEN * hidden + hidden) + (hidden * width + width)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected == 4 * 16 + 136 + 8 * 64 + 64
    flat = tuning.prepare_model(_base(tiny_model_dir), "ptuning-v2", pre_seq_len=n, prefix_projection=False)
    assert sum(p.numel() for p in flat.parameters() if p.requires_grad) == n * width == 256


def test_prompt_tuning_and_ptuning_v1_counts_and_the_memory_model(tiny_model_dir):
    """Notebook 05's table of P-Tuning v2's relatives: prompt tuning learns N input embeddings; P-Tuning v1 (peft's
    PromptEncoderConfig, an MLP by default) adds three linear layers of width d; helpers.memory counts P-Tuning v2."""
    import copy

    from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model

    from helpers.memory import prefix_parameters

    n, base = 4, _base(tiny_model_dir)
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    prompt = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    assert trainable(prompt) == n * HIDDEN
    v1 = get_peft_model(copy.deepcopy(base), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                                 encoder_hidden_size=HIDDEN))
    assert trainable(v1) == n * HIDDEN + 3 * (HIDDEN * HIDDEN + HIDDEN)
    for projection in (False, True):
        v2 = tuning.prepare_model(copy.deepcopy(base), "ptuning-v2", pre_seq_len=n, prefix_projection=projection)
        assert trainable(v2) == prefix_parameters(base.config, n, projection, prefix_hidden_size=HIDDEN)


def test_lora_count(tiny_model_dir):
    model = tuning.prepare_model(_base(tiny_model_dir), "lora", lora_r=2)
    # per layer: qkv 16->48, dense 16->16, h_to_4h 16->32, 4h_to_h 32->16; r * (in + out) each
    per_layer = 2 * ((16 + 48) + (16 + 16) + (16 + 32) + (32 + 16))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == LAYERS * per_layer == 768


def test_modules_to_save_takes_the_head_only_by_its_current_name(tiny_neox):
    """Notebook 01: GPT-NeoX's output head is `lm_head` in transformers 5 (it was `embed_out`). modules_to_save with
    the current name trains a full copy of the head; with the old name peft silently adds nothing."""
    import copy

    from peft import LoraConfig, get_peft_model

    from helpers.models import count_parameters, lora_target_modules

    base = tiny_neox()
    targets = lora_target_modules(base, "all")

    def trainable(**extra):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=targets, **extra))
        return count_parameters(model)["trainable"]

    adapters = trainable()
    assert trainable(modules_to_save=["lm_head"]) - adapters == base.lm_head.weight.numel()
    assert trainable(modules_to_save=["embed_out"]) == adapters


def test_bad_inputs_are_named(tiny_model_dir):
    with pytest.raises(ValueError, match="method must be one of"):
        tuning.prepare_model(_base(tiny_model_dir), "adapter")
    with pytest.raises(ValueError, match=r"num_trainable_layers must be in 1\.\.2, got 3"):
        tuning.prepare_model(_base(tiny_model_dir), "freeze", num_trainable_layers=3)


# --- finetune ------------------------------------------------------------------------------------
def test_finetune_runs_on_transformers_5_with_group_by_length(tiny_model_dir, tmp_path):
    from helpers.data import load_dataset
    from helpers.models import load_tokenizer
    from helpers.prompts import tokenize_dataset

    tokenizer = load_tokenizer(tiny_model_dir)
    rows = load_dataset("promptcblue_ctc", split="train").select(range(16))
    data = tokenize_dataset(rows, tokenizer, "promptcblue", 1000, 16)
    result = tuning.finetune("lora", data, output_dir=tmp_path / "run", model_name=tiny_model_dir, max_steps=2,
                             batch_size=4, logging_steps=1, group_by_length=True)
    assert result.steps == 2 and len(result.losses) == 2
    assert result.trainable == 768 * 4 and 0 < result.trainable_share_pct < 100  # r=8: four times r=2
    assert result.tokens_per_second > 0 and result.seconds_per_step > 0


def test_finetune_marks_checkpoints_and_resumes_from_the_latest_complete_one(tiny_model_dir, tmp_path):
    from helpers.checkpoints import complete_checkpoints
    from helpers.data import load_dataset
    from helpers.models import load_tokenizer
    from helpers.prompts import tokenize_dataset

    tokenizer = load_tokenizer(tiny_model_dir)
    data = tokenize_dataset(load_dataset("promptcblue_ctc", split="train").select(range(16)), tokenizer,
                            "promptcblue", 1000, 16)
    run = dict(output_dir=tmp_path / "run", model_name=tiny_model_dir, batch_size=4, logging_steps=1,
               save_steps=2, max_grad_norm=0.3)
    first = tuning.finetune("lora", data, max_steps=4, **run)
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["checkpoint-2", "checkpoint-4"]
    # As if killed while writing checkpoint-4: no marker, no optimizer state. Resuming from it would crash.
    (tmp_path / "run" / "checkpoint-4" / "checkpoint_complete.json").unlink()
    (tmp_path / "run" / "checkpoint-4" / "optimizer.pt").unlink()
    resumed = tuning.finetune("lora", data, max_steps=4, resume_from_checkpoint=True, **run)
    assert resumed.steps == 4
    assert resumed.losses == pytest.approx(first.losses, abs=1e-6)  # steps 3-4 retrained from checkpoint-2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        tuning.finetune("lora", data, max_steps=4, resume_from_checkpoint=True,
                        **dict(run, output_dir=tmp_path / "empty"))


def test_finetune_rejects_untokenized_data(tmp_path):
    from helpers.data import load_dataset

    with pytest.raises(ValueError, match="must be tokenized"):
        tuning.finetune("lora", load_dataset("promptcblue_ctc", split="dev"), output_dir=tmp_path)


# --- train_or_load -------------------------------------------------------------------------------
def test_cache_key_counts_effective_arguments(tiny_model_dir):
    name, described = run_cache.cache_key("lora", max_steps=2, model_name=tiny_model_dir, **SMALL)
    assert name.startswith("lora-") and len(name) == len("lora-") + 12
    assert described["arguments"]["learning_rate"] == tuning.DEFAULT_LR["lora"]
    same = run_cache.cache_key("lora", max_steps=2, model_name=tiny_model_dir, lora_r=8,
                            learning_rate=tuning.DEFAULT_LR["lora"], **SMALL)[0]
    assert same == name  # spelling out a default is the same run
    for change in ({"max_steps": 3}, {"seed": 1}, {"lora_r": 4}, {"max_target_length": 8}):
        assert run_cache.cache_key("lora", **{"max_steps": 2, "model_name": tiny_model_dir, **SMALL, **change})[0] != name
    assert run_cache.cache_key("freeze", max_steps=2, model_name=tiny_model_dir, **SMALL)[0].startswith("freeze-")


def test_train_or_load_rejects_bad_arguments(tiny_model_dir, cache):
    with pytest.raises(ValueError, match="method must be one of"):
        run_cache.train_or_load("prefix", max_steps=1)
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        run_cache.train_or_load("lora", max_steps=0)
    with pytest.raises(ValueError, match=r"chooses \['output_dir'\]"):
        run_cache.train_or_load("lora", max_steps=1, output_dir="x")
    with pytest.raises(ValueError, match=r"unknown arguments \['lora_rank'\]"):
        run_cache.train_or_load("lora", max_steps=1, lora_rank=8)
    assert not cache.exists()


def test_train_or_load_trains_once_then_loads(tiny_model_dir, cache, monkeypatch):
    model, tokenizer, info = run_cache.train_or_load("lora", max_steps=2, seed=3, model_name=tiny_model_dir, **SMALL)
    folder = cache / info["name"]
    assert info["from_cache"] is False and info["path"] == str(folder)
    assert sorted(p.name for p in (folder / "model").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in cache.iterdir()] == [info["name"]]  # no temporary folder left behind
    saved = json.loads((folder / "info.json").read_text())
    assert saved["steps"] == 2 and saved["weights"] == ["model/adapter_model.safetensors"]
    assert saved["trainable"] == info["row"]["trainable"] == 768 * 4
    first = _logits(model, tokenizer)

    def no_training(*args, **kwargs):
        raise AssertionError("train_or_load trained again instead of loading the saved run")

    monkeypatch.setattr(run_cache, "_tokenized_train_split", no_training)
    again, tokenizer2, info2 = run_cache.train_or_load("lora", max_steps=2, seed=3, model_name=tiny_model_dir, **SMALL)
    assert info2["from_cache"] is True and info2["path"] == info["path"]
    assert info2["seconds_per_step"] == info["seconds_per_step"]  # the measurements travel with the run
    assert torch.equal(_logits(again, tokenizer2), first)


def test_a_reloaded_lora_adapter_trains_only_when_asked(tiny_model_dir, cache):
    """Notebook 06, section 2: resuming a LoRA checkpoint needs is_trainable=True; peft loads adapters frozen."""
    from peft import PeftModel

    _, _, info = run_cache.train_or_load("lora", max_steps=1, model_name=tiny_model_dir, **SMALL)
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert trainable(PeftModel.from_pretrained(_base(tiny_model_dir), info["path"] + "/model")) == 0
    resumed = PeftModel.from_pretrained(_base(tiny_model_dir), info["path"] + "/model", is_trainable=True)
    assert trainable(resumed) == info["trainable"] == 768 * 4


def test_whole_model_methods_save_safetensors_and_reload_identically(tiny_model_dir, cache):
    model, tokenizer, info = run_cache.train_or_load("full", max_steps=1, model_name=tiny_model_dir, **SMALL)
    files = sorted(p.name for p in (cache / info["name"] / "model").iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    assert info["trainable_share_pct"] == 100.0
    again, tokenizer2, info2 = run_cache.train_or_load("full", max_steps=1, model_name=tiny_model_dir, **SMALL)
    assert info2["from_cache"] and torch.equal(_logits(again, tokenizer2), _logits(model, tokenizer))


def test_ptuning_v2_saves_the_table_not_the_mlp(tiny_model_dir, cache):
    from safetensors.torch import load_file

    _, _, info = run_cache.train_or_load("ptuning-v2", max_steps=1, model_name=tiny_model_dir, pre_seq_len=4, **SMALL)
    saved = load_file(f"{info['path']}/model/adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"prompt_embeddings": (4, LAYERS * 2 * HIDDEN)}


def test_half_written_run_is_not_taken(tiny_model_dir, cache):
    name, _ = run_cache.cache_key("lora", max_steps=1, model_name=tiny_model_dir, **SMALL)
    (cache / name / "model").mkdir(parents=True)  # a crash before info.json was written
    _, _, info = run_cache.train_or_load("lora", max_steps=1, model_name=tiny_model_dir, **SMALL)
    assert info["from_cache"] is False and (cache / name / "info.json").is_file()
    with pytest.raises(FileNotFoundError, match="not a complete train_or_load run"):
        run_cache.load_cached_run(cache / "lora-000000000000")


def test_expected_training_time_changes_nothing_in_the_run(tiny_model_dir, capsys):
    """The estimate before a run measures a step and restores the random state and the gradients."""
    from helpers.models import load_tokenizer
    from helpers.prompts import collator, tokenize_prompt_response

    tokenizer = load_tokenizer(tiny_model_dir)
    model = tuning.prepare_model(_base(tiny_model_dir), "lora", lora_dropout=0.5)
    batch = collator(tokenizer)([tokenize_prompt_response(tokenizer, "年龄18至65岁\n答：", "年龄")] * 2)
    torch.manual_seed(3)
    per_step = tuning.expected_training_time(model, batch, steps=100, gradient_accumulation_steps=2)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3))  # the dropout draws were given back
    assert per_step > 0 and all(p.grad is None for p in model.parameters())
    assert capsys.readouterr().out.startswith("expected: 100 steps x ")


def test_finetune_announcing_its_time_trains_exactly_the_same(tiny_model_dir, tmp_path, capsys):
    from helpers.data import load_dataset
    from helpers.models import load_tokenizer
    from helpers.prompts import tokenize_dataset

    tokenizer = load_tokenizer(tiny_model_dir)
    data = tokenize_dataset(load_dataset("promptcblue_ctc", split="train").select(range(8)), tokenizer,
                            "promptcblue", 1000, 16)
    runs = [tuning.finetune("lora", data, output_dir=tmp_path / str(announce), model_name=tiny_model_dir,
                            max_steps=2, batch_size=4, logging_steps=1, announce=announce) for announce in (False, True)]
    assert runs[0].losses == runs[1].losses
    assert "expected: 2 steps x " in capsys.readouterr().out


def test_the_comparison_arguments_are_notebook_03s_and_make_one_cache_key():
    import json

    from helpers.env import REPO_ROOT

    arguments = run_cache.comparison_arguments(smoke=True)
    assert arguments["max_steps"] == run_cache.comparison_steps(True) and arguments["seed"] == run_cache.COMPARISON_SEED
    config = "".join(json.loads((REPO_ROOT / "notebooks" / "06_comparing_methods.ipynb").read_text())["cells"][5]["source"])
    for key, value in run_cache.COMPARISON.items():  # notebook 06's configuration cell shows the same values
        assert f'"{key}": {json.dumps(value)}' in config, key
    assert run_cache.cache_key("lora", **arguments)[0].startswith("lora-")


def test_train_or_load_resolves_the_model_once_per_call(tiny_model_dir, cache, monkeypatch):
    from helpers import models

    calls, resolve = [], models.resolve_model
    counting = lambda *args, **kwargs: calls.append(args) or resolve(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(models, "resolve_model", counting)     # what load_model and load_tokenizer call
    monkeypatch.setattr(run_cache, "resolve_model", counting)  # what train_or_load calls
    run_cache.train_or_load("lora", max_steps=1, model_name=tiny_model_dir, **SMALL)  # trains, saves, loads back
    assert len(calls) == 1, calls
    calls.clear()
    assert run_cache.train_or_load("lora", max_steps=1, model_name=tiny_model_dir, **SMALL)[2]["from_cache"]
    assert len(calls) == 1, calls
