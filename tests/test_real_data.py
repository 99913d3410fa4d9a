"""The seeds' real datasets in the registry, and the learner's own registry (data/my_datasets.json).

Nothing is downloaded here. The online path runs against a stand-in for the Hub: `helpers.data._load_from_hub`
is replaced by a loader that reads a small file laid out like the Hub dataset with 🤗 datasets' own json
builder, so the column mapping, the checks and the concatenation are the real ones. The offline refusal runs
🤗 datasets for real, in a subprocess with HF_HUB_OFFLINE=1 and an empty cache.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from helpers import data as hd  # noqa: E402
from helpers.data import (DataFormatError, FORMATS, RealDataUnavailable, dataset_info, dataset_names,  # noqa: E402
                          format_of, load_dataset, real_dataset_names)

SYNTHETIC = ["promptcblue_ctc", "alpaca_zh", "alpaca_en", "conversations", "preference_pairs", "corpus"]
REAL = ["promptcblue", "alpaca_gpt4_zh", "comparison_gpt4_zh", "firefly", "moss_003_sft"]
HUB_IDS = {"alpaca_gpt4_zh": "llamafactory/alpaca_gpt4_zh", "firefly": "YeungNLP/firefly-train-1.1M",
           "moss_003_sft": "YeungNLP/moss-003-sft-data"}
STANDINS = {"promptcblue": "promptcblue_ctc", "alpaca_gpt4_zh": "alpaca_zh", "comparison_gpt4_zh": "preference_pairs",
            "firefly": "alpaca_zh", "moss_003_sft": "conversations"}


@pytest.fixture(autouse=True)
def no_user_registry(tmp_path, monkeypatch):
    """Each test starts without a learner's registry (a developer's own data/my_datasets.json stays out)."""
    monkeypatch.setattr(hd, "USER_REGISTRY", tmp_path / "registry" / "my_datasets.json")


def _user_registry(entries: dict) -> Path:
    hd.USER_REGISTRY.parent.mkdir(parents=True, exist_ok=True)
    hd.USER_REGISTRY.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return hd.USER_REGISTRY


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A stand-in for the Hub: {repo id: a local file laid out like that dataset}, read by 🤗 datasets' json builder.

    `hub.calls` records every (repo id, subset, split) that load_dataset asked the Hub for."""
    import datasets

    class Hub(dict):
        def __init__(self):
            super().__init__()
            self.calls = []

        def load(self, repo_id, *, subset=None, split="train"):
            self.calls.append((repo_id, subset, split))
            if repo_id not in self:
                raise FileNotFoundError(f"Dataset '{repo_id}' doesn't exist on the Hub")  # as 🤗 datasets says
            return datasets.load_dataset("json", data_files={"train": str(self[repo_id])}, split=split,
                                         cache_dir=str(tmp_path / "datasets-cache"))

    stand_in = Hub()
    monkeypatch.setattr(hd, "_load_from_hub", stand_in.load)
    return stand_in


# --- the registry ----------------------------------------------------------------------------------------------

from test_data import _generator  # noqa: E402  (data/generate.py as a module; tests/ is on sys.path, see conftest)


def test_real_datasets_are_registered_apart_from_what_loads_here():
    assert dataset_names() == SYNTHETIC  # what a learner can load offline: the notebooks iterate over it
    assert real_dataset_names() == REAL
    gen = _generator()
    assert list(gen.DATASET_INFO) == SYNTHETIC and list(gen.REAL_DATASET_INFO) == REAL
    written = json.loads((REPO / "data" / "dataset_info.json").read_text(encoding="utf-8"))
    assert written == {**gen.DATASET_INFO, **gen.REAL_DATASET_INFO}  # generated, synthetic entries first
    assert {name: dataset_info(name).get("hf_hub_url") for name in REAL if "hf_hub_url" in dataset_info(name)} \
        == HUB_IDS
    for name in REAL:
        info = dataset_info(name)
        hd._check_entry(name, info, "data/dataset_info.json", own=False)
        assert ("hf_hub_url" in info) != ("download" in info), name  # on the Hub, or downloaded by hand
        assert "file_name" not in info
        assert info["standin"] == STANDINS[name] and dataset_info(info["standin"])["format"] == info["format"]
        assert info["license"] and info["source"] and info["description"] and info["seed"]
        assert set(info["columns"]) <= {role for role, *_ in FORMATS[info["format"]]}
    assert dataset_info("comparison_gpt4_zh")["ranking"] is True  # LLaMA-Factory's flag for preference data
    for name in SYNTHETIC:
        hd._check_entry(name, dataset_info(name), "data/dataset_info.json", own=False)


