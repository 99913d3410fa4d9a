"""Generating answers in batches and scoring them: accuracy, predict-with-generate files, perplexity.

Taught in notebooks/02_lora_training.ipynb (before/after accuracy); notebooks/11_evaluation.ipynb
adds predict-with-generate (`predict_with_generate` writes the seeds' `generated_predictions.jsonl`,
`score_predictions` scores that file with BLEU-4 and ROUGE from `helpers.metrics`), `match_choice` and
`perplexity` on top of the same `generate`.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from pathlib import Path

from .metrics import check_pairs, corpus_scores
from .models import evaluating

_PUNCTUATION = re.compile(r"[\s\u3000。，、；：？！,.;:?!\"'“”‘’（）()【】\[\]<>《》]+")


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 16,
             show_progress: bool = False, **generate_kwargs) -> list[str]:
    """Continue each prompt; return only the new text. Greedy unless `do_sample=True` is passed.

    Prompts are padded on the LEFT, so every row's last token is its prompt's end and the new tokens
    line up (right padding would put pad tokens between a short prompt and its answer).
    """
    import torch

    if isinstance(prompts, str):
        raise TypeError("generate takes a list of prompts; wrap a single prompt in a list")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    device = next(model.parameters()).device
    outputs: list[str] = []
    batches = range(0, len(prompts), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating", leave=False)
    with evaluating(model, tokenizer), torch.no_grad():
        for start in batches:
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, **generate_kwargs)
            new = ids[:, batch["input_ids"].shape[1]:]
            outputs += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return outputs


def normalize_answer(text: str) -> str:
    """First line, Unicode NFKC (full-width → half-width), punctuation and spaces removed, lower case."""
    first_line = (text or "").strip().split("\n", 1)[0]
    return _PUNCTUATION.sub("", unicodedata.normalize("NFKC", first_line)).lower()


def choice_accuracy(predictions: list[str], targets: list[str]) -> float:
    """Share of predictions equal to their target after `normalize_answer` (exact match), in percent."""
    check_pairs(predictions, targets)
    hits = sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(predictions, targets))
    return 100.0 * hits / len(targets)


def match_choice(prediction: str, choices: list[str]) -> str | None:
    """The answer choice the prediction names after `normalize_answer`, or None if it names none exactly.

    Exact match only: a prediction that merely CONTAINS a choice (say, one that repeats the whole list of
    options) matches nothing. Taught in notebooks/11_evaluation.ipynb.
    """
    if isinstance(choices, str) or not choices:
        raise ValueError(f"choices must be a non-empty list of strings, got {choices!r}")
    wanted = normalize_answer(prediction)
    found = [choice for choice in choices if normalize_answer(choice) == wanted]
    return found[0] if wanted and found else None


def predict_with_generate(model, tokenizer, examples, path, *, prompt_column: str = "input",
                          response_column: str = "target", max_new_tokens: int = 16, batch_size: int = 16,
                          show_progress: bool = False, **generate_kwargs) -> list[dict]:
    """Generate an answer for every example and write them as JSON lines, like the seeds' `--do_predict`.

    `examples`: a 🤗 Dataset or a list of dicts with `prompt_column` and `response_column`. Generation is
    `generate`'s: batched, left padding, greedy unless `do_sample=True`. Each line of `path` is
    `{"prompt": ..., "predict": ..., "label": ...}` (LLaMA-Factory's `generated_predictions.jsonl`; ChatGLM
    Efficient Tuning wrote the same `predict`/`label` pairs). Returns the records written.
    Taught in notebooks/11_evaluation.ipynb.
    """
    rows = list(examples)
    if not rows:
        raise ValueError("no examples to predict")
    missing = {prompt_column, response_column} - set(rows[0])
    if missing:
        raise ValueError(f"examples lack the columns {sorted(missing)}; they have {sorted(rows[0])}")
    prompts = [row[prompt_column] for row in rows]
    predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           show_progress=show_progress, **generate_kwargs)
    records = [{"prompt": prompt, "predict": predict, "label": row[response_column]}
               for prompt, predict, row in zip(prompts, predictions, rows)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records


def read_predictions(path) -> list[dict]:
    """Read a predictions file (JSON lines with string fields "predict" and "label"), checking every line.

    Taught in notebooks/11_evaluation.ipynb.
    """
    records = []
    with Path(path).open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("predict", "label")):
                raise ValueError(f"{path}, line {number}: needs string fields 'predict' and 'label', got {line[:80]!r}")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no predictions")
    return records


def score_predictions(path, lang: str = "zh") -> dict[str, float]:
    """Score a predictions file: BLEU-4, ROUGE-1/2/L (the seeds' way, ×100) and exact-match accuracy (%).

    lang: "zh" (BLEU on characters, ROUGE on jieba words) or "en" (both on words); see helpers.metrics.
    Reads the file, so what is scored is exactly what was saved. Taught in notebooks/11_evaluation.ipynb.
    """

    records = read_predictions(path)
    predictions = [r["predict"] for r in records]
    labels = [r["label"] for r in records]
    scores = corpus_scores(predictions, labels, lang=lang)
    scores["accuracy"] = choice_accuracy(predictions, labels)
    scores["n"] = len(records)
    return scores


def perplexity(model, tokenizer, texts: list[str], prompts: list[str] | None = None, batch_size: int = 8,
               max_length: int | None = None) -> dict[str, float]:
    """Perplexity exp(total negative log-likelihood / number of predicted tokens) of `texts`.

    Without `prompts`: every token of each text after its first is predicted. With `prompts` (one per
    text): only the text and the EOS after it count, given the prompt, i.e. the training loss of
    `helpers.prompts.tokenize_prompt_response`. Token-weighted over the whole set (not a mean of per-batch
    means, which padding would skew). `max_length` cuts each sequence from the right.
    Returns {"perplexity", "nll_per_token", "tokens"}. Taught in notebooks/11_evaluation.ipynb.
    """
    import torch
    import torch.nn.functional as F

    from .prompts import IGNORE_INDEX, tokenize_prompt_response

    if isinstance(texts, str):
        raise TypeError("perplexity takes a list of texts; wrap a single text in a list")
    if not texts:
        raise ValueError("no texts to score")
    if prompts is not None and len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts for {len(texts)} texts")
    features = []
    for i, text in enumerate(texts):
        if prompts is None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            labels = list(ids)
        else:
            pair = tokenize_prompt_response(tokenizer, prompts[i], text)
            ids, labels = pair["input_ids"], pair["labels"]
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        features.append((ids, labels))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with evaluating(model), torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = features[start:start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, labs) in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                labels[row, :len(labs)] = torch.tensor(labs)
                mask[row, :len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            targets = labels[:, 1:].to(device)  # token t is predicted from the tokens before it
            total_nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum").item()
            total_tokens += int((targets != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError("no tokens to predict: every text is a single token (or empty)")
    nll = total_nll / total_tokens
    return {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": total_tokens}
