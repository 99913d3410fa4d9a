"""Three ways to batch tokenized examples, and how much of each batch is padding.

  fixed     every example padded to max_source_length + max_target_length (the seed commands'
            `pad_to_max_length`): simple, and most of the compute goes to padding
  dynamic   each batch padded to its own longest example (helpers.prompts.collator); with
            `group_by_length` the Trainer puts examples of similar length in the same batch
  packed    several examples concatenated into one block of `block_size` tokens, so that almost
            no position is padding (examples are kept whole; attention is not masked between them)

Taught in notebooks/14_speed_and_memory.ipynb.
"""
from __future__ import annotations

import random

from helpers.prompts import IGNORE_INDEX


def pad_to_length(dataset, length: int, pad_token_id: int):
    """Pad every example of a tokenized dataset to exactly `length` tokens (labels -100, mask 0)."""
    longest = max(len(ids) for ids in dataset["input_ids"])
    if longest > length:
        raise ValueError(f"an example has {longest} tokens, more than length={length}: raise the length")

    def pad(example):
        n = length - len(example["input_ids"])
        return {"input_ids": example["input_ids"] + [pad_token_id] * n,
                "attention_mask": example["attention_mask"] + [0] * n,
                "labels": example["labels"] + [IGNORE_INDEX] * n}

    return dataset.map(pad, desc="padding")


def pack(dataset, block_size: int, pad_token_id: int, seed: int = 0):
    """Pack whole examples into blocks of `block_size` tokens (first fit, in a seeded random order).

    Each example keeps its own labels (-100 on its prompt), so the loss is the same per example as
    unpacked; a block's leftover positions are padding. Returns a datasets.Dataset of equal-length rows.
    """
    from datasets import Dataset

    rows = [dict(input_ids=i, attention_mask=m, labels=l) for i, m, l in
            zip(dataset["input_ids"], dataset["attention_mask"], dataset["labels"])]
    too_long = [len(r["input_ids"]) for r in rows if len(r["input_ids"]) > block_size]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than block_size={block_size} (up to {max(too_long)})")
    random.Random(seed).shuffle(rows)
    blocks: list[dict] = []
    for row in rows:
        for block in blocks:  # first block with room
            if len(block["input_ids"]) + len(row["input_ids"]) <= block_size:
                break
        else:
            block = {"input_ids": [], "attention_mask": [], "labels": []}
            blocks.append(block)
        for key in block:
            block[key] += row[key]
    for block in blocks:
        n = block_size - len(block["input_ids"])
        block["input_ids"] += [pad_token_id] * n
        block["attention_mask"] += [0] * n
        block["labels"] += [IGNORE_INDEX] * n
    return Dataset.from_list(blocks)


def padding_fraction(lengths: list[int], batch_size: int, how: str, pad_to: int | None = None,
                     seed: int = 42) -> float:
    """The share of token positions that are padding over one epoch of batches.

    how: "fixed" (all padded to `pad_to`), "dynamic" (random batches, each padded to its longest) or
    "grouped" (the Trainer's LengthGroupedSampler order with `seed`, then dynamic padding).
    """
    import torch

    if how == "fixed":
        if pad_to is None or pad_to < max(lengths):
            raise ValueError(f"how='fixed' needs pad_to >= the longest example ({max(lengths)}), got {pad_to}")
        return 1 - sum(lengths) / (pad_to * len(lengths))
    if how == "dynamic":
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    elif how == "grouped":
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))
        order = list(sampler)
    else:
        raise ValueError(f"how must be 'fixed', 'dynamic' or 'grouped', got {how!r}")
    slots = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        slots += max(batch) * len(batch)
    return 1 - sum(lengths) / slots
