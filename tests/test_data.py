"""The course data: the generator is deterministic, the registry loads, the loader is strict."""
from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from helpers import data as hd  # noqa: E402
from helpers.data import DataFormatError, dataset_info, dataset_names, load_dataset  # noqa: E402

LABELS = ["疾病", "年龄", "性别", "怀孕相关", "过敏耐受", "药物", "实验室检查", "治疗或手术", "知情同意", "吸烟状况"]
SIZES = {("promptcblue_ctc", "train"): 600, ("promptcblue_ctc", "dev"): 110, ("promptcblue_ctc", "test"): 106,
         ("alpaca_zh", "train"): 300, ("alpaca_en", "train"): 300, ("conversations", "train"): 300,
         ("preference_pairs", "train"): 400}
COLUMNS = {"promptcblue_ctc": ["input", "target", "answer_choices", "sample_id", "type", "task_dataset"],
           "alpaca_zh": ["instruction", "input", "output"], "alpaca_en": ["instruction", "input", "output"],
           "conversations": ["conversation", "conversation_id", "category"],
           "preference_pairs": ["prompt", "chosen", "rejected", "answer"], "corpus": ["text"]}


@pytest.fixture(autouse=True)
def no_user_registry(tmp_path, monkeypatch):
    """The course's registry only: a learner's data/my_datasets.json (tests/test_real_data.py) stays out."""
    monkeypatch.setattr(hd, "USER_REGISTRY", tmp_path / "my_datasets.json")


