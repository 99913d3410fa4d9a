"""helpers.metrics: BLEU-4 and ROUGE the seeds' way, checked against values worked out by hand.

Every expected number below comes from counting n-grams on paper (the counts are written next to it), not
from calling NLTK or rouge-chinese. BLEU-4 = BP · (p1·p2·p3·p4)^(1/4), p_n the clipped n-gram precision; a
p_n with no match becomes 1/(2^k · hypothesis n-grams) for the k-th such order (smoothing method 3).
rouge-chinese's ROUGE-1/2 count DISTINCT n-grams: P = overlap/hyp, R = overlap/ref, F = 2PR/(P+R).
"""
import math

import pytest

from helpers import metrics
from helpers.metrics import bleu4, bootstrap_ci, corpus_scores, per_example, rouge, segment, similarity, words

SENTENCE_PRED = "今天天气很好，我们去公园散步。"
SENTENCE_REF = "今天天气不错，我们去公园走走。"


def f1(p, r):
    return 2 * p * r / (p + r)


def test_jieba_cuts_the_example_as_expected():
    # jieba 0.42.1, default dictionary: the segmentation the ROUGE counts below are based on
    assert segment(SENTENCE_PRED) == ["今天天气", "很", "好", "，", "我们", "去", "公园", "散步", "。"]
    assert segment(SENTENCE_REF) == ["今天天气", "不错", "，", "我们", "去", "公园", "走走", "。"]


def test_bleu4_on_characters_by_hand():
    # 15 characters each. Clipped matches: 1-grams 11/15 (今 天 天 气 ， 我 们 去 公 园 。),
    # 2-grams 8/14 (今天 天天 天气 ，我 我们 们去 去公 公园), 3-grams 6/13, 4-grams 4/12; BP = 1.
    expected = 100 * (11 / 15 * 8 / 14 * 6 / 13 * 4 / 12) ** 0.25
    assert bleu4(SENTENCE_PRED, SENTENCE_REF) == round(expected, 4) == 50.3892  # FACTS.md's value


def test_rouge_on_jieba_words_by_hand():
    # unigrams: 9 distinct in the prediction, 8 in the reference, 6 shared (今天天气 ， 我们 去 公园 。)
    # bigrams: 8 and 7, 3 shared (，我们 / 我们去 / 去公园); LCS: 6 words
    scores = rouge(SENTENCE_PRED, SENTENCE_REF)
    assert scores["rouge-1"] == pytest.approx(100 * f1(6 / 9, 6 / 8), abs=1e-4)
    assert scores["rouge-2"] == pytest.approx(100 * f1(3 / 8, 3 / 7), abs=1e-4)
    assert scores["rouge-l"] == pytest.approx(100 * f1(6 / 9, 6 / 8), abs=1e-4)
    assert scores == {"rouge-1": 70.5882, "rouge-2": 40.0, "rouge-l": 70.5882}  # FACTS.md's values


def test_a_perfect_two_character_answer_is_not_100_bleu():
    # "年龄" vs "年龄": p1 = 2/2, p2 = 1/1, no 3- or 4-grams: 0/1 -> 1/2 and 1/4 (method 3)
    assert bleu4("年龄", "年龄") == round(100 * (1 * 1 * 1 / 2 * 1 / 4) ** 0.25, 4) == 59.4604
    # one word: no bigrams at all, so ROUGE-2 is 0 for a perfect answer
    assert rouge("年龄", "年龄") == {"rouge-1": 100.0, "rouge-2": 0.0, "rouge-l": 100.0}


def test_short_prediction_pays_the_brevity_penalty():
    # "实验室" (3 chars) vs "实验室检查" (5): p1..p3 = 1, p4 = 0/1 -> 1/2; BP = exp(1 - 5/3)
    expected = 100 * math.exp(1 - 5 / 3) * (1 / 2) ** 0.25
    assert bleu4("实验室", "实验室检查") == round(expected, 4)
    # jieba: [实验室] vs [实验室, 检查]: P = 1, R = 1/2
    assert rouge("实验室", "实验室检查") == {"rouge-1": round(100 * f1(1, 1 / 2), 4), "rouge-2": 0.0,
                                               "rouge-l": round(100 * f1(1, 1 / 2), 4)}


