"""Rewards for RLHF: a verifiable reward (is the gold answer there?) and reward-model scores.

Two kinds of reward drive notebooks/09_rlhf.ipynb and notebooks/10_dpo_and_grpo.ipynb:

- a *learned* reward: a sequence-classification model trained on preference pairs (Bradley–Terry),
  trained as notebook 09's stage 2 does it (`train_reward_model`) and read with `score_with_reward_model`
  exactly as TRL's `RewardTrainer` fed it during training (prompt + response + EOS, one score at the last token);
- a *verifiable* reward: `is_correct` checks the gold `answer` of the course's tasks (arithmetic,
  ordering numbers, translation, which department) by a rule, so GRPO (notebook 10) can train without any
  reward model and every method can be scored for task correctness.

Taught in notebooks/09_rlhf.ipynb; the theory is in lessons/09_rlhf.md and lessons/10_dpo_and_grpo.md.
"""
from __future__ import annotations

import re
import unicodedata

from .generation import normalize_answer
from .models import evaluating

_NUMBER = re.compile(r"-?\d+")
_NUMBER_LIST = re.compile(r"^-?\d+(\s*,\s*-?\d+)*$")


def extract_numbers(text: str) -> list[int]:
    """Every integer in `text`, in order ("28 减 6 等于 22。" -> [28, 6, 22]).

    Taught in notebooks/09_rlhf.ipynb.
    """
    return [int(n) for n in _NUMBER.findall(unicodedata.normalize("NFKC", text or ""))]


def is_correct(completion: str, answer: str) -> bool:
    """Whether `completion` gives the gold `answer`, by a rule that cannot be argued with.

    - Numeric answers ("22", or a list "15, 21, 49" for ordering tasks): the LAST k integers of the
      completion must equal the k integers of the answer. "Last" matters: a reply repeats the question's
      numbers first ("28 减 6 等于 22"), and "28 减 6 等于 21" must not pass because it contains 6.
    - Text answers (a department, a translated word): the answer must occur in the completion after
      `helpers.generation.normalize_answer` (NFKC, lower case, spaces and punctuation removed); an ASCII
      answer must also be a whole word, so "ear" does not pass inside "heart".

    Taught in notebooks/09_rlhf.ipynb.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"answer must be a non-empty string (the gold answer of the task), got {answer!r}")
    completion = completion or ""
    gold = answer.strip()
    if _NUMBER_LIST.match(gold):
        wanted = extract_numbers(gold)
        found = extract_numbers(completion)
        return len(found) >= len(wanted) and found[-len(wanted):] == wanted
    if gold.isascii():
        text = unicodedata.normalize("NFKC", completion).lower()
        return re.search(r"(?<![a-z0-9])" + re.escape(gold.lower()) + r"(?![a-z0-9])", text) is not None
    flat = normalize_answer(completion.replace("\n", " "))
    return normalize_answer(gold) in flat


def _completion_text(completion) -> str:
    """TRL passes plain strings for standard data and [{"role", "content"}, ...] for conversational data."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def correctness_reward(prompts=None, completions=None, answer=None, **kwargs) -> list[float]:
    """The verifiable reward for TRL's `GRPOTrainer`: 1.0 per completion that `is_correct`, else 0.0.

    GRPOTrainer calls reward functions with keyword arguments: `prompts`, `completions` and every other
    dataset column, so the `answer` column of `preference_pairs` arrives as `answer` (one per completion).
    Taught in notebooks/09_rlhf.ipynb.
    """
    if completions is None or answer is None:
        raise ValueError("correctness_reward needs `completions` and `answer` (a dataset column with the gold answers)")
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions for {len(answer)} answers")
    return [1.0 if is_correct(_completion_text(c), a) else 0.0 for c, a in zip(completions, answer)]


def partial_credit(completion: str, answer: str) -> float:
    """A denser verifiable reward in [0, 1]: 1.0 when `is_correct`, and partial credit for near misses.

    - a list of numbers (ordering tasks): the share of positions where the completion's last k numbers
      match the answer ("1, 41, 47" for "2, 32, 47" earns 1/3);
    - one number (arithmetic): 1 - |given - gold| / 10, floored at 0 (off by 2 earns 0.8);
    - text answers: 1.0 or 0.0, as `is_correct`.

    A tiny policy rarely gets an answer exactly right, and GRPO learns nothing from a group whose rewards
    are all equal; partial credit gives it a gradient. Taught in notebooks/09_rlhf.ipynb.
    """
    if is_correct(completion, answer):
        return 1.0
    gold = answer.strip()
    if not _NUMBER_LIST.match(gold):
        return 0.0
    wanted = extract_numbers(gold)
    found = extract_numbers(completion or "")
    if not found:
        return 0.0
    if len(wanted) == 1:
        return max(0.0, 1.0 - abs(found[-1] - wanted[0]) / 10)
    given = found[-len(wanted):]
    return sum(g == w for g, w in zip(reversed(given), reversed(wanted))) / len(wanted)