def _generator():
    spec = importlib.util.spec_from_file_location("course_data_generate", REPO / "data" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the generator ---------------------------------------------------------------------------

def test_committed_data_matches_the_generator():
    result = subprocess.run([sys.executable, "data/generate.py", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_names_the_file_that_differs(tmp_path, monkeypatch, capsys):
    gen = _generator()
    copy = tmp_path / "data"
    shutil.copytree(REPO / "data", copy)
    with open(copy / "alpaca_en.json", "a", encoding="utf-8") as f:
        f.write(" ")
    monkeypatch.setattr(gen, "DATA_DIR", copy)
    assert gen.check() == 1
    assert "data/alpaca_en.json" in capsys.readouterr().out


# --- the registered datasets ----------------------------------------------------------------

def test_registry_names_and_formats():
    assert dataset_names() == ["promptcblue_ctc", "alpaca_zh", "alpaca_en", "conversations", "preference_pairs", "corpus"]
    formats = {name: dataset_info(name)["format"] for name in dataset_names()}
    assert formats == {"promptcblue_ctc": "promptcblue", "alpaca_zh": "alpaca", "alpaca_en": "alpaca",
                       "conversations": "conversation", "preference_pairs": "preference", "corpus": "text"}
    for name in dataset_names():
        info = dataset_info(name)
        assert info["description"] and info["columns"]


@pytest.mark.parametrize("name,split", sorted(SIZES))
def test_every_dataset_loads_with_its_size_and_columns(name, split):
    ds = load_dataset(name, split=split)
    assert ds.num_rows == SIZES[(name, split)]
    assert ds.column_names == COLUMNS[name]


def test_corpus_size_and_languages():
    corpus = load_dataset("corpus")
    assert corpus.column_names == ["text"]
    raw = (REPO / "data" / "corpus.txt").read_bytes()
    assert 2_000_000 <= len(raw) <= 3_000_000
    docs = corpus["text"]
    chinese = sum(1 for d in docs if re.search(r"[\u4e00-\u9fff]{3}", d) and not d.isascii()
                  and not d.startswith(("The ", "In ", "A ")))
    assert 0.5 < chinese / len(docs) < 0.7


def test_ctc_labels_balance_and_disjoint_splits():
    sentences = {}
    for split in ("train", "dev", "test"):
        ds = load_dataset("promptcblue_ctc", split=split)
        for row in ds:
            assert row["answer_choices"] == LABELS
            assert row["target"] in row["answer_choices"]
            assert row["type"] == "cls" and row["task_dataset"] == "CHIP-CTC"
            assert row["input"].endswith("答：") and "选项：" in row["input"]
        sentences[split] = [row["input"].split("\n")[1] for row in ds]
        assert len(set(sentences[split])) == len(sentences[split])
        assert len(set(ds["sample_id"])) == ds.num_rows
        counts = Counter(ds["target"])
        assert set(counts) == set(LABELS)
        assert max(counts.values()) <= 2.5 * min(counts.values())
    assert not set(sentences["train"]) & set(sentences["dev"])
    assert not set(sentences["train"]) & set(sentences["test"])
    assert not set(sentences["dev"]) & set(sentences["test"])



def test_ctc_prompts_list_every_label_so_a_leaked_prompt_contains_it():
    # Notebook 11, section 6b: a prediction that keeps the prompt contains the label every time (the prompt's
    # options line lists all ten), and never matches it exactly (the answer is scored on its first line)
    from helpers.generation import choice_accuracy

    test = load_dataset("promptcblue_ctc", split="test")
    for row in test:
        options = row["input"].split("选项：")[1].split("\n")[0]
        assert options.split("，") == row["answer_choices"] and row["target"] in options
    leaked = [prompt + label for prompt, label in zip(test["input"], test["target"])]
    assert choice_accuracy(leaked, test["target"]) == 0.0

def test_corpus_holds_no_task_format_and_no_held_out_sentence():
    corpus = (REPO / "data" / "corpus.txt").read_text(encoding="utf-8")
    for marker in ("选项：", "答：", "，".join(LABELS[:3]), "判断临床试验"):
        assert marker not in corpus
    for split in ("dev", "test"):
        for row in load_dataset("promptcblue_ctc", split=split):
            assert row["input"].split("\n")[1] not in corpus


def test_preference_answers_are_checkable():
    for row in load_dataset("preference_pairs"):
        assert row["answer"] in row["chosen"]
        assert row["answer"] not in row["rejected"]
        assert row["chosen"] != row["rejected"]


def test_conversations_have_two_to_four_turns():
    for row in load_dataset("conversations"):
        assert 2 <= len(row["conversation"]) <= 4


# --- combining and splitting ----------------------------------------------------------------

def test_combination_concatenates_in_order():
    both = load_dataset("alpaca_zh,alpaca_en")
    assert both.num_rows == 600
    zh, en = load_dataset("alpaca_zh"), load_dataset("alpaca_en")
    assert both[0] == zh[0] and both[300] == en[0]
    assert load_dataset(["alpaca_zh", "alpaca_en"]).num_rows == 600
    assert load_dataset(" alpaca_zh , alpaca_en ").num_rows == 600


def test_dev_ratio_gives_train_and_dev():
    parts = load_dataset("alpaca_zh", dev_ratio=0.1, seed=7)
    assert set(parts) == {"train", "dev"}
    assert (parts["train"].num_rows, parts["dev"].num_rows) == (270, 30)
    again = load_dataset("alpaca_zh", dev_ratio=0.1, seed=7)
    assert parts["dev"]["output"] == again["dev"]["output"]
    with pytest.raises(ValueError, match="dev_ratio"):
        load_dataset("alpaca_zh", dev_ratio=1.5)


# --- wrong names, formats, splits, files ----------------------------------------------------

def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'alpaca_zh'") as info:
        load_dataset("alpaca_hz")
    assert "conversations" in str(info.value)
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_info("nonsense")


def test_mixed_formats_are_refused():
    with pytest.raises(ValueError, match="different formats.*alpaca_zh \\(alpaca\\).*conversations \\(conversation\\)"):
        load_dataset("alpaca_zh,conversations")


def test_missing_split_lists_what_exists():
    with pytest.raises(ValueError, match="no split 'dev'; it has: train"):
        load_dataset("alpaca_zh", split="dev")
    with pytest.raises(ValueError, match="train, dev, test"):
        load_dataset("promptcblue_ctc", split="validation")


def test_missing_file_names_the_regenerate_command(tmp_path, monkeypatch):
    monkeypatch.setattr(hd, "DATA_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="python data/generate.py"):
        load_dataset("alpaca_zh")


def test_own_file_needs_a_format(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"instruction": "说你好", "input": "", "output": "你好"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    with pytest.raises(ValueError, match="format="):
        load_dataset(str(path))
    ds = load_dataset(str(path), format="alpaca")
    assert ds[0] == {"instruction": "说你好", "input": "", "output": "你好"}
    assert load_dataset(path, format="alpaca").num_rows == 1
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "absent.jsonl"), format="alpaca")


def test_own_file_with_other_column_names(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "1 + 1", "reply": "2", "bad": "x"}\n', encoding="utf-8")
    ds = load_dataset(str(path), format="preference",
                      columns={"prompt": "question", "chosen": "reply", "rejected": "bad"})
    assert ds[0] == {"prompt": "1 + 1", "chosen": "2", "rejected": "x"}


# --- malformed files: DataFormatError with the right line and field ----------------------------

def _alpaca(n: int) -> list[dict]:
    return [{"instruction": f"计算 {i} 加 1。", "input": "", "output": f"{i + 1}"} for i in range(n)]


def _ctc(target: str = "年龄", choices=None) -> dict:
    return {"input": "判断类别：\n年龄18至65岁\n答：", "target": target,
            "answer_choices": ["疾病", "年龄"] if choices is None else choices,
            "type": "cls", "task_dataset": "CHIP-CTC", "sample_id": "x"}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _record_start_lines(text: str) -> list[int]:
    """1-based lines where the records of a json.dumps(..., indent=2) array start."""
    return [i for i, line in enumerate(text.split("\n"), 1) if line == "  {"]


def _raises(path, fmt) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        load_dataset(str(path), format=fmt)
    assert isinstance(info.value, ValueError)
    assert info.value.path == Path(path)
    return info.value


def test_empty_output_in_a_json_array_reports_the_record_line(tmp_path):
    rows = _alpaca(5)
    rows[3]["output"] = "  "
    path = tmp_path / "alpaca.json"
    text = json.dumps(rows, ensure_ascii=False, indent=2)
    path.write_text(text, encoding="utf-8")
    err = _raises(path, "alpaca")
    line = _record_start_lines(text)[3]
    assert (err.line, err.field) == (line, "output")
    assert str(err) == (f"{path}, line {line}, field 'output': empty string "
                        "(every example needs a non-empty output)")


def test_registered_path_is_shown_relative_to_the_repository():
    err = DataFormatError(REPO / "data" / "alpaca_zh.json", 12, "output", "empty string")
    assert str(err) == "data/alpaca_zh.json, line 12, field 'output': empty string"


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in _alpaca(4)]
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = _raises(path, "alpaca")
    assert (err.line, err.field) == (3, None)
    assert "invalid JSON" in str(err)


def test_invalid_json_inside_an_array(tmp_path):
    text = json.dumps(_alpaca(4), indent=2)
    start = _record_start_lines(text)[2]
    lines = text.split("\n")
    lines[start] = lines[start].rstrip(",")  # drop the comma after the record's first key
    path = tmp_path / "bad.json"
    path.write_text("\n".join(lines), encoding="utf-8")
    err = _raises(path, "alpaca")
    assert err.line == start and "invalid JSON" in str(err)


def test_truncated_array(tmp_path):
    text = json.dumps(_alpaca(3), indent=2)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex("}") + 1], encoding="utf-8")
    err = _raises(path, "alpaca")
    assert "truncated" in str(err)