def test_an_unknown_name_lists_the_real_datasets_too():
    with pytest.raises(ValueError, match="Did you mean 'alpaca_gpt4_zh'") as info:
        load_dataset("alpaca_gpt4")
    assert "Known datasets: promptcblue_ctc" in str(info.value)
    assert "Real datasets (online, or downloaded by hand): promptcblue, alpaca_gpt4_zh" in str(info.value)


# --- offline, and data that is not on the Hub ------------------------------------------------------------------

def test_offline_a_hub_dataset_is_refused_and_its_stand_in_named(tmp_path):
    """🤗 datasets for real, offline, with an empty cache: no download is tried, and the error says what to do."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    env.pop("HF_DATASETS_CACHE", None)
    env.pop("HF_HUB_CACHE", None)
    code = "from helpers.data import load_dataset\nload_dataset('alpaca_gpt4_zh')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("helpers.data.RealDataUnavailable: 'alpaca_gpt4_zh' (the Hub dataset "
                           "llamafactory/alpaca_gpt4_zh) cannot be loaded: HF_HUB_OFFLINE=1: the Hugging Face Hub "
                           "is out of reach"), last
    assert last.endswith('Here, use its local stand-in instead: load_dataset("alpaca_zh").'), last


@pytest.mark.parametrize("name", sorted(HUB_IDS))
def test_when_the_hub_cannot_be_reached_the_error_names_the_stand_in(name, monkeypatch):
    def unreachable(repo_id, *, subset=None, split="train"):
        raise ConnectionError(f"Couldn't reach '{repo_id}' on the Hub (ConnectTimeout)")

    monkeypatch.setattr(hd, "_load_from_hub", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RealDataUnavailable, match=f"'{name}' .*{HUB_IDS[name]}.*HF_HUB_OFFLINE=1.*out of reach") as info:
        load_dataset(name)
    assert isinstance(info.value, OSError)
    assert str(info.value).endswith(f'use its local stand-in instead: load_dataset("{STANDINS[name]}").')
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, but the network fails
    with pytest.raises(RealDataUnavailable, match=r"out of reach or refused \(ConnectionError: Couldn't reach"):
        load_dataset(name)


@pytest.mark.parametrize("name", ["promptcblue", "comparison_gpt4_zh"])
def test_data_that_is_not_on_the_hub_says_where_to_get_it(name, hub):
    info = dataset_info(name)
    with pytest.raises(RealDataUnavailable) as error:
        load_dataset(name)
    message = str(error.value)
    assert f"'{name}' is not on the Hugging Face Hub" in message and info["download"] in message
    assert f'{{"{name}": {{"file_name": "<path>"}}}}' in message  # how to name the downloaded file
    assert message.endswith(f'load_dataset("{STANDINS[name]}").')
    assert hub.calls == []  # nothing was asked of the Hub


# --- online: a stand-in for the Hub ----------------------------------------------------------------------------

ALPACA_GPT4 = [{"instruction": "保持健康的三个提示。", "input": "", "output": "多运动，均衡饮食，睡眠充足。"},
               {"instruction": "把这句话翻译成英文。", "input": "今天天气很好。", "output": "The weather is nice today."},
               {"instruction": "三原色是什么？", "input": "", "output": "红、绿、蓝。"}]


def test_online_alpaca_gpt4_zh_is_loaded_with_datasets_and_checked(tmp_path, hub):
    hub["llamafactory/alpaca_gpt4_zh"] = tmp_path / "alpaca_gpt4_data_zh.json"
    hub["llamafactory/alpaca_gpt4_zh"].write_text(json.dumps(ALPACA_GPT4, ensure_ascii=False, indent=2),
                                                  encoding="utf-8")  # a JSON array, like the Hub's file
    ds = load_dataset("alpaca_gpt4_zh")
    assert hub.calls == [("llamafactory/alpaca_gpt4_zh", None, "train")]
    assert ds.column_names == ["instruction", "input", "output"] and ds.to_list() == ALPACA_GPT4
    assert format_of(ds) == "alpaca"
    both = load_dataset("alpaca_zh,alpaca_gpt4_zh")  # the stand-in and the real data, one format
    assert both.num_rows == 303 and both[300] == ALPACA_GPT4[0]
    parts = load_dataset("alpaca_gpt4_zh", dev_ratio=0.34, seed=1)
    assert (parts["train"].num_rows, parts["dev"].num_rows) == (1, 2)
    with pytest.raises(ValueError, match="has format 'alpaca', not 'preference'"):
        load_dataset("alpaca_gpt4_zh", format="preference")


def test_online_firefly_gets_the_course_columns(tmp_path, hub):
    rows = [{"kind": "ClassicalChinese", "input": "将下面句子翻译成现代文：\n学而时习之。", "target": "学了又时常温习。"},
            {"kind": "Couplet", "input": "对联：春风得意", "target": "秋月无边"}]
    hub["YeungNLP/firefly-train-1.1M"] = _write_jsonl(tmp_path / "firefly-train-1.1M.jsonl", rows)
    ds = load_dataset("firefly")
    assert ds.column_names == ["instruction", "input", "output", "kind"]  # no query column: input is ""
    assert ds[0] == {"instruction": rows[0]["input"], "input": "", "output": rows[0]["target"],
                     "kind": "ClassicalChinese"}
    assert format_of(ds) == "alpaca"


def test_online_moss_conversations_in_fireflys_layout(tmp_path, hub):
    rows = [{"conversation_id": 1, "category": "Brainstorming", "dataset": "moss",
             "conversation": [{"human": "如何提升个人能力？", "assistant": "多学习，多练习。"},
                              {"human": "具体一点呢？", "assistant": "每天读书一小时。"}]},
            {"conversation_id": 2, "category": "Code", "dataset": "moss",
             "conversation": [{"human": "What is Python?", "assistant": "A programming language."}]}]
    hub["YeungNLP/moss-003-sft-data"] = _write_jsonl(tmp_path / "moss-003-sft-data.jsonl", rows)
    ds = load_dataset("moss_003_sft")
    assert ds.column_names == ["conversation", "conversation_id", "category", "dataset"]
    assert ds.to_list() == [{k: r[k] for k in ds.column_names} for r in rows]
    assert format_of(ds) == "conversation"


def test_a_bad_row_on_the_hub_is_named_by_address_row_and_field(tmp_path, hub):
    rows = [{"kind": "NLI", "input": f"问题 {i}", "target": f"答案 {i}"} for i in range(5)]
    rows[3]["target"] = "  "
    hub["YeungNLP/firefly-train-1.1M"] = _write_jsonl(tmp_path / "firefly.jsonl", rows)
    with pytest.raises(DataFormatError) as info:
        load_dataset("firefly")  # the first 1,000 rows are checked
    assert (info.value.path, info.value.line, info.value.field) == ("hf://datasets/YeungNLP/firefly-train-1.1M", 4,
                                                                    "target")
    assert str(info.value) == ("hf://datasets/YeungNLP/firefly-train-1.1M, row 4, field 'target': empty string "
                               "(every example needs a non-empty target)")
    assert load_dataset("firefly", check_rows=3).num_rows == 5  # rows after the checked ones are mapped, not checked
    with pytest.raises(DataFormatError, match="row 4"):
        load_dataset("firefly", check_rows=None)  # every row
    with pytest.raises(ValueError, match="check_rows must be a whole number"):
        load_dataset("firefly", check_rows=0)


def test_a_hub_dataset_with_other_column_names_fails_on_its_first_row(tmp_path, hub):
    hub["llamafactory/alpaca_gpt4_zh"] = _write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataFormatError, match=r"hf://datasets/llamafactory/alpaca_gpt4_zh, row 1, field "
                                              r"'instruction': missing column; expected columns: instruction, "
                                              r"input, output; found: question, answer"):
        load_dataset("alpaca_gpt4_zh")


def test_a_split_the_hub_dataset_lacks_is_refused_before_any_download(hub):
    with pytest.raises(ValueError, match="dataset 'alpaca_gpt4_zh' has no split 'dev'; it has: train"):
        load_dataset("alpaca_gpt4_zh", split="dev")
    assert hub.calls == []


def test_your_hub_entry_may_keep_some_rows_and_may_be_text(tmp_path, hub):
    hub["me/docs"] = _write_jsonl(tmp_path / "docs.jsonl", [{"content": "第一篇。", "lang": "zh"},
                                                            {"content": "Second.", "lang": "en"},
                                                            {"content": "第三篇。", "lang": "zh"}])
    _user_registry({"my_docs": {"hf_hub_url": "me/docs", "format": "text", "columns": {"text": "content"},
                                "where": {"lang": "zh"}}})
    docs = load_dataset("my_docs")
    assert docs.column_names == ["text"] and docs["text"] == ["第一篇。", "第三篇。"]
    _user_registry({"my_docs": {"hf_hub_url": "me/docs", "format": "text", "where": {"lang": "fr"}}})
    with pytest.raises(DataFormatError, match=r"hf://datasets/me/docs, row 1: no rows where \{'lang': 'fr'\}"):
        load_dataset("my_docs")
    _user_registry({"my_docs": {"hf_hub_url": "me/docs", "format": "text"}})
    with pytest.raises(DataFormatError, match="row 1, field 'text': missing column; found: content, lang"):
        load_dataset("my_docs")


def test_conversations_of_the_hub_and_of_the_course_concatenate(tmp_path, hub):
    rows = [{"conversation_id": 7, "category": "Writing", "conversation": [{"human": "写一句诗", "assistant": "床前明月光"}]}]
    hub["YeungNLP/moss-003-sft-data"] = _write_jsonl(tmp_path / "moss.jsonl", rows)
    both = load_dataset("conversations,moss_003_sft", check_rows=None)
    assert both.num_rows == 301 and both[300] == rows[0]


# --- the learner's own registry --------------------------------------------------------------------------------

def test_your_own_entries_load_by_name(tmp_path, hub):
    hd.USER_REGISTRY.parent.mkdir(parents=True)
    _write_jsonl(hd.USER_REGISTRY.parent / "qa.jsonl", [{"question": "1 + 1", "reply": "2", "bad": "3"}])
    hub["me/my-chats"] = _write_jsonl(tmp_path / "chats.jsonl", [{"turns": [{"q": "你好", "a": "你好！"}]}])
    _user_registry({
        "my_qa": {"file_name": "qa.jsonl", "format": "preference",  # relative to the registry's folder
                  "columns": {"prompt": "question", "chosen": "reply", "rejected": "bad"}},
        "my_chats": {"hf_hub_url": "me/my-chats", "format": "conversation", "columns": {"messages": "turns"},
                     "tags": {"user": "q", "assistant": "a"}},
    })
    assert dataset_names() == SYNTHETIC + ["my_qa"]
    assert real_dataset_names() == REAL + ["my_chats"]
    assert load_dataset("my_qa").to_list() == [{"prompt": "1 + 1", "chosen": "2", "rejected": "3"}]
    chats = load_dataset("my_chats")
    assert chats.to_list() == [{"conversation": [{"human": "你好", "assistant": "你好！"}]}]  # turn keys renamed
    assert dataset_info("my_chats")["tags"] == {"user": "q", "assistant": "a"}


def test_a_downloaded_real_dataset_is_named_under_its_course_name(tmp_path):
    """PromptCBLUE from Tianchi: the entry keeps the CHIP-CTC rows and maps task_type to the course's type."""
    def ctc(i, target):
        return {"input": f"标准 {i}\n是什么临床试验筛选标准类型？\n选项：年龄，疾病\n答：", "target": target,
                "answer_choices": ["年龄", "疾病"], "task_type": "cls", "task_dataset": "CHIP-CTC",
                "sample_id": f"train-{i}"}
    rows = [ctc(1, "年龄"),
            {"input": "临床发现事件抽取：\n咳嗽。\n答：", "target": "主体词：咳嗽", "answer_choices": None,
             "task_type": "event_extraction", "task_dataset": "CHIP-CDEE", "sample_id": "train-2"},
            ctc(3, "疾病")]
    train = _write_jsonl(tmp_path / "train.json", rows)
    _user_registry({"promptcblue": {"file_name": {"train": str(train)}}})
    assert "promptcblue" in dataset_names() and "promptcblue" not in real_dataset_names()
    ds = load_dataset("promptcblue")
    assert ds.column_names == ["input", "target", "answer_choices", "sample_id", "type", "task_dataset"]
    assert ds["sample_id"] == ["train-1", "train-3"] and ds["type"] == ["cls", "cls"]
    assert format_of(ds) == "promptcblue"
    rows[2]["target"] = "性别"
    _write_jsonl(train, rows)
    with pytest.raises(DataFormatError) as info:
        load_dataset("promptcblue")
    assert (info.value.line, info.value.field) == (3, "target")  # lines of the file, not of the kept rows


