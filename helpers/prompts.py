"""Prompt templates, tokenization with the loss on the response only, and the padding collator.

Labels are -100 (ignored by the loss) on every prompt token, so the model is trained to answer, not
to repeat the question. Taught in notebooks/00_setup_and_tour.ipynb; the multi-turn format
`<s>input1</s>target1</s>input2</s>target2</s>` is used in notebooks/04_qlora_training.ipynb.
"""
from __future__ import annotations

from collections.abc import Mapping

from .data import columns_of, format_of

IGNORE_INDEX = -100
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n{input_block}### Response:\n"
# (prompt column, response column) of each prompt/response format, read from helpers.data.FORMATS, the one
# table of columns ("alpaca" may also have a "query" column, "input"; a preference pair trains on "chosen").
PROMPT_RESPONSE_COLUMNS = {fmt: (columns_of(fmt)["prompt"], columns_of(fmt).get("response") or columns_of(fmt)["chosen"])
                           for fmt in ("promptcblue", "alpaca", "preference")}
FORMATS = (*PROMPT_RESPONSE_COLUMNS, "conversation")


def _check_length(name: str, value, minimum: int = 1) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number of tokens or None, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _a(fmt: str) -> str:
    return f"an {fmt}" if fmt[:1] in "aeiou" else f"a {fmt}"


def _check_eos(tokenizer) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no EOS token: every trained example ends with one "
                         "(load the tokenizer with helpers.models.load_tokenizer)")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The course's Alpaca-style prompt: instruction, optional input, then where the response starts."""
    input_block = f"### Input:\n{input}\n" if input else ""
    return ALPACA_TEMPLATE.format(instruction=instruction, input_block=input_block)


def prompt_and_response(example: dict, fmt: str | None = None) -> tuple[str, str]:
    """Split one dataset row into (prompt, response) for the formats of data/dataset_info.json.

    fmt: by default read from the row's columns (helpers.data.format_of).
    """
    if fmt is None and isinstance(example, Mapping):
        fmt = format_of(dict(example))
    if fmt in PROMPT_RESPONSE_COLUMNS:
        if not isinstance(example, Mapping):
            raise TypeError(f"{_a(fmt)} example must be a dict with columns {PROMPT_RESPONSE_COLUMNS[fmt]}, "
                            f"got {type(example).__name__}")
        missing = [c for c in PROMPT_RESPONSE_COLUMNS[fmt] if c not in example]
        if missing:
            raise ValueError(f"{_a(fmt)} example needs columns {', '.join(PROMPT_RESPONSE_COLUMNS[fmt])}; "
                             f"missing {', '.join(missing)} (it has: {', '.join(map(str, example)) or 'none'})")
        for column in (*PROMPT_RESPONSE_COLUMNS[fmt], *(("input",) if fmt == "alpaca" else ())):
            value = example.get(column)
            if not isinstance(value, str) and not (column == "input" and value is None):
                raise TypeError(f"column {column!r} of {_a(fmt)} example must be text, got {type(value).__name__}")
    if fmt == "promptcblue":
        return example["input"], example["target"]
    if fmt == "alpaca":
        return alpaca_prompt(example["instruction"], example.get("input") or ""), example["output"]
    if fmt == "preference":
        return example["prompt"], example["chosen"]
    raise ValueError(f"prompt_and_response supports formats 'promptcblue', 'alpaca' and 'preference', got {fmt!r}; "
                     "use tokenize_conversation for 'conversation'")


