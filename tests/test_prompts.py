"""helpers.prompts: the label mask (loss on the response only), the multi-turn format, the collator."""
import pytest

from helpers.models import load_tokenizer
from helpers.prompts import (IGNORE_INDEX, alpaca_prompt, collator, prompt_and_response, show_label_mask,
                             tokenize_conversation, tokenize_prompt_response)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_prompt_tokens_are_masked_and_response_plus_eos_trained(tokenizer):
    prompt, response = "判断类别：年龄在18至65岁之间\n答：", "年龄"
    features = tokenize_prompt_response(tokenizer, prompt, response)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n_response = len(tokenizer(response, add_special_tokens=False)["input_ids"])
    assert features["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert features["labels"][n_prompt:] == features["input_ids"][n_prompt:]
    assert features["input_ids"][-1] == tokenizer.eos_token_id
    assert len(features["input_ids"]) == n_prompt + n_response + 1
    assert tokenizer.decode(features["input_ids"][n_prompt:-1]) == response


def test_prompt_longer_than_max_source_length_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="max_source_length=2"):
        tokenize_prompt_response(tokenizer, "一个很长的问题是什么", "答", max_source_length=2)


def test_target_is_cut_but_keeps_eos(tokenizer):
    features = tokenize_prompt_response(tokenizer, "问：", "a long answer with many words", max_target_length=3)
    trained = [t for t in features["labels"] if t != IGNORE_INDEX]
    assert len(trained) == 3 and trained[-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="at least 1"):
        tokenize_prompt_response(tokenizer, "问：", "答", max_target_length=0)