def test_mixed_chinese_and_english():
    pred, ref = "I love NLP模型 fine-tuning", "I love LLM模型微调"
    # characters (spaces included): 24 vs 14; clipped matches 10/24 (I, 2 spaces, l o v e, L, 模 型),
    # 7/23 (I_ _l lo ov ve e_ 模型), 5/22 (I_l _lo lov ove ve_), 4/21 (I_lo _lov love ove_); BP = 1
    assert bleu4(pred, ref) == round(100 * (10 / 24 * 7 / 23 * 5 / 22 * 4 / 21) ** 0.25, 4)
    # jieba keeps English words whole: I love NLP 模型 fine - tuning (7) vs I love LLM 模型 微调 (5)
    assert segment(pred) == ["I", "love", "NLP", "模型", "fine", "-", "tuning"]
    # shared: I, love, 模型; bigrams 6 vs 4, shared "I love"; LCS = I love 模型
    assert rouge(pred, ref) == {"rouge-1": round(100 * f1(3 / 7, 3 / 5), 4), "rouge-2": round(100 * f1(1 / 6, 1 / 4), 4),
                                "rouge-l": round(100 * f1(3 / 7, 3 / 5), 4)}


def test_english_mode_counts_words():
    pred, ref = "The cat sat on the mat.", "The cat is on the mat."
    assert words(pred) == ["The", "cat", "sat", "on", "the", "mat", "."]
    # 7 words each: 1-grams 6/7, 2-grams 4/6 (The cat, on the, the mat, mat .), 3-grams 2/5, 4-grams 1/4
    scores = similarity(pred, ref, lang="en")
    assert scores["bleu-4"] == round(100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25, 4)
    assert scores["rouge-1"] == round(100 * f1(6 / 7, 6 / 7), 4)  # case kept: "The" and "the" differ
    assert scores["rouge-2"] == round(100 * f1(4 / 6, 4 / 6), 4)
    assert scores["rouge-l"] == round(100 * f1(6 / 7, 6 / 7), 4)  # LCS: The cat on the mat .
    # the same English scored the Chinese way (BLEU on characters) gives a different number
    assert similarity(pred, ref, lang="zh")["bleu-4"] != scores["bleu-4"]


def test_english_words_split_cjk_and_punctuation():
    assert words("LoRA微调, r=8!") == ["LoRA", "微", "调", ",", "r", "=", "8", "!"]


def test_rouge_counts_distinct_ngrams():
    # rouge-chinese uses sets: "the the the" has one distinct unigram, all of it in the reference
    assert rouge("the the the", "the", unit="word")["rouge-1"] == 100.0
    # BLEU clips instead: p1 = 1/3
    assert bleu4("the the the", "the", unit="word") < 100


def test_recall_and_precision_are_available():
    # jieba: 实验室 vs 实验室 检查 -> P = 1, R = 1/2
    assert rouge("实验室", "实验室检查", stat="r")["rouge-1"] == 50.0
    assert rouge("实验室", "实验室检查", stat="p")["rouge-1"] == 100.0


@pytest.mark.parametrize("pred, ref", [("", "年龄"), ("年龄", ""), ("", ""), ("   ", "年龄"), ("\n", "年龄")])
def test_empty_prediction_or_reference_scores_zero(pred, ref):
    assert similarity(pred, ref) == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert similarity(pred, ref, lang="en") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_seed_bleu_counts_whitespace_characters():
    # list("\n") is one character, so a lone newline "matches" a lone newline: p1 = 1, then 1/2, 1/4, 1/8.
    # ROUGE sees no words there and scores 0. Kept as the seeds compute it.
    assert similarity("\n", "\n") == {"bleu-4": round(100 * (1 / 2 * 1 / 4 * 1 / 8) ** 0.25, 4),
                                      "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_no_shared_character_scores_zero_bleu():
    assert bleu4("药物", "年龄") == 0.0
    assert rouge("药物", "年龄") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_whitespace_split_treats_a_chinese_clause_as_one_word():
    assert segment(SENTENCE_PRED, "space") == [SENTENCE_PRED]
    assert rouge(SENTENCE_PRED, SENTENCE_REF, unit="space") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_corpus_score_is_the_mean_of_example_scores():
    preds, refs = ["年龄", "药物", "实验室"], ["年龄", "年龄", "实验室检查"]
    rows = per_example(preds, refs)
    assert [row["bleu-4"] for row in rows] == [59.4604, 0.0, bleu4("实验室", "实验室检查")]
    assert corpus_scores(preds, refs)["bleu-4"] == pytest.approx((59.4604 + 0 + rows[2]["bleu-4"]) / 3)
    assert corpus_scores(preds, refs)["rouge-1"] == pytest.approx((100 + 0 + 100 * f1(1, 1 / 2)) / 3, abs=1e-4)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="lang must be one of"):
        similarity("a", "a", lang="fr")
    with pytest.raises(ValueError, match="unit must be one of"):
        segment("a", "letters")
    with pytest.raises(ValueError, match="stat must be"):
        rouge("a", "a", stat="x")
    with pytest.raises(TypeError, match="prediction must be a str"):
        bleu4(None, "a")
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        per_example(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="lists of strings"):
        corpus_scores("ab", "ab")
    with pytest.raises(ValueError, match="no examples"):
        corpus_scores([], [])