def partial_credit_reward(prompts=None, completions=None, answer=None, **kwargs) -> list[float]:
    """`partial_credit` per completion, with the keyword signature TRL's `GRPOTrainer` calls reward functions with.

    Taught in notebooks/09_rlhf.ipynb.
    """
    if completions is None or answer is None:
        raise ValueError("partial_credit_reward needs `completions` and `answer` (a dataset column with the gold answers)")
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions for {len(answer)} answers")
    return [partial_credit(_completion_text(c), a) for c, a in zip(completions, answer)]


def correctness_rate(completions: list[str], answers: list[str]) -> float:
    """Share of completions that `is_correct`, in percent. Taught in notebooks/09_rlhf.ipynb."""
    if not answers:
        raise ValueError("no examples to score")
    return 100.0 * sum(correctness_reward(completions=completions, answer=answers)) / len(answers)


def reward_model_texts(tokenizer, prompts: list[str], responses: list[str]) -> list[str]:
    """What the reward model reads: prompt + response + EOS, the way TRL's RewardTrainer built its inputs.

    Taught in notebooks/09_rlhf.ipynb.
    """
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("prompts and responses must be lists of strings")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    eos = tokenizer.eos_token
    return [p + r + ("" if r.endswith(eos) else eos) for p, r in zip(prompts, responses)]


def score_with_reward_model(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 32,
                            max_length: int = 256):
    """The reward model's scalar score for each (prompt, response), as a float32 CPU tensor.

    The sequence-classification head reads the hidden state of the last non-padding token, which is the
    EOS that `reward_model_texts` appends. Taught in notebooks/09_rlhf.ipynb.
    """
    import torch

    texts = reward_model_texts(tokenizer, prompts, responses)
    device = next(model.parameters()).device
    scores = []
    with evaluating(model), torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=max_length, add_special_tokens=False).to(device)
            scores.append(model(**batch).logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def pairwise_accuracy(chosen_scores, rejected_scores) -> float:
    """Share of pairs where the chosen answer outscores the rejected one, in percent (chance is 50).

    Taught in notebooks/09_rlhf.ipynb.
    """
    if len(chosen_scores) != len(rejected_scores):
        raise ValueError(f"{len(chosen_scores)} chosen scores for {len(rejected_scores)} rejected scores")
    if len(chosen_scores) == 0:
        raise ValueError("no pairs to score")
    wins = sum(float(c) > float(r) for c, r in zip(chosen_scores, rejected_scores))
    return 100.0 * wins / len(chosen_scores)


def train_reward_model(sft_dir, tokenizer, pairs, *, output_dir, max_steps: int, batch_size: int,
                       learning_rate: float, lora_r: int, lora_alpha: int, seed: int):
    """Stage 2 of notebooks/09_rlhf.ipynb, as its cell runs it: a reward model trained on preference pairs.

    The SFT model in `sft_dir` with a new one-output score head (`head="sequence-classification"`), LoRA on
    every linear layer (`task_type="SEQ_CLS"` also trains the score head), TRL's `RewardTrainer` (Bradley–Terry
    loss) on `pairs`' prompt, chosen and rejected columns; bf16 only on a GPU that computes it natively.
    Returns (reward_model in eval mode, a peft model; seconds spent training). The same code as the notebook's
    cell: change both. Taught in notebooks/09_rlhf.ipynb; notebooks/10_dpo_and_grpo.ipynb trains it with this
    when notebook 09's saved one is not there.
    """
    import time

    import torch
    import transformers
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    from .env import bf16_supported
    from .models import load_model, lora_target_modules

    use_bf16 = torch.cuda.is_available() and bf16_supported()  # compute capability >= 8.0 (not a T4)
    transformers.set_seed(seed)
    rm_base = load_model(str(sft_dir), head="sequence-classification", num_labels=1, verbose=False)
    rm_lora = LoraConfig(task_type="SEQ_CLS", r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                         target_modules=lora_target_modules(rm_base, "all"))
    rm_args = RewardConfig(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=5, logging_steps=10,
        max_length=128, bf16=use_bf16, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        save_strategy="no", report_to="none", disable_tqdm=True, seed=seed)
    rm_trainer = RewardTrainer(model=rm_base, args=rm_args, processing_class=tokenizer, peft_config=rm_lora,
                               train_dataset=pairs.select_columns(["prompt", "chosen", "rejected"]))
    rm_trainer.remove_callback(transformers.PrinterCallback)
    started = time.perf_counter()
    rm_trainer.train()
    return rm_trainer.model.eval(), time.perf_counter() - started
