"""Clear on bad input: every public helper that takes a path, a dataset name, a model name, a configuration
or a prompt rejects an invalid value with an error that says what was wrong and what is allowed.

One test per case. Models are a tiny random GPT-NeoX (tests/conftest.py), so nothing waits for
the course's stand-in. The fuzz test at the end feeds byte-level corruptions of the course's own data
files through `load_dataset` and on to `tokenize_dataset` (tests/test_data.py fuzzes the JSON structure).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from helpers.data import DataFormatError, load_dataset
from helpers.env import REPO_ROOT, output_dir
from helpers.models import load_model, load_tokenizer, lora_target_modules, resolve_model
from helpers.prompts import (collator, prompt_and_response, tokenize_conversation, tokenize_dataset,
                             tokenize_prompt_response)

from _tiny import tiny_dataset, tiny_tokenizer  # tests/_tiny.py; the model is conftest's `tiny_model_dir`


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# --- paths -------------------------------------------------------------------------------------------

def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such data file .*registered dataset: promptcblue_ctc"):
        load_dataset(str(tmp_path / "mine.jsonl"), format="alpaca")


def test_own_data_file_without_a_format(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    with pytest.raises(ValueError, match="pass format=.*one of: promptcblue, alpaca"):
        load_dataset(str(path))


@pytest.mark.parametrize("name", ["/no/such/model", "./my-model", "outputs/02_lora_training/merged"])
def test_missing_model_folder(name):
    with pytest.raises(FileNotFoundError, match=r"no such model folder .*Hub id.*'namespace/name'"):
        resolve_model(name)


def test_model_path_that_is_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(OSError, match="is a file; a model is a folder holding config.json"):
        resolve_model(str(tmp_path / "model.safetensors"))


def test_model_folder_without_config(tmp_path):
    with pytest.raises(OSError, match="no config.json: not a saved Hugging Face model"):
        load_model(str(tmp_path), verbose=False)


def test_model_folder_without_weights(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(OSError, match="no \\*.safetensors weights"):
        load_model(str(tmp_path), verbose=False)


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".", 3])
def test_output_dir_takes_a_plain_folder_name(name):
    with pytest.raises((ValueError, TypeError), match="output_dir name must be a"):
        output_dir(name)


def test_missing_checkpoint_folder(tmp_path):
    from helpers.checkpoints import IncompleteCheckpointError, check_checkpoint, latest_complete_checkpoint

    with pytest.raises(IncompleteCheckpointError, match="no such checkpoint folder"):
        check_checkpoint(tmp_path / "checkpoint-10")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(IncompleteCheckpointError, match="expected a name like checkpoint-<step>"):
        check_checkpoint(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="expected the Trainer's output_dir"):
        latest_complete_checkpoint(tmp_path / "nowhere")


def test_missing_adapter_folder(tmp_path, tiny_model_dir):
    from helpers.export import merge_and_save

    with pytest.raises(FileNotFoundError, match="not a saved peft adapter .*save_pretrained"):
        merge_and_save(str(tiny_model_dir), tmp_path / "no-adapter", tmp_path / "merged")


def test_missing_predictions_file(tmp_path):
    from helpers.generation import read_predictions

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_predictions(tmp_path / "nope.jsonl")


# --- dataset names -------------------------------------------------------------------------------------

def test_unknown_dataset_suggests_the_closest_and_lists_all():
    with pytest.raises(ValueError, match=r"unknown dataset 'alpaca_fr'. Did you mean 'alpaca_zh'\? Known datasets: "
                                         r"promptcblue_ctc, alpaca_zh"):
        load_dataset("alpaca_fr")


def test_unknown_split_lists_the_splits():
    with pytest.raises(ValueError, match="has no split 'validation'; it has: train, dev, test"):
        load_dataset("promptcblue_ctc", split="validation")


def test_datasets_of_different_formats_cannot_be_mixed():
    with pytest.raises(ValueError, match=r"different formats: alpaca_zh \(alpaca\), conversations \(conversation\)"):
        load_dataset("alpaca_zh,conversations")


def test_unknown_dataset_in_train_or_load():
    from helpers.run_cache import train_or_load

    with pytest.raises(ValueError, match="unknown dataset 'ctc'.*Known datasets"):
        train_or_load("lora", dataset="ctc", max_steps=1)


# --- model names and families -----------------------------------------------------------------------------

def test_hub_model_that_cannot_be_had_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="cannot be loaded: HF_HUB_OFFLINE=1 .*stands in only for "
                                      "EleutherAI/pythia-70m-deduped; use that name, a local folder"):
        resolve_model("meta-llama/Llama-2-7b-hf")


def test_unknown_model_family_for_lora_targets():
    with pytest.raises(ValueError, match=r"no LoRA target modules known for model family 't5'; known: baichuan, "
                                         r".*gpt_neox.*target_modules='all-linear'"):
        lora_target_modules("t5")


def test_lora_targets_of_something_that_is_not_a_model():
    with pytest.raises(TypeError, match="takes a model .* or a model type such as 'gpt_neox', got int"):
        lora_target_modules(42)


def test_lora_target_group_must_be_attention_or_all():
    with pytest.raises(ValueError, match="which must be 'attention' or 'all', got 'mlp'"):
        lora_target_modules("gpt_neox", "mlp")


def test_lora_target_names_that_match_nothing(tiny_model_dir):
    from helpers.tuning import prepare_model

    model = load_model(str(tiny_model_dir), verbose=False)
    # peft says what was wrong (the names); it does not list what the model has: see the report.
    with pytest.raises(ValueError, match=r"Target modules \{'q_proj'\} not found in the base model"):
        prepare_model(model, "lora", target_modules=["q_proj"])


def test_lora_targets_that_are_not_linear_layers_in_a_memory_estimate(tiny_model_dir):
    from transformers import AutoConfig

    from helpers.memory import lora_parameters

    with pytest.raises(ValueError, match=r"\['q_proj'\] are not linear layers of this model; it has "
                                         r"\['query_key_value', 'dense'"):
        lora_parameters(AutoConfig.from_pretrained(tiny_model_dir), targets=["q_proj"])


# --- configurations ---------------------------------------------------------------------------------------

def test_unknown_quantization():
    with pytest.raises(ValueError, match="quantization must be None, 'nf4', 'fp4' or 'int8', got 'int3'"):
        load_model(quantization="int3")


def test_unknown_head():
    with pytest.raises(ValueError, match=r"head must be one of \['causal-lm', 'sequence-classification'\]"):
        load_model(head="seq2seq")


def test_num_labels_must_be_positive(tiny_model_dir):
    with pytest.raises(ValueError, match="num_labels must be a positive integer .*got 0"):
        load_model(str(tiny_model_dir), head="sequence-classification", num_labels=0, verbose=False)


def test_padding_side_must_be_left_or_right():
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        load_tokenizer(padding_side="middle")


def test_4bit_where_bitsandbytes_cannot_run(tiny_model_dir, monkeypatch):
    # As on a machine without a usable bitsandbytes: importing it fails.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(RuntimeError, match=r"quantization='nf4' needs bitsandbytes, which cannot run here "
                                           r"\((ModuleNotFound|Import)Error.*Load without quantization, or run on a CUDA GPU"):
        load_model(str(tiny_model_dir), quantization="nf4", verbose=False)


def test_unknown_training_method():
    from helpers.tuning import finetune

    with pytest.raises(ValueError, match=r"method must be one of \('lora', 'qlora', 'ptuning-v2', 'freeze', 'full'\)"):
        finetune("sft", tiny_dataset(4), output_dir="unused")


def test_untokenized_dataset_for_finetune():
    from helpers.tuning import finetune

    with pytest.raises(ValueError, match="must be tokenized .*tokenize_dataset.*missing"):
        finetune("lora", load_dataset("alpaca_en"), output_dir="unused")


def test_freeze_layers_out_of_range(tiny_model_dir):
    from helpers.tuning import prepare_model

    with pytest.raises(ValueError, match=r"num_trainable_layers must be in 1..2, got 5"):
        prepare_model(load_model(str(tiny_model_dir), verbose=False), "freeze", num_trainable_layers=5)


def test_unknown_train_or_load_argument():
    from helpers.run_cache import cache_key

    with pytest.raises(ValueError, match=r"unknown arguments \['lora_rank'\]; it accepts those of finetune"):
        cache_key("lora", max_steps=2, lora_rank=4)


@pytest.mark.parametrize("value", [0, -1, 2.5, "64", True])
def test_token_lengths_must_be_positive_whole_numbers(tokenizer, value):
    with pytest.raises((ValueError, TypeError), match="max_source_length must be"):
        tokenize_prompt_response(tokenizer, "t3 t4", "t5", max_source_length=value)


def test_dev_ratio_out_of_range():
    with pytest.raises(ValueError, match=r"dev_ratio must be between 0 and 1 \(exclusive\), got 1.5"):
        load_dataset("alpaca_en", dev_ratio=1.5)


def test_memory_estimate_with_an_unknown_weight_format():
    from helpers.memory import estimate_memory

    with pytest.raises(ValueError, match=r"weights must be one of \['fp32', 'fp16', 'bf16'"):
        estimate_memory(70_000_000, weights="fp3")


def test_server_refuses_a_public_address():
    from helpers.serving import check_loopback

    with pytest.raises(ValueError, match="not a loopback address; this server has no authentication"):
        check_loopback("0.0.0.0")


def test_ppo_config_checks_its_values():
    from helpers.ppo import PPOConfig

    with pytest.raises(ValueError, match=r"PPOConfig\.\w+ must be"):
        PPOConfig(kl_coef=-1.0)


def test_metric_language_must_be_known():
    from helpers.metrics import corpus_scores

    with pytest.raises(ValueError, match=r"lang must be one of \('zh', 'en'\), got 'fr'"):
        corpus_scores(["a"], ["a"], lang="fr")


# --- prompts ------------------------------------------------------------------------------------------------

def test_max_source_length_below_the_prompt_length(tokenizer):
    with pytest.raises(ValueError, match="prompt is 4 tokens, more than max_source_length=3: raise max_source_length"):
        tokenize_prompt_response(tokenizer, "t3 t4 t5 t6", "t7", max_source_length=3)


def test_max_source_length_below_a_prompt_of_the_dataset(tokenizer):
    import datasets

    rows = datasets.Dataset.from_list([{"input": "t3", "target": "t4"}, {"input": "t3 t4 t5 t6 t7", "target": "t4"}])
    with pytest.raises(ValueError, match="prompt is 5 tokens, more than max_source_length=4"):
        tokenize_dataset(rows, tokenizer, "promptcblue", max_source_length=4)


def test_max_length_that_cuts_off_every_response(tokenizer):
    turns = [{"human": "t3 t4 t5 t6", "assistant": "t7"}]
    with pytest.raises(ValueError, match="max_length=4 cuts the conversation before its first response, which "
                                         "starts at token 6"):
        tokenize_conversation(tokenizer, turns, max_length=4)
    assert tokenize_conversation(tokenizer, turns, max_length=7)["labels"][-1] != -100  # one trained token is enough


def test_conversation_that_is_not_a_list_of_turns(tokenizer):
    with pytest.raises(TypeError, match="turns must be a list of"):
        tokenize_conversation(tokenizer, "t3 t4")
    with pytest.raises(TypeError, match=r"turn 0\['assistant'\] must be a string, got NoneType"):
        tokenize_conversation(tokenizer, [{"human": "t3", "assistant": None}])


def test_example_missing_a_column_of_its_format():
    with pytest.raises(ValueError, match="an alpaca example needs columns instruction, output; missing output "
                                         r"\(it has: instruction, input\)"):
        prompt_and_response({"instruction": "i", "input": ""}, "alpaca")


def test_unknown_prompt_format(tokenizer):
    import datasets

    rows = datasets.Dataset.from_list([{"text": "t3 t4"}])
    with pytest.raises(ValueError, match="supports formats promptcblue, alpaca, preference, conversation, got 'text'"):
        tokenize_dataset(rows, tokenizer, "text")


def test_dataset_without_the_columns_of_its_format(tokenizer):
    import datasets

    rows = datasets.Dataset.from_list([{"question": "t3", "answer": "t4"}])
    with pytest.raises(ValueError, match="a promptcblue dataset needs columns input, target; missing input, target "
                                         r"\(it has: question, answer\)"):
        tokenize_dataset(rows, tokenizer, "promptcblue")


def test_collator_needs_a_pad_token(tokenizer):
    bare = tiny_tokenizer()
    bare.pad_token = None
    with pytest.raises(ValueError, match="no pad token.*set tokenizer.pad_token"):
        collator(bare)


def test_generate_takes_a_list_of_prompts(tiny_model_dir, tokenizer):
    from helpers.generation import generate

    with pytest.raises(TypeError, match="generate takes a list of prompts; wrap a single prompt in a list"):
        generate(load_model(str(tiny_model_dir), verbose=False), tokenizer, "t3 t4")


def test_chat_message_must_not_be_empty(tokenizer):
    from helpers.chat import conversation_prompt_ids

    with pytest.raises(ValueError, match="the message must be a non-empty string"):
        conversation_prompt_ids(tokenizer, [], "")


# --- fuzz: corrupted bytes of the course's own files ---------------------------------------------------------

FUZZ_SOURCES = {  # format: a file of the course in that format
    "promptcblue": "data/promptcblue_ctc/dev.json",
    "alpaca": "data/alpaca_en.json",
    "conversation": "data/conversations.jsonl",
    "preference": "data/preference_pairs.jsonl",
    "text": "data/corpus.txt",
}
TOKENIZE = {"promptcblue": dict(max_source_length=512, max_target_length=16), "alpaca": {}, "preference": {},
            "conversation": dict(max_length=512)}


def _head(path: Path, fmt: str) -> bytes:
    """The first few records of a course file, in its own layout (a JSON array stays an array)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.dumps(json.loads(text)[:4], ensure_ascii=False, indent=2).encode()
    return "".join(line + "\n" for line in text.splitlines()[:4]).encode()


