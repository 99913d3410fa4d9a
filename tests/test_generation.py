"""helpers.generation: generation with left padding, the predictions file, accuracy and perplexity.

Perplexity is checked against numbers worked out independently: a "model" whose next-token distribution is
fixed, so the negative log-likelihood of each token can be written down, and the 🤗 model's own loss.
"""
import json
import math

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from helpers.generation import (choice_accuracy, generate, match_choice, normalize_answer, perplexity,
                              predict_with_generate, read_predictions, score_predictions)
from helpers.models import load_tokenizer

CHOICES = ["疾病", "年龄", "性别", "怀孕相关", "过敏耐受", "药物", "实验室检查", "治疗或手术", "知情同意", "吸烟状况"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tiny_neox, tokenizer):
    """A random 2-layer GPT-NeoX, small for testing speed; its answers are gibberish but deterministic."""
    return tiny_neox(tokenizer=tokenizer, num_attention_heads=4, max_position_embeddings=256).eval()


class FixedDistribution(nn.Module):
    """Predicts the same next-token distribution softmax(bias) everywhere, whatever the input."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(self, input_ids, attention_mask=None):
        return CausalLMOutput(logits=self.bias.expand(*input_ids.shape, -1))


# ---------------------------------------------------------------- normalisation and accuracy

@pytest.mark.parametrize("raw, normalized", [
    ("知情同意", "知情同意"), ("知情同意。", "知情同意"), (" 知情 同意 ", "知情同意"), ("ＡＢＣ！", "abc"),
    ("年龄\n疾病", "年龄"), ("“药物”", "药物"), ("", ""), ("治疗或手术，", "治疗或手术")])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_choice_accuracy_is_exact_match_after_normalisation():
    assert choice_accuracy(["年龄。", "疾病", "药物相关"], ["年龄", "年龄", "药物"]) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        choice_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        choice_accuracy([], [])


def test_match_choice_needs_an_exact_choice():
    assert match_choice("实验室检查。", CHOICES) == "实验室检查"
    assert match_choice("实验室", CHOICES) is None  # a prefix is not an answer
    assert match_choice("疾病，年龄，性别", CHOICES) is None  # listing the options is not an answer
    assert match_choice("", CHOICES) is None
    with pytest.raises(ValueError, match="non-empty list"):
        match_choice("年龄", "年龄")


# ---------------------------------------------------------------- generation and the predictions file

def test_generate_batched_with_left_padding_equals_one_by_one(tokenizer, tiny_model):
    prompts = ["判断类别：\n年龄在18岁以上\n答：", "答：", "What is 3 plus 4?"]
    batched = generate(tiny_model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    single = [generate(tiny_model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored afterwards
    with pytest.raises(TypeError, match="list of prompts"):
        generate(tiny_model, tokenizer, "one prompt")


def test_predict_with_generate_writes_the_seed_format(tokenizer, tiny_model, tmp_path):
    examples = [{"input": "判断类别：\n吸烟\n答：", "target": "吸烟状况"}, {"input": "答：", "target": "年龄"}]
    path = tmp_path / "predict" / "generated_predictions.jsonl"
    records = predict_with_generate(tiny_model, tokenizer, examples, path, max_new_tokens=4)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines == records and len(lines) == 2
    assert [set(line) for line in lines] == [{"prompt", "predict", "label"}] * 2
    assert [line["label"] for line in lines] == ["吸烟状况", "年龄"]
    assert [line["predict"] for line in lines] == generate(tiny_model, tokenizer, [e["input"] for e in examples],
                                                           max_new_tokens=4)
    assert "吸烟状况" in path.read_text(encoding="utf-8")  # Chinese written as is, not \\u escapes
    with pytest.raises(ValueError, match="lack the columns"):
        predict_with_generate(tiny_model, tokenizer, [{"question": "a"}], path)


def test_score_predictions_reads_the_file(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"predict": "年龄", "label": "年龄"}, {"predict": "药物", "label": "年龄"},
            {"predict": "", "label": "疾病"}, {"predict": "实验室检查。", "label": "实验室检查"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    scores = score_predictions(path)
    # BLEU-4 per row: 2-char exact match (1·1·1/2·1/4)^(1/4); no match 0; empty 0;
    # "实验室检查。" vs "实验室检查": 5 of 6 chars, p1..p4 = 5/6, 4/5, 3/4, 2/3, BP = 1
    exact_two = 100 * (1 / 8) ** 0.25
    five_of_six = 100 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert scores["bleu-4"] == pytest.approx((round(exact_two, 4) + round(five_of_six, 4)) / 4)
    # ROUGE-1 per row (jieba: 实验室 检查 。 vs 实验室 检查): 100, 0, 0, F(2/3, 1) = 80
    assert scores["rouge-1"] == pytest.approx((100 + 80) / 4)
    assert scores["accuracy"] == 50.0 and scores["n"] == 4  # rows 1 and 4 (after dropping "。")


@pytest.mark.parametrize("content, message", [("not json\n", "line 1: not JSON"),
                                              ('{"predict": "a"}\n', "line 1: needs string fields"),
                                              ('{"predict": "a", "label": "b"}\n{"label": 3, "predict": "x"}\n',
                                               "line 2: needs string fields"),
                                              ("\n", "holds no predictions")])
def test_read_predictions_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_predictions(path)


# ---------------------------------------------------------------- perplexity

def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tokenizer):
    vocab = len(tokenizer)
    model = FixedDistribution(torch.zeros(vocab))
    result = perplexity(model, tokenizer, ["年龄在18岁以上", "hello world", "答"], batch_size=2)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-5)


def test_perplexity_by_hand_with_a_fixed_distribution(tokenizer):
    vocab = len(tokenizer)
    torch.manual_seed(0)
    bias = torch.randn(vocab)
    log_p = torch.log_softmax(bias, dim=0)
    texts = ["年龄在18岁以上", "hello world, hello", "答：疾病"]
    # every token but the first of each text is predicted, each with probability p[token]
    targets = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"][1:]]
    expected = math.exp(-sum(log_p[t].item() for t in targets) / len(targets))
    result = perplexity(FixedDistribution(bias), tokenizer, texts, batch_size=2)
    assert result["tokens"] == len(targets)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    # with prompts, only the response tokens and the EOS after them count
    prompts = ["问：", "Q: ", "判断类别："]
    targets = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    expected = math.exp(-sum(log_p[t].item() for t in targets) / len(targets))
    result = perplexity(FixedDistribution(bias), tokenizer, texts, prompts=prompts, batch_size=3)
    assert result["tokens"] == len(targets)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_perplexity_matches_the_model_loss_and_ignores_padding(tokenizer, tiny_model):
    text = "本研究纳入年龄在18至65岁之间的患者。"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = tiny_model(input_ids=ids, labels=ids).loss.item()
    assert perplexity(tiny_model, tokenizer, [text])["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    texts = [text, "答", "a much longer English sentence that needs padding in the other rows of the batch"]
    together = perplexity(tiny_model, tokenizer, texts, batch_size=3)
    one_by_one = perplexity(tiny_model, tokenizer, texts, batch_size=1)
    assert together["perplexity"] == pytest.approx(one_by_one["perplexity"], rel=1e-4)


def test_perplexity_bad_input(tokenizer, tiny_model):
    with pytest.raises(TypeError, match="list of texts"):
        perplexity(tiny_model, tokenizer, "a text")
    with pytest.raises(ValueError, match="no texts"):
        perplexity(tiny_model, tokenizer, [])
    with pytest.raises(ValueError, match="1 prompts for 2 texts"):
        perplexity(tiny_model, tokenizer, ["a", "b"], prompts=["q"])