def test_row_that_is_not_an_object(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [_alpaca(1)[0], ["计算", "", "1"]])
    err = _raises(path, "alpaca")
    assert (err.line, err.field) == (2, None)
    assert "expected a JSON object" in str(err) and "found an array" in str(err)


def test_misnamed_column_lists_expected_and_found(tmp_path):
    rows = _alpaca(3)
    rows[1]["outptu"] = rows[1].pop("output")
    path = _write_jsonl(tmp_path / "x.jsonl", rows)
    err = _raises(path, "alpaca")
    assert (err.line, err.field) == (2, "output")
    assert "expected columns: instruction, input, output" in str(err)
    assert "found: instruction, input, outptu" in str(err)
    assert "'outptu'" in str(err)


def test_wrong_type(tmp_path):
    path = _write_jsonl(tmp_path / "x.json", [_ctc(), _ctc(choices="疾病，年龄")])
    err = _raises(path, "promptcblue")
    assert (err.line, err.field) == (2, "answer_choices")
    assert "expected an array of strings, found a string" in str(err)


def test_empty_target(tmp_path):
    path = _write_jsonl(tmp_path / "x.json", [_ctc(), _ctc(), _ctc(target="")])
    err = _raises(path, "promptcblue")
    assert (err.line, err.field) == (3, "target")


def test_target_not_in_answer_choices(tmp_path):
    path = _write_jsonl(tmp_path / "x.json", [_ctc(target="性别")])
    err = _raises(path, "promptcblue")
    assert (err.line, err.field) == (1, "target")
    assert "not one of answer_choices" in str(err)