def _corrupt(rng: random.Random, data: bytes) -> bytes:
    action = rng.choice(["flip", "insert", "delete", "truncate", "invalid-utf8", "nul", "bom", "crlf", "duplicate",
                         "empty"])
    at = rng.randrange(len(data) + 1)
    if action == "flip" and data:
        at = min(at, len(data) - 1)
        return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
    if action == "insert":
        return data[:at] + rng.choice([b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"\n", b"\t", b"null",
                                       "中".encode()]) + data[at:]
    if action == "delete":
        return data[:at] + data[at + rng.randrange(1, 8):]
    if action == "truncate":
        return data[:at]
    if action == "invalid-utf8":
        return data[:at] + rng.choice([b"\xff", b"\xc3", b"\xe4\xb8", b"\xed\xa0\x80"]) + data[at:]
    if action == "nul":
        return data[:at] + b"\x00" + data[at:]
    if action == "bom":
        return b"\xef\xbb\xbf" + data
    if action == "crlf":
        return data.replace(b"\n", b"\r\n")
    if action == "duplicate":
        return data + data
    return b""


def test_fuzzed_data_files_are_rejected_with_file_and_line_or_load_cleanly(tmp_path, tokenizer):
    rng = random.Random(2024)
    heads = {fmt: _head(REPO_ROOT / rel, fmt) for fmt, rel in FUZZ_SOURCES.items()}
    outcomes = {"accepted": 0, "rejected": 0}
    for trial in range(150):
        fmt = rng.choice(sorted(heads))
        data = _corrupt(rng, heads[fmt])
        path = tmp_path / f"fuzz{trial}{Path(FUZZ_SOURCES[fmt]).suffix}"
        path.write_bytes(data)
        case = f"trial {trial} ({fmt}): {data[:300]!r}"
        try:
            rows = load_dataset(str(path), format=fmt)
        except DataFormatError as error:
            assert str(error).startswith(f"{path}, line {error.line}"), case
            assert 1 <= error.line <= data.count(b"\n") + 1, case
            outcomes["rejected"] += 1
            continue
        except Exception as error:  # anything else is a failure of the loader, not of the file
            pytest.fail(f"{case}\nraised {type(error).__name__}: {error}")
        outcomes["accepted"] += 1
        assert len(rows) >= 1, case
        if fmt != "text":  # what loaded must also tokenize: nothing malformed reaches training
            features = tokenize_dataset(rows, tokenizer, fmt, **TOKENIZE[fmt])
            assert all(any(label != -100 for label in row) for row in features["labels"]), case
    assert outcomes["accepted"] >= 10 and outcomes["rejected"] >= 40, outcomes


def test_generate_rejects_a_batch_size_below_one():
    from helpers.generation import generate

    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        generate(None, None, ["问："], batch_size=0)


def test_choice_accuracy_rejects_single_strings():
    from helpers.generation import choice_accuracy

    with pytest.raises(TypeError, match="two lists of strings"):
        choice_accuracy("年龄", "年龄")


def test_ptuning_needs_at_least_one_virtual_token():
    from helpers.models import load_model
    from helpers.tuning import prepare_model

    with pytest.raises(ValueError, match="pre_seq_len"):
        prepare_model(load_model(verbose=False), "ptuning-v2", pre_seq_len=0)