def test_conversation_trains_only_the_assistant_turns(tokenizer):
    turns = [{"human": "3 加 4 等于多少？", "assistant": "等于 7。"}, {"human": "再加 2 呢？", "assistant": "等于 9。"}]
    features = tokenize_conversation(tokenizer, turns)
    trained = tokenizer.decode([t for t in features["labels"] if t != IGNORE_INDEX])
    eos = tokenizer.eos_token
    assert trained == f"等于 7。{eos}等于 9。{eos}"
    assert features["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(features["input_ids"]) == f"{tokenizer.bos_token}3 加 4 等于多少？{eos}等于 7。{eos}再加 2 呢？{eos}等于 9。{eos}"
    with pytest.raises(ValueError, match="at least one turn"):
        tokenize_conversation(tokenizer, [])
    with pytest.raises(ValueError, match="turn 0 needs keys"):
        tokenize_conversation(tokenizer, [{"user": "hi"}])


def test_show_label_mask_marks_spans(tokenizer):
    shown = show_label_mask(tokenizer, tokenize_prompt_response(tokenizer, "问：1 加 1？\n答：", "2"))
    assert shown.startswith("[masked: 问：1 加 1？\\n答：]") and "«trained: 2" in shown


def test_collator_pads_dynamically_with_ignored_labels(tokenizer):
    short = tokenize_prompt_response(tokenizer, "问：", "好")
    long = tokenize_prompt_response(tokenizer, "问：这是一个更长的问题吗？", "是的，更长。")
    batch = collator(tokenizer)([short, long])
    assert batch["input_ids"].shape[1] == len(long["input_ids"])  # padded to the batch's longest
    pad = len(long["input_ids"]) - len(short["input_ids"])
    assert batch["labels"][0, -pad:].tolist() == [IGNORE_INDEX] * pad
    assert batch["attention_mask"][0].sum() == len(short["input_ids"])


def test_formats():
    assert prompt_and_response({"input": "p", "target": "t"}, "promptcblue") == ("p", "t")
    assert alpaca_prompt("Add 1 and 2.") == "### Instruction:\nAdd 1 and 2.\n### Response:\n"
    assert "### Input:\nx\n" in prompt_and_response({"instruction": "i", "input": "x", "output": "o"}, "alpaca")[0]
    with pytest.raises(ValueError, match="tokenize_conversation"):
        prompt_and_response({}, "conversation")


def test_lengths_from_data_fit_the_longest_prompt_and_label(tokenizer):
    from helpers.prompts import ANSWER_ROOM, lengths_from_data, tokenize_dataset
    from datasets import Dataset

    rows = Dataset.from_list([{"input": "判断类别：年龄\n答：", "target": "年龄"},
                              {"input": "判断类别：吸烟状况与饮酒史\n答：", "target": "吸烟状况"}])
    lengths = lengths_from_data(tokenizer, rows, fmt="promptcblue")  # these rows lack answer_choices: named
    prompts = [len(tokenizer(r["input"], add_special_tokens=False)["input_ids"]) for r in rows]
    label = len(tokenizer("吸烟状况", add_special_tokens=False)["input_ids"])
    assert lengths == {"max_source_length": max(prompts), "max_target_length": label + 1,
                       "max_new_tokens": label + ANSWER_ROOM}
    cut = tokenize_dataset(rows, tokenizer, "promptcblue", lengths["max_source_length"], lengths["max_target_length"])
    assert cut["labels"] == tokenize_dataset(rows, tokenizer, "promptcblue")["labels"]  # nothing refused, nothing cut
    with pytest.raises(ValueError, match="at least one dataset"):
        lengths_from_data(tokenizer, fmt="promptcblue")
    with pytest.raises(TypeError, match="fmt="):
        lengths_from_data(tokenizer, "promptcblue", rows)  # the old order says how to call it now


def test_a_loaded_dataset_carries_its_format_in_its_columns():
    from helpers.data import FORMATS, columns_of, dataset_info, dataset_names, format_of, load_dataset

    for name in dataset_names():
        info = dataset_info(name)
        split = "train" if isinstance(info["file_name"], str) or "train" in info["file_name"] else next(iter(info["file_name"]))
        assert format_of(load_dataset(name, split=split)) == info["format"], name
    assert format_of(load_dataset("alpaca_zh", dev_ratio=0.1)) == "alpaca"  # a DatasetDict answers for its splits
    assert columns_of("alpaca") == {"prompt": "instruction", "query": "input", "response": "output"}
    assert set(FORMATS) == {"promptcblue", "alpaca", "conversation", "preference", "text"}
    from datasets import Dataset

    with pytest.raises(ValueError, match="match none of the course's formats"):
        format_of(Dataset.from_list([{"question": "q", "answer": "a"}]))
    with pytest.raises(TypeError, match="Dataset"):
        format_of([{"input": "q"}])


def test_max_length_cuts_prompt_response_formats_too(tokenizer):
    from helpers.data import load_dataset
    from helpers.prompts import tokenize_dataset

    rows = load_dataset("alpaca_en").select(range(8))
    full = tokenize_dataset(rows, tokenizer)
    longest_prompt = max(sum(label == -100 for label in labels) for labels in full["labels"])
    cap = longest_prompt + 1  # one response token left for the longest prompt
    cut = tokenize_dataset(rows, tokenizer, max_length=cap)
    assert max(len(ids) for ids in cut["input_ids"]) <= cap < max(len(ids) for ids in full["input_ids"])
    assert all(ids == whole[:len(ids)] for ids, whole in zip(cut["input_ids"], full["input_ids"]))
    with pytest.raises(ValueError, match="fills max_length"):
        tokenize_dataset(rows, tokenizer, max_length=longest_prompt)


def test_a_row_carries_its_format_too():
    from helpers.data import load_dataset
    from helpers.prompts import prompt_and_response

    row = load_dataset("alpaca_en")[0]
    assert prompt_and_response(row) == prompt_and_response(row, "alpaca")


@pytest.mark.parametrize("text", ["本研究纳入年龄在18至65岁之间的患者。", "Seven minus two is five.", "3 加 4 等于 7。", "罕见字：龘"])
def test_tokenizing_loses_nothing(tokenizer, text):
    # notebook 00's samples: byte-level BPE decodes back to the same text, a character it never saw included
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_an_unseen_character_falls_back_to_its_bytes(tokenizer):
    assert len(tokenizer("龘", add_special_tokens=False)["input_ids"]) == len("龘".encode("utf-8")) == 3