def test_empty_conversation_and_empty_reply(tmp_path):
    good = {"conversation_id": 1, "category": "c", "conversation": [{"human": "你好", "assistant": "你好！"}]}
    path = _write_jsonl(tmp_path / "c.jsonl", [good, {**good, "conversation": []}])
    err = _raises(path, "conversation")
    assert (err.line, err.field) == (2, "conversation")
    turns = [{"human": "3 加 4？", "assistant": "7"}, {"human": "再加 2 呢？", "assistant": ""}]
    path = _write_jsonl(tmp_path / "d.jsonl", [good, good, {**good, "conversation": turns}])
    err = _raises(path, "conversation")
    assert (err.line, err.field) == (3, "conversation[1].assistant")


def test_empty_rejected(tmp_path):
    rows = [{"prompt": "1 + 1?", "chosen": "2", "rejected": "3", "answer": "2"},
            {"prompt": "2 + 2?", "chosen": "4", "rejected": "", "answer": "4"}]
    err = _raises(_write_jsonl(tmp_path / "p.jsonl", rows), "preference")
    assert (err.line, err.field) == (2, "rejected")


def test_columns_must_agree_from_row_to_row(tmp_path):
    rows = [{"prompt": "1 + 1?", "chosen": "2", "rejected": "3", "answer": "2"},
            {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}]
    err = _raises(_write_jsonl(tmp_path / "p.jsonl", rows), "preference")
    assert (err.line, err.field) == (2, "answer")


def test_invalid_utf8_and_empty_text_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("第一行\n第二行\n".encode() + b"\xff\xfe\n")
    err = _raises(path, "text")
    assert err.line == 3 and "UTF-8" in str(err)
    path.write_text("第一行\n\n第三行\n", encoding="utf-8")
    err = _raises(path, "text")
    assert (err.line, err.field) == (2, "text")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    assert _raises(path, "alpaca").line == 1


# --- fuzz: every mutation is accepted or rejected with a line, never another exception --------

def _mutate(rng: random.Random, rows: list[dict], as_array: bool) -> str:
    rows = json.loads(json.dumps(rows))
    row = rng.choice(rows)
    key = rng.choice(list(row))
    action = rng.choice(["drop", "blank", "retype", "rename", "truncate", "garbage", "turn"])
    if action == "drop":
        del row[key]
    elif action == "blank":
        row[key] = "" if isinstance(row[key], str) else type(row[key])()
    elif action == "retype":
        row[key] = rng.choice([None, 3, 1.5, True, [], {}, "x", ["x"]])
    elif action == "rename":
        row[key + "_"] = row.pop(key)
    elif action == "turn" and isinstance(row.get("conversation"), list) and row["conversation"]:
        turn = rng.choice(row["conversation"])
        turn[rng.choice(list(turn))] = rng.choice(["", None, 7, ["a"]])
    text = json.dumps(rows, ensure_ascii=False, indent=2) if as_array else \
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if action == "truncate":
        text = text[: rng.randrange(len(text))]
    elif action == "garbage":
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(["{", "}", ",", '"', "]", "\n", "\\", "中"]) + text[at:]
    return text


def test_fuzzed_files_fail_only_with_a_located_data_format_error(tmp_path):
    rng = random.Random(1234)
    sources = {"promptcblue": ("promptcblue_ctc", False), "alpaca": ("alpaca_zh", True),
               "conversation": ("conversations", False), "preference": ("preference_pairs", False)}
    samples = {fmt: load_dataset(name).select(range(4)).to_list() for fmt, (name, _) in sources.items()}
    outcomes = Counter()
    for trial in range(160):
        fmt = rng.choice(sorted(sources))
        as_array = sources[fmt][1] if rng.random() < 0.8 else not sources[fmt][1]
        text = _mutate(rng, samples[fmt], as_array)
        path = tmp_path / f"fuzz{trial}.json"
        path.write_text(text, encoding="utf-8")
        try:
            load_dataset(str(path), format=fmt)
            outcomes["accepted"] += 1
        except DataFormatError as e:
            assert isinstance(e.line, int) and 1 <= e.line <= text.count("\n") + 1, (text, e)
            assert str(e).startswith(f"{path}, line {e.line}")
            outcomes["rejected"] += 1
    assert outcomes["accepted"] and outcomes["rejected"]