def test_comparison_data_reads_chosen_and_rejected_from_one_list(tmp_path):
    pairs = [{"instruction": "三原色是什么？", "input": "", "output": ["红、绿、蓝。", "不知道。"]},
             {"instruction": "翻译成英文", "input": "你好", "output": ["Hello.", "Bonjour."]}]
    path = tmp_path / "comparison_gpt4_data_zh.json"
    path.write_text(json.dumps(pairs, ensure_ascii=False, indent=2), encoding="utf-8")
    _user_registry({"comparison_gpt4_zh": {"file_name": str(path)}})
    ds = load_dataset("comparison_gpt4_zh")
    assert ds.column_names == ["prompt", "chosen", "rejected", "input"]
    assert ds[1] == {"prompt": "翻译成英文", "chosen": "Hello.", "rejected": "Bonjour.", "input": "你好"}
    assert format_of(ds) == "preference"
    pairs[1]["output"] = ["Hello."]
    path.write_text(json.dumps(pairs, ensure_ascii=False, indent=2), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"field 'output\[1\]': expected an array of at least 2 items in "
                                              r"'output', found an array of 1"):
        load_dataset("comparison_gpt4_zh")


@pytest.mark.parametrize("entries,message", [
    ({"alpaca_zh": {"file_name": "x.json", "format": "alpaca"}}, "'alpaca_zh' is a course dataset; give your entry "
                                                                 "a name of its own$"),
    ({"firefly": {"file_name": "f.jsonl", "format": "alpaca"}}, "give only its file_name"),
    ({"mine": {"file_name": "m.json", "formatting": "sharegpt"}}, "names its formats with 'format'"),
    ({"mine": {"file_name": "m.json", "format": "alpaca", "colums": {}}}, "unknown key 'colums' \\(did you mean "
                                                                          "'columns'\\?\\)"),
    ({"mine": {"file_name": "m.json", "format": "chat"}}, "'format' must be one of promptcblue, alpaca"),
    ({"mine": {"file_name": "m.json", "format": "alpaca", "columns": {"answer": "a"}}},
     "'answer' is not a role of the alpaca format; its roles: prompt, query, response"),
    ({"mine": {"file_name": "m.json", "format": "alpaca", "columns": {"response": ""}}},
     "the alpaca format needs a 'response' column"),
    ({"mine": {"file_name": "m.json", "hf_hub_url": "me/m", "format": "alpaca"}}, "give exactly one of file_name"),
    ({"mine": {"format": "alpaca"}}, "give exactly one of file_name"),
    ({"mine": {"hf_hub_url": "not a hub id", "format": "alpaca"}}, "hf_hub_url must be a Hub id"),
    ({"mine": {"file_name": "m.json", "format": "alpaca", "tags": {"user": "q"}}}, "conversation format only"),
    (["not", "an", "object"], "expected one JSON object"),
])
def test_mistakes_in_your_registry_are_named(entries, message):
    _user_registry(entries)
    with pytest.raises(ValueError, match=message) as info:
        dataset_names()
    assert str(info.value).startswith(str(hd._shown(hd.USER_REGISTRY)))


def test_invalid_json_in_your_registry_is_named():
    hd.USER_REGISTRY.parent.mkdir(parents=True, exist_ok=True)
    hd.USER_REGISTRY.write_text('{"mine": {"file_name": "m.json",}}', encoding="utf-8")
    with pytest.raises(ValueError, match="my_datasets.json: not valid JSON"):
        load_dataset("alpaca_zh")


def test_a_missing_file_of_your_entry_is_not_the_course_data(tmp_path):
    _user_registry({"mine": {"file_name": "absent.jsonl", "format": "alpaca"}})
    with pytest.raises(FileNotFoundError, match=r"absent.jsonl not found \(the file_name of 'mine' in .*"
                                                r"my_datasets.json\)") as info:
        load_dataset("mine")
    assert "generate.py" not in str(info.value)


def test_generate_check_ignores_your_registry(tmp_path, monkeypatch):
    gen = _generator()
    copy = tmp_path / "data"
    shutil.copytree(REPO / "data", copy)
    (copy / "my_datasets.json").write_text('{"mine": {"file_name": "m.json", "format": "alpaca"}}\n')
    monkeypatch.setattr(gen, "DATA_DIR", copy)
    assert gen.check() == 0