def tokenize_prompt_response(tokenizer, prompt: str, response: str, max_source_length: int | None = None,
                             max_target_length: int | None = None, max_length: int | None = None) -> dict[str, list[int]]:
    """input_ids = prompt + response + EOS; labels = -100 on the prompt, the ids on response + EOS.

    A prompt longer than `max_source_length` is an error (cutting it would cut off the question's end,
    "答：" included); a response is cut to `max_target_length` tokens, EOS included. `max_length` caps the
    whole example, cut from the right like a conversation; a prompt that leaves no response token is an error.
    """
    _check_length("max_source_length", max_source_length)
    _check_length("max_target_length", max_target_length)
    _check_length("max_length", max_length)
    for name, text in (("prompt", prompt), ("response", response)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a string, got {type(text).__name__}")
    _check_eos(tokenizer)
    source = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target = tokenizer(response, add_special_tokens=False)["input_ids"]
    if max_source_length is not None and len(source) > max_source_length:
        raise ValueError(f"prompt is {len(source)} tokens, more than max_source_length={max_source_length}: "
                         f"raise max_source_length or shorten the prompt ({prompt[:40]!r}...)")
    if max_target_length is not None:  # at least 1 (checked above): room for EOS
        target = target[: max_target_length - 1]
    if max_length is not None and len(source) >= max_length:
        raise ValueError(f"prompt is {len(source)} tokens, which fills max_length={max_length} before the response "
                         f"starts: nothing would be trained. Raise max_length or shorten the prompt ({prompt[:40]!r}...)")
    target = (target + [tokenizer.eos_token_id])[: None if max_length is None else max_length - len(source)]
    return {"input_ids": source + target, "attention_mask": [1] * (len(source) + len(target)),
            "labels": [IGNORE_INDEX] * len(source) + target}


# Room after the longest label when generating an answer: enough to see whether the model stops after it.
ANSWER_ROOM = 3


def lengths_from_data(tokenizer, *datasets, fmt: str | None = None) -> dict[str, int]:
    """Token lengths measured on the data with the tokenizer that loaded, never typed for one model.

    max_source_length: the longest prompt; max_target_length: the longest response + EOS (nothing is cut);
    max_new_tokens: the longest response + ANSWER_ROOM (to see whether generation stops after the answer).
    The same text is 1 token per character for the course's stand-in and 1 to 3 for Pythia's byte-level BPE.
    Taught in notebooks/02_lora_training.ipynb (the data cell).
    """
    if not datasets:
        raise ValueError("lengths_from_data needs at least one dataset")
    if any(isinstance(dataset, str) for dataset in datasets):
        raise TypeError("lengths_from_data(tokenizer, *datasets): pass datasets (their format is read from their "
                        "columns), or the format by name: fmt='promptcblue'")
    prompts, responses = [], []
    for dataset in datasets:
        dataset_fmt = fmt or format_of(dataset)
        for example in dataset:
            prompt, response = prompt_and_response(example, dataset_fmt)
            prompts.append(prompt)
            responses.append(response)
    if not prompts:
        raise ValueError("lengths_from_data got only empty datasets")
    longest = lambda texts: max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompt_max, response_max = longest(prompts), longest(responses)
    return {"max_source_length": prompt_max, "max_target_length": response_max + 1,
            "max_new_tokens": response_max + ANSWER_ROOM}


def tokenize_conversation(tokenizer, turns: list[dict], max_length: int | None = None,
                          human: str = "human", assistant: str = "assistant") -> dict[str, list[int]]:
    """`<s>input1</s>target1</s>input2</s>target2</s>` with the loss on the targets (and their </s>) only.

    `<s>`/`</s>` are the tokenizer's BOS/EOS tokens (for BLOOM literally `<s>` and `</s>`). Cut to
    `max_length` tokens from the right; a `max_length` that would leave no response token to train on
    is an error. Taught in notebooks/04_qlora_training.ipynb.
    """
    _check_length("max_length", max_length)
    if isinstance(turns, (str, dict)) or not hasattr(turns, "__len__"):
        raise TypeError(f"turns must be a list of {{{human!r}: ..., {assistant!r}: ...}} dicts, got {type(turns).__name__}")
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    _check_eos(tokenizer)
    if tokenizer.bos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no BOS token, which the <s>…</s> format starts with")
    input_ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise TypeError(f"turn {i} must be a dict with keys {human!r} and {assistant!r}, got {type(turn).__name__}")
        if human not in turn or assistant not in turn:
            raise ValueError(f"turn {i} needs keys {human!r} and {assistant!r}, has {sorted(turn)}")
        for key in (human, assistant):
            if not isinstance(turn[key], str):
                raise TypeError(f"turn {i}[{key!r}] must be a string, got {type(turn[key]).__name__}")
        asked = tokenizer(turn[human], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        said = tokenizer(turn[assistant], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids += asked + said
        labels += [IGNORE_INDEX] * len(asked) + said
    if max_length is not None:
        first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        if max_length <= first_trained:
            raise ValueError(f"max_length={max_length} cuts the conversation before its first response, which starts "
                             f"at token {first_trained}: nothing would be trained. Raise max_length above "
                             f"{first_trained} or shorten the first human turn")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_dataset(dataset, tokenizer, fmt: str | None = None, max_source_length: int | None = None,
                     max_target_length: int | None = None, max_length: int | None = None):
    """Tokenize a whole 🤗 dataset (from helpers.data.load_dataset), dropping its text columns.

    fmt: by default read from the dataset's columns (helpers.data.format_of); "promptcblue", "alpaca",
    "preference" (prompt + chosen) or "conversation". max_length caps every example (all formats);
    max_source_length / max_target_length are for the prompt/response formats.
    """
    fmt = fmt or format_of(dataset)
    if fmt not in FORMATS:
        raise ValueError(f"tokenize_dataset supports formats {', '.join(FORMATS)}, got {fmt!r} "
                         "('text' has no prompt and response: it is for pretraining, not fine-tuning)")
    needed = ("conversation",) if fmt == "conversation" else PROMPT_RESPONSE_COLUMNS[fmt]
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{_a(fmt)} dataset needs columns {', '.join(needed)}; missing {', '.join(missing)} "
                         f"(it has: {', '.join(dataset.column_names)})")
    for name, value in (("max_source_length", max_source_length), ("max_target_length", max_target_length),
                        ("max_length", max_length)):
        _check_length(name, value)
    if fmt == "conversation":
        fn = lambda ex: tokenize_conversation(tokenizer, ex["conversation"], max_length)  # noqa: E731
    else:
        fn = lambda ex: tokenize_prompt_response(tokenizer, *prompt_and_response(ex, fmt),  # noqa: E731
                                                 max_source_length, max_target_length, max_length)
    return dataset.map(fn, remove_columns=dataset.column_names, desc="tokenizing")


def collator(tokenizer, pad_to_multiple_of: int | None = None):
    """Dynamic padding: each batch is padded to its own longest example; labels are padded with -100."""
    from transformers import DataCollatorForSeq2Seq

    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad token, so batches cannot be padded: set tokenizer.pad_token "
                         "(helpers.models.load_tokenizer does)")
    _check_length("pad_to_multiple_of", pad_to_multiple_of)

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")


def show_label_mask(tokenizer, features: dict) -> str:
    """Render one tokenized example as spans: [masked …] for ignored tokens, «trained …» for the rest."""
    spans, current, masked = [], [], None
    for token, label in zip(features["input_ids"], features["labels"]):
        is_masked = label == IGNORE_INDEX
        if masked is not None and is_masked != masked:
            spans.append((masked, current))
            current = []
        masked = is_masked
        current.append(token)
    spans.append((masked, current))
    text = []
    for is_masked, ids in spans:
        piece = tokenizer.decode(ids).replace("\n", "\\n")
        text.append(f"[masked: {piece}]" if is_masked else f"«trained: {piece}»")
    return " ".join(text)
