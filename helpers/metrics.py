"""BLEU-4 and ROUGE-1/2/L as ChatGLM Efficient Tuning and LLaMA-Factory compute them, and a bootstrap CI.

Chinese mode (the seeds' way, `lang="zh"`), per example, then averaged over the examples:

- BLEU-4: NLTK `sentence_bleu` on CHARACTERS, uniform weights (1/4 each for 1- to 4-grams), smoothing
  method 3 (Chen & Cherry, 2014: the k-th n-gram order with no match counts 1/(2^k · hypothesis n-grams)), ×100;
- ROUGE-1/2/L: the F score of `rouge_chinese.Rouge` on WORDS cut by jieba, ×100; a side with no words
  (empty or whitespace only) scores 0.

Both are rounded to 4 decimals per example, as the seeds round them. English mode (`lang="en"`) uses the same
formulas on words (`words()`: runs of letters and digits, CJK characters and punctuation marks one by one),
because characters are the wrong unit for English. Taught in notebooks/11_evaluation.ipynb.

Nothing here does anything on import; jieba is loaded (quietly) on first use.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence


def check_pairs(predictions, references, references_name: str = "targets") -> None:
    """Reject what no score can be computed from: single strings, unequal lengths, nothing to score.

    Shared by every scorer of the course (BLEU/ROUGE here, `choice_accuracy` in helpers.generation).
    Taught in notebooks/02_lora_training.ipynb.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError(f"scores take two lists of strings (predictions, {references_name}), not single strings")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} {references_name}")
    if not references:
        raise ValueError("no examples to score")


LANGS = ("zh", "en")
UNITS = ("char", "jieba", "word", "space")
METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
# CJK ideographs (basic block, extension A, compatibility): one token each in `words()`.
_CJK = "\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


@functools.lru_cache(maxsize=1)
def _jieba():
    """The course's own jieba Tokenizer: default dictionary, loaded once, its log kept quiet.

    A private instance (not the global `jieba.cut`) gives the same cuts as the seeds' `jieba.cut` with the
    default dictionary, and cannot be changed by a `jieba.add_word` elsewhere in the process.
    """
    import jieba

    jieba.setLogLevel(logging.WARNING)  # hides "Building prefix dict from the default dictionary ..."
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer


def words(text: str) -> list[str]:
    """English-mode tokens: runs of letters/digits, each CJK character, each punctuation mark; no spaces."""
    return _WORD.findall(text)


def segment(text: str, unit: str = "jieba") -> list[str]:
    """Cut `text` into the units a metric counts.

    unit: "char" (every character, spaces included, as the seeds' BLEU sees them), "jieba" (jieba words,
    whitespace dropped), "word" (`words()`), "space" (`text.split()`: what an English metric does, and
    what happens to Chinese handed to it unsegmented: a whole clause becomes one "word").
    """
    _check_text(text, "text")
    if unit == "char":
        return list(text)
    if unit == "jieba":
        return [w for w in _jieba().cut(text) if w.strip()]
    if unit == "word":
        return words(text)
    if unit == "space":
        return text.split()
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")


def bleu4(prediction: str, reference: str, unit: str = "char") -> float:
    """Sentence BLEU-4 ×100 with smoothing method 3, on `unit`s (the seeds: characters), rounded to 4 decimals.

    An empty prediction, or one sharing no unit with the reference, scores 0.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    _check_text(prediction, "prediction")
    _check_text(reference, "reference")
    hypothesis, ref = segment(prediction, unit), segment(reference, unit)
    if not hypothesis or not ref:
        return 0.0
    score = sentence_bleu([ref], hypothesis, smoothing_function=SmoothingFunction().method3)
    return round(score * 100, 4)


def rouge(prediction: str, reference: str, unit: str = "jieba", stat: str = "f") -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L of rouge-chinese ×100 on `unit`s (the seeds: jieba words).

    stat: "f" (what the seeds report), "p" (precision) or "r" (recall). A side with no units scores 0 on all
    three (rouge-chinese itself would raise). rouge-chinese counts DISTINCT n-grams for ROUGE-1/2 and the
    longest common subsequence of the whole texts for ROUGE-L.
    """
    from rouge_chinese import Rouge

    if stat not in ("f", "p", "r"):
        raise ValueError(f"stat must be 'f', 'p' or 'r', got {stat!r}")
    _check_text(prediction, "prediction")
    _check_text(reference, "reference")
    if not segment(prediction, unit) or not segment(reference, unit):
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    # The seeds join jieba's raw cut, whitespace tokens included: rouge-chinese then splits sentences at
    # "。\n" and the like, and such a split can add an empty "word" to the counts. Kept, to match them exactly.
    hypothesis, ref = (" ".join(_jieba().cut(t)) if unit == "jieba" else " ".join(segment(t, unit))
                       for t in (prediction, reference))
    scores = Rouge().get_scores(hypothesis, ref)[0]
    return {name: round(scores[name][stat] * 100, 4) for name in ("rouge-1", "rouge-2", "rouge-l")}


def _units(lang: str) -> tuple[str, str]:
    if lang == "zh":
        return "char", "jieba"
    if lang == "en":
        return "word", "word"
    raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")


def similarity(prediction: str, reference: str, lang: str = "zh") -> dict[str, float]:
    """BLEU-4, ROUGE-1, ROUGE-2, ROUGE-L (×100) of one prediction: "zh" the seeds' units, "en" words."""
    bleu_unit, rouge_unit = _units(lang)
    return {"bleu-4": bleu4(prediction, reference, bleu_unit), **rouge(prediction, reference, rouge_unit)}


def per_example(predictions: Sequence[str], references: Sequence[str], lang: str = "zh") -> list[dict[str, float]]:
    """`similarity` of every (prediction, reference) pair, in order (the input of `bootstrap_ci`)."""
    _check_pairs(predictions, references)
    return [similarity(p, r, lang) for p, r in zip(predictions, references)]


def corpus_scores(predictions: Sequence[str], references: Sequence[str], lang: str = "zh") -> dict[str, float]:
    """The seeds' corpus figure: the MEAN of the per-example scores (not corpus BLEU), ×100."""
    rows = per_example(predictions, references, lang)
    return {name: sum(row[name] for row in rows) / len(rows) for name in METRIC_NAMES}


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> dict[str, float]:
    """Percentile bootstrap confidence interval of the mean of `values` (e.g. per-example BLEU-4).

    Resamples the examples with replacement `n_resamples` times with `numpy.random.default_rng(seed)`, so the
    interval is reproducible. Pass per-example DIFFERENCES between two models (same examples) to get a CI
    of the difference. Returns {"mean", "low", "high", "n"}.
    """
    import numpy as np

    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence of numbers, got shape {array.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, array.size, size=(n_resamples, array.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(array.mean()), "low": float(low), "high": float(high), "n": int(array.size)}


def _check_text(text, what: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str (use '' for an empty answer), got {type(text).__name__}")


def _check_pairs(predictions, references) -> None:
    check_pairs(predictions, references, "references")