def test_jieba_is_loaded_quietly_and_once(capfd):
    metrics._jieba.cache_clear()
    segment("第一次分词")
    captured = capfd.readouterr()
    assert "prefix dict" not in captured.err + captured.out
    assert metrics._jieba() is metrics._jieba()


def test_bootstrap_of_constant_values_has_zero_width():
    assert bootstrap_ci([42.0] * 10) == {"mean": 42.0, "low": 42.0, "high": 42.0, "n": 10}


def test_bootstrap_of_two_points_spans_both():
    # resampling [0, 100] gives means 0, 50, 100 with probabilities 1/4, 1/2, 1/4: a 95% interval is [0, 100]
    ci = bootstrap_ci([0.0, 100.0], n_resamples=4000)
    assert (ci["mean"], ci["low"], ci["high"]) == (50.0, 0.0, 100.0)


def test_bootstrap_width_matches_the_normal_approximation():
    # 200 zeros and 200 hundreds: standard error 100 * sqrt(0.25 / 400) = 2.5, so a 95% CI is about +-4.9
    ci = bootstrap_ci([0.0, 100.0] * 200, n_resamples=4000)
    assert ci["mean"] == 50.0
    assert 2 * 1.96 * 2.5 * 0.9 < ci["high"] - ci["low"] < 2 * 1.96 * 2.5 * 1.1


def test_bootstrap_is_reproducible_and_nested():
    values = [0, 100, 100, 50, 0, 100, 20, 80, 100, 0]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    narrow, wide = bootstrap_ci(values, confidence=0.8), bootstrap_ci(values, confidence=0.99)
    assert wide["low"] <= narrow["low"] <= narrow["mean"] <= narrow["high"] <= wide["high"]


@pytest.mark.parametrize("kwargs, message", [({"values": []}, "non-empty"), ({"values": [1.0], "confidence": 95},
                                             "between 0 and 1"), ({"values": [1.0], "n_resamples": 0}, "at least 1")])
def test_bootstrap_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(**kwargs)


def test_same_numbers_as_the_seeds_code_on_real_text():
    """Conformance: the seeds' ComputeMetrics, written out as they call the libraries, on 200 random pairs
    cut from the course's test split (prompts with newlines, labels, empty strings, mixed scripts)."""
    import json
    import logging
    import random

    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    from helpers.env import REPO_ROOT

    jieba.setLogLevel(logging.WARNING)

    def seeds(pred, label):
        hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        scores = {k: round(v["f"] * 100, 4) for k, v in result.items()}
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        return {"bleu-4": round(bleu * 100, 4), **scores}

    lines = (REPO_ROOT / "data" / "promptcblue_ctc" / "test.json").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    texts = [r["input"] for r in rows] + [r["target"] for r in rows] + ["", " ", "I love NLP模型 fine-tuning", "甲。\n\n乙"]
    rng = random.Random(0)
    for _ in range(200):
        pred, label = rng.choice(texts), rng.choice(texts)
        pred = pred[rng.randrange(len(pred) + 1):] if rng.random() < 0.5 else pred
        assert similarity(pred, label) == seeds(pred, label), (pred, label)
