"""PPO for a causal language model, written out one small function at a time.

TRL removed its PPOTrainer (moved to trl.experimental in 0.26, gone from 1.13), so the course writes
the algorithm itself. notebooks/09_rlhf.ipynb writes the algorithm's pieces in its cells, each checked on
numbers worked out by hand (`kl_penalized_rewards`, `gae`, `whiten`, `clipped_policy_loss`, `value_loss`,
`ppo_epochs`, `ppo_step`); a cell that starts with `# saved in helpers/ppo.py` must define the same code as
this module (tests/test_hygiene.py compares them), which keeps them for the tests and for whoever imports
them. The plumbing (sampling, padding, the value head) is only here. One PPO iteration:

    1. `rollout`               sample a response to each prompt from the policy
    2. (reward function)       score each (prompt, response), e.g. helpers.rewards.score_with_reward_model
    3. `policy_forward`        log-probabilities and values of the policy before the update ("old")
       `response_logprobs`     log-probabilities of the same tokens under the frozen reference model
    4. `kl_penalized_rewards`  per-token reward: -kl_coef * (log pi - log pi_ref), plus the score on the last token
    5. `gae`                   advantages and returns (Generalized Advantage Estimation), `whiten`ed
    6. `ppo_epochs`            several epochs over shuffled minibatches of
                               `clipped_policy_loss` + vf_coef * `value_loss`

`ppo_step` runs one iteration; `evaluate_policy` measures mean reward and KL on held-out prompts.
Per-token tensors have shape (batch, response_length) and are aligned with the response tokens: entry
[b, t] belongs to response token t, predicted from everything before it. The formulas are in
lessons/09_rlhf.md. Taught in notebooks/09_rlhf.ipynb.

notebooks/10_dpo_and_grpo.ipynb starts where notebook 09 ended: `save_rlhf_start` keeps 09's SFT model,
reward model and PPO policy with the settings that made them, and `rlhf_start` gives them to notebook 10,
loaded when notebook 09 saved them with the same settings, else trained again by `train_rlhf_start` with
09's code (stages 1 to 3 as its cells run them).
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import evaluating


# --- configuration -------------------------------------------------------------------------------
@dataclass
class PPOConfig:
    """PPO's knobs. Defaults are the values of the PPO paper / TRL's old PPOTrainer (see lessons/09_rlhf.md).

    Taught in notebooks/09_rlhf.ipynb.
    """

    batch_size: int = 16          # prompts per rollout
    minibatch_size: int = 8       # rows per gradient step
    ppo_epochs: int = 4           # passes over one rollout batch
    learning_rate: float = 1e-5
    kl_coef: float = 0.05         # beta of the per-token KL penalty
    gamma: float = 1.0            # discount; 1.0 for text (the episode is one response)
    lam: float = 0.95             # GAE lambda
    clip_range: float = 0.2       # epsilon of the clipped ratio
    clip_range_value: float = 0.2  # how far a value prediction may move from its old value
    vf_coef: float = 0.1          # weight of the value loss
    max_grad_norm: float = 1.0
    max_new_tokens: int = 24
    temperature: float = 1.0      # sample from the policy as it is: top_k=0, top_p=1.0
    whiten_advantages: bool = True

    def __post_init__(self):
        positive = ("batch_size", "minibatch_size", "ppo_epochs", "learning_rate", "clip_range", "clip_range_value",
                    "max_grad_norm", "max_new_tokens", "temperature")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("kl_coef", "vf_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.minibatch_size > self.batch_size or self.batch_size % self.minibatch_size:
            raise ValueError(f"PPOConfig.minibatch_size ({self.minibatch_size}) must divide batch_size "
                             f"({self.batch_size}) so every epoch sees each rollout once")

    def as_dict(self) -> dict:
        return asdict(self)


# --- small tensor helpers ------------------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all entries, or along `dim`). Taught in notebooks/09_rlhf.ipynb."""
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same shape")
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalize the masked entries to mean 0 and standard deviation 1 (population std); others become 0.

    With `shift_mean=False` only the scale changes. Taught in notebooks/09_rlhf.ipynb.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits): (B, T, V) logits and (B, T) tokens -> (B, T).

    Taught in notebooks/09_rlhf.ipynb.
    """
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def response_mask(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1.0 on each response token up to and including the first EOS, 0.0 on what generate padded after it.

    A response without EOS (cut at max_new_tokens) keeps every token. Taught in notebooks/09_rlhf.ipynb.
    """
    is_eos = (responses == eos_token_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # how many EOS came strictly before this position
    return (eos_before == 0).float()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token (what `generate` uses).

    Taught in notebooks/09_rlhf.ipynb.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --- the policy and its value head ---------------------------------------------------------------
class PolicyWithValueHead(torch.nn.Module):
    """A causal LM (LoRA-wrapped or not) plus a value head: one linear layer on the last hidden state.

    The value head predicts, at every position, the return still to come; sharing the transformer with
    the policy (as TRL's AutoModelForCausalLMWithValueHead and the seed did) saves a second model. The
    head starts at zero, so the first values are 0. Taught in notebooks/09_rlhf.ipynb.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        hidden = model.config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(logits (B, T, V), values (B, T)) for a left-padded batch."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), output_hidden_states=True,
                         use_cache=False)
        values = self.value_head(out.hidden_states[-1].float()).squeeze(-1)
        return out.logits, values


@dataclass
class Rollout:
    """One batch of sampled responses: left-padded prompts, right-padded responses, and their mask."""

    prompts: list
    query_ids: torch.Tensor       # (B, P) left-padded prompt ids
    query_mask: torch.Tensor      # (B, P)
    responses: torch.Tensor       # (B, R) sampled ids, padded after EOS
    mask: torch.Tensor            # (B, R) float, see `response_mask`
    texts: list                   # decoded responses, EOS and padding removed

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask of prompt + response."""
        ids = torch.cat([self.query_ids, self.responses], dim=1)
        return ids, torch.cat([self.query_mask, self.mask.long()], dim=1)

    def select(self, idx: torch.Tensor) -> Rollout:
        """The rows `idx` of this batch (a minibatch)."""
        rows = idx.tolist()
        return Rollout([self.prompts[i] for i in rows], self.query_ids[idx], self.query_mask[idx], self.responses[idx],
                       self.mask[idx], [self.texts[i] for i in rows])


def _lm(model):
    return model.model if isinstance(model, PolicyWithValueHead) else model


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, temperature: float = 1.0,
            do_sample: bool = True) -> Rollout:
    """Sample one response per prompt from the policy (top_k=0, top_p=1: the distribution as it is).

    Prompts are padded on the left so every response starts at the same column. Taught in
    notebooks/09_rlhf.ipynb.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("rollout takes a non-empty list of prompts")
    lm = _lm(model)
    device = next(lm.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    with evaluating(lm, tokenizer):
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = lm.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, **sampling)
    responses = out[:, batch["input_ids"].shape[1]:]
    mask = response_mask(responses, tokenizer.eos_token_id)
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(responses, mask)]
    return Rollout(list(prompts), batch["input_ids"], batch["attention_mask"], responses, mask, texts)


def policy_forward(policy: PolicyWithValueHead, ro: Rollout):
    """Logits (B, R, V) and values (B, R) of the policy at the positions that predict each response token."""
    ids, attention = ro.full()
    logits, values = policy(ids, attention)
    start = ro.query_ids.shape[1] - 1
    end = ids.shape[1] - 1
    return logits[:, start:end], values[:, start:end]


def response_logprobs(model, ro: Rollout, return_logits: bool = False):
    """log p(response token) under `model` (the frozen reference, or any causal LM), shape (B, R).

    Taught in notebooks/09_rlhf.ipynb.
    """
    ids, attention = ro.full()
    if isinstance(model, PolicyWithValueHead):
        logits, _ = policy_forward(model, ro)
    else:
        out = model(input_ids=ids, attention_mask=attention, position_ids=position_ids_from_mask(attention),
                    use_cache=False)
        logits = out.logits[:, ro.query_ids.shape[1] - 1: ids.shape[1] - 1]
    logprobs = logprobs_from_logits(logits, ro.responses)
    return (logprobs, logits) if return_logits else logprobs


# --- rewards, advantages and the two losses ------------------------------------------------------
def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float):
    """Per-token rewards r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t)), plus the score on the last token.

    Returns (rewards, kl), both (B, R) and 0 outside the mask. The KL term is paid token by token, so the
    policy learns where it drifted; the reward model's score arrives once, at the end of the response.
    Taught in notebooks/09_rlhf.ipynb.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if not (logprobs.shape == ref_logprobs.shape == mask.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    if scores.shape != (logprobs.shape[0],):
        raise ValueError(f"scores must have shape ({logprobs.shape[0]},), one per response, got {tuple(scores.shape)}")
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype) * (mask.sum(dim=1) > 0)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalized Advantage Estimation, backwards over the response tokens.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V                                 (the value head's regression target)

    Returns (advantages, returns), 0 outside the mask. lam=1 gives Monte-Carlo returns minus the value,
    lam=0 the one-step TD error. Taught in notebooks/09_rlhf.ipynb.
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} "
                         "must have the same shape")
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_range: float = 0.2):
    """PPO's clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    ratio = pi_new(a_t) / pi_old(a_t). Taking the max of the two losses (the min of the two objectives)
    removes any gain from moving the ratio beyond 1 +/- eps in the direction the advantage favours.
    Returns (loss, stats) with the share of clipped tokens and an estimate of KL(old || new).
    Taught in notebooks/09_rlhf.ipynb.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, {"clipfrac": clipfrac.item(), "approx_kl": approx_kl.item()}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float = 0.2) -> torch.Tensor:
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (V_clipped - R)^2).

    V_clipped = V_old + clip(V - V_old, -c, c) keeps one minibatch from moving the value far from the
    estimate the advantages were computed with. Taught in notebooks/09_rlhf.ipynb.
    """
    if clip_range_value <= 0:
        raise ValueError(f"clip_range_value must be > 0, got {clip_range_value}")
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def minibatch_indices(n: int, minibatch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A shuffled partition of range(n) into minibatches of `minibatch_size` (the last may be smaller).

    Taught in notebooks/09_rlhf.ipynb.
    """
    if n < 1 or minibatch_size < 1:
        raise ValueError(f"need n >= 1 and minibatch_size >= 1, got n={n}, minibatch_size={minibatch_size}")
    order = torch.randperm(n, generator=generator)
    return [order[i:i + minibatch_size] for i in range(0, n, minibatch_size)]


def ppo_epochs(policy: PolicyWithValueHead, optimizer, ro: Rollout, old_logprobs: torch.Tensor,
               old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, config: PPOConfig,
               generator: torch.Generator | None = None) -> list[dict]:
    """`config.ppo_epochs` passes over the rollout in shuffled minibatches; one optimizer step per minibatch.

    Loss per minibatch = clipped_policy_loss + vf_coef * value_loss, gradients clipped to max_grad_norm.
    Returns one stats dict per optimizer step. Taught in notebooks/09_rlhf.ipynb.
    """
    n = ro.responses.shape[0]
    params = [p for p in policy.parameters() if p.requires_grad]
    stats = []
    for epoch in range(config.ppo_epochs):
        for idx in minibatch_indices(n, config.minibatch_size, generator):
            mb = ro.select(idx)
            logits, values = policy_forward(policy, mb)
            logprobs = logprobs_from_logits(logits, mb.responses)
            pg_loss, pg_stats = clipped_policy_loss(logprobs, old_logprobs[idx], advantages[idx], mb.mask,
                                                    config.clip_range)
            vf_loss = value_loss(values, old_values[idx], returns[idx], mb.mask, config.clip_range_value)
            loss = pg_loss + config.vf_coef * vf_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            stats.append({"epoch": epoch, "policy_loss": pg_loss.item(), "value_loss": vf_loss.item(),
                          "grad_norm": float(grad_norm), **pg_stats})
    return stats


def ppo_step(policy: PolicyWithValueHead, ref_model, tokenizer, prompts: list[str], reward_fn, optimizer,
             config: PPOConfig, generator: torch.Generator | None = None) -> dict:
    """One PPO iteration on a batch of prompts: rollout, score, KL-penalized rewards, GAE, ppo_epochs.

    `reward_fn(prompts, responses) -> tensor of scores` (e.g. a reward model through
    helpers.rewards.score_with_reward_model, or a rule). `ref_model` is the frozen model the KL penalty
    is measured against. Returns the iteration's statistics (mean score, mean KL, losses...).
    Taught in notebooks/09_rlhf.ipynb.
    """
    if len(prompts) != config.batch_size:
        raise ValueError(f"ppo_step got {len(prompts)} prompts, config.batch_size is {config.batch_size}")
    ro = rollout(policy, tokenizer, prompts, config.max_new_tokens, config.temperature)
    scores = torch.as_tensor(reward_fn(ro.prompts, ro.texts), dtype=torch.float32).reshape(-1)
    with torch.no_grad():
        logits, old_values = policy_forward(policy, ro)
        old_logprobs = logprobs_from_logits(logits, ro.responses)
        ref_logprobs = response_logprobs(ref_model, ro)
    rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, ro.mask, config.kl_coef)
    advantages, returns = gae(rewards, old_values, ro.mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = whiten(advantages, ro.mask)
    steps = ppo_epochs(policy, optimizer, ro, old_logprobs, old_values, advantages, returns, config, generator)
    mean = lambda key: sum(s[key] for s in steps) / len(steps)  # noqa: E731
    return {"score": scores.mean().item(), "kl": kl.sum(dim=1).mean().item(),
            "non_score_reward": (-config.kl_coef * kl.sum(dim=1)).mean().item(),
            "response_length": ro.mask.sum(dim=1).mean().item(), "policy_loss": mean("policy_loss"),
            "value_loss": mean("value_loss"), "clipfrac": mean("clipfrac"), "approx_kl": mean("approx_kl"),
            "example": f"{ro.prompts[0]} -> {ro.texts[0]}"}


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi || pi_ref) over the whole vocabulary at each response position, summed over the response.

    sum_t sum_v pi(v | s_t) * (log pi(v | s_t) - log pi_ref(v | s_t)), one value per row (B,). Lower
    variance than the sampled estimate log pi(a_t) - log pi_ref(a_t), which is what the reward pays.
    Taught in notebooks/09_rlhf.ipynb.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    per_token = (logp.exp() * (logp - ref_logp)).sum(dim=-1)
    return (per_token * mask.to(per_token.dtype)).sum(dim=1)


@torch.no_grad()
def evaluate_policy(policy, ref_model, tokenizer, prompts: list[str], reward_fn, max_new_tokens: int = 24,
                    batch_size: int = 32, seed: int = 0, do_sample: bool = True) -> dict:
    """Mean reward and mean KL to the reference on held-out prompts, from responses sampled with a fixed seed.

    Sampling (not greedy) so the KL is that of the policy's own distribution; the fixed seed makes two
    evaluations comparable. Returns mean_score, mean_kl (exact, `full_kl`), the responses and scores.
    Taught in notebooks/09_rlhf.ipynb.
    """
    cpu_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    texts, scores, kls = [], [], []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ro = rollout(policy, tokenizer, chunk, max_new_tokens, do_sample=do_sample)
            _, logits = response_logprobs(_lm(policy), ro, return_logits=True)
            _, ref_logits = response_logprobs(ref_model, ro, return_logits=True)
            kls.append(full_kl(logits, ref_logits, ro.mask))
            scores.append(torch.as_tensor(reward_fn(ro.prompts, ro.texts), dtype=torch.float32).reshape(-1))
            texts += ro.texts
    finally:
        torch.random.set_rng_state(cpu_state)
    scores_t, kls_t = torch.cat(scores), torch.cat(kls)
    return {"mean_score": scores_t.mean().item(), "mean_kl": kls_t.mean().item(), "responses": texts,
            "scores": scores_t.tolist()}



# --- notebook 10 starts where notebook 09 ended --------------------------------------------------
# The configuration keys of notebook 09 that shape its SFT model, reward model and PPO policy. Evaluation
# settings (eval_every, eval_prompts) are not among them: they measure the models without changing them.
START_KEYS = ("model_name", "dataset", "dev_ratio", "max_new_tokens", "lora_r", "lora_alpha", "sft_method",
              "sft_steps", "sft_learning_rate", "rm_steps", "rm_batch_size", "rm_learning_rate", "ppo_iterations",
              "ppo_batch_size", "ppo_minibatch_size", "ppo_epochs", "ppo_learning_rate", "kl_coef", "seed")
START_FILE = "rlhf_start.json"  # written last by save_rlhf_start: a folder without it is not a complete start


@dataclass
class RLHFStart:
    """What notebook 10 starts from: notebook 09's three models, and where they came from."""

    tokenizer: object
    sft_model: object             # stage 1, merged: where DPO and GRPO start
    reference: object             # a frozen copy of it: the KL anchor of every method
    reward_model: object          # stage 2, a peft sequence classifier
    ppo_model: object             # stage 3, the PPO policy without its value head (a peft causal LM)
    sft_dir: Path                 # the SFT model and its tokenizer, saved
    times: dict = field(default_factory=dict)  # seconds per stage: "SFT", "reward model", "PPO"
    source: str = ""              # "loaded from ..." or "trained here"


def start_settings(config: dict, train) -> dict:
    """The settings that shape notebook 09's three models: its START_KEYS, the base model that loads for
    `config["model_name"]` (the stand-in's files hashed) and the training rows, hashed.

    Two runs with equal settings train the same models. Taught in notebooks/09_rlhf.ipynb (its last section).
    """
    from .models import resolve_model
    from .run_cache import model_fingerprint

    missing = [key for key in START_KEYS if key not in config]
    if missing:
        raise KeyError(f"the configuration lacks {missing}: notebook 09's stages 1-3 need every key of START_KEYS")
    model = model_fingerprint(resolve_model(config["model_name"]))  # the stand-in: its files' hashes, not its path
    rows = json.dumps(train.to_list(), ensure_ascii=False, sort_keys=True).encode()
    return {**{key: config[key] for key in START_KEYS}, "model": model,
            "train_rows": hashlib.sha256(rows).hexdigest()[:16]}


def save_rlhf_start(folder, config: dict, train, *, reward_model, ppo_model, times: dict) -> Path:
    """Save notebook 09's reward model and PPO policy (LoRA adapters) beside its SFT model (`folder/sft_merged`,
    saved in stage 1), then `rlhf_start.json` with the settings that made them, last.

    `ppo_model` is the policy without its value head (`policy.model`). Returns the manifest's path.
    Taught in notebooks/09_rlhf.ipynb.
    """
    folder = Path(folder)
    if not (folder / "sft_merged" / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'sft_merged'} holds no saved SFT model: stage 1 saves it there first")
    reward_model.save_pretrained(str(folder / "reward_model_adapter"))  # LoRA and the score head
    ppo_model.save_pretrained(str(folder / "ppo_adapter"))
    manifest = folder / START_FILE
    manifest.write_text(json.dumps({"settings": start_settings(config, train), "times": times}, indent=1,
                                   ensure_ascii=False) + "\n")
    return manifest


def _settings_differ(saved: dict, wanted: dict) -> list[str]:
    return [f"{key} {saved.get(key)!r} there, {wanted[key]!r} here" for key in wanted if saved.get(key) != wanted[key]]


def load_rlhf_start(folder, config: dict, train) -> RLHFStart:
    """The three models `save_rlhf_start` saved in `folder`, if they were trained with `config`'s settings.

    Raises FileNotFoundError when the folder holds no complete start, ValueError naming the settings that
    differ. Taught in notebooks/09_rlhf.ipynb; notebooks/10_dpo_and_grpo.ipynb loads its start with it.
    """
    from peft import PeftModel

    from .env import repo_relative
    from .models import load_model, load_tokenizer

    folder = Path(folder)
    if not (folder / START_FILE).is_file():
        raise FileNotFoundError(f"{repo_relative(folder)} holds no {START_FILE}: notebook 09 has not finished a "
                                "run there")
    saved = json.loads((folder / START_FILE).read_text())
    differ = _settings_differ(saved["settings"], start_settings(config, train))
    if differ:
        raise ValueError(f"{repo_relative(folder)} was trained with other settings: " + "; ".join(differ))
    tokenizer = load_tokenizer(config["model_name"])
    sft_model = load_model(str(folder / "sft_merged"), verbose=False).eval()
    reference = copy.deepcopy(sft_model).requires_grad_(False)
    rm_base = load_model(str(folder / "sft_merged"), head="sequence-classification", num_labels=1, verbose=False)
    reward_model = PeftModel.from_pretrained(rm_base, str(folder / "reward_model_adapter")).eval()
    ppo_model = PeftModel.from_pretrained(copy.deepcopy(sft_model), str(folder / "ppo_adapter")).eval()
    return RLHFStart(tokenizer, sft_model, reference, reward_model, ppo_model, folder / "sft_merged",
                     saved["times"], f"loaded from {repo_relative(folder)}")


def train_ppo_policy(sft_model, reference, tokenizer, prompts: list[str], reward_fn, config: PPOConfig,
                     iterations: int, *, lora_r: int, lora_alpha: int, seed: int):
    """Stage 3 of notebooks/09_rlhf.ipynb, as its cells run it, without the held-out evaluations.

    A fresh LoRA adapter (no dropout) on a copy of the SFT model plus a value head, AdamW with a cosine
    schedule (2 warm-up iterations), the prompts in one seeded order, `iterations` calls of `ppo_step`.
    Returns (policy, history: one statistics dict per iteration). The same code as the notebook's cells: change
    both. Taught in notebooks/09_rlhf.ipynb.
    """
    import transformers
    from peft import LoraConfig, get_peft_model

    from .models import lora_target_modules

    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformers.set_seed(seed)
    ppo_lora = LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                          target_modules=lora_target_modules(sft_model, "all"))
    policy = PolicyWithValueHead(get_peft_model(copy.deepcopy(sft_model), ppo_lora)).to(device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=0.0)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, 2, iterations)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=generator).tolist()
    transformers.set_seed(seed)
    history = []
    for iteration in range(1, iterations + 1):
        start = (iteration - 1) * config.batch_size % len(order)
        batch = [prompts[i] for i in (order + order)[start:start + config.batch_size]]
        stats = ppo_step(policy, reference, tokenizer, batch, reward_fn, optimizer, config, generator)
        scheduler.step()
        history.append({"iteration": iteration, **stats})
    return policy, history


def train_rlhf_start(config: dict, train, out) -> RLHFStart:
    """Notebook 09's stages 1 to 3 with its code, written into `out` as notebook 09 writes them.

    1. SFT on the chosen replies (`helpers.tuning.finetune`), merged into one plain model, saved in
       `out/sft_merged`; a frozen copy is the reference. 2. The reward model (`helpers.rewards.train_reward_model`).
    3. PPO against it (`train_ppo_policy`). Then `save_rlhf_start(out, ...)`, so the run can be loaded again.
    `config` holds notebook 09's START_KEYS; `train` is its training split. On a CPU the models equal notebook
    09's, weight for weight, when the settings are equal. Taught in notebooks/09_rlhf.ipynb.
    """
    from .models import load_tokenizer
    from .prompts import tokenize_dataset
    from .rewards import score_with_reward_model, train_reward_model
    from .tuning import finetune

    out = Path(out)
    times = {}
    tokenizer = load_tokenizer(config["model_name"])
    print("stage 1, SFT on the chosen replies:")
    sft_tokens = tokenize_dataset(train, tokenizer, "preference", max_source_length=64,
                                  max_target_length=config["max_new_tokens"])
    sft = finetune(config["sft_method"], sft_tokens, output_dir=out / "sft", model_name=config["model_name"],
                   max_steps=config["sft_steps"], learning_rate=config["sft_learning_rate"], seed=config["seed"],
                   announce=True)
    times["SFT"] = sft.seconds
    sft_model = sft.model.merge_and_unload() if hasattr(sft.model, "merge_and_unload") else sft.model
    sft_model = sft_model.eval()
    sft_model.save_pretrained(out / "sft_merged")
    tokenizer.save_pretrained(out / "sft_merged")
    reference = copy.deepcopy(sft_model).requires_grad_(False)
    print(f"  {sft.steps} steps in {sft.seconds:.1f} s; stage 2, the reward model ...")
    reward_model, times["reward model"] = train_reward_model(
        out / "sft_merged", tokenizer, train, output_dir=out / "reward_model", max_steps=config["rm_steps"],
        batch_size=config["rm_batch_size"], learning_rate=config["rm_learning_rate"], lora_r=config["lora_r"],
        lora_alpha=config["lora_alpha"], seed=config["seed"])
    print(f"  {config['rm_steps']} steps in {times['reward model']:.1f} s; stage 3, PPO ...")

    def reward_fn(prompts, replies):
        return score_with_reward_model(reward_model, tokenizer, prompts, replies)

    ppo_config = PPOConfig(batch_size=config["ppo_batch_size"], minibatch_size=config["ppo_minibatch_size"],
                           ppo_epochs=config["ppo_epochs"], learning_rate=config["ppo_learning_rate"],
                           kl_coef=config["kl_coef"], max_new_tokens=config["max_new_tokens"])
    started = time.perf_counter()
    policy, _ = train_ppo_policy(sft_model, reference, tokenizer, train["prompt"], reward_fn, ppo_config,
                                 config["ppo_iterations"], lora_r=config["lora_r"], lora_alpha=config["lora_alpha"],
                                 seed=config["seed"])
    times["PPO"] = time.perf_counter() - started
    print(f"  {config['ppo_iterations']} iterations in {times['PPO']:.1f} s")
    ppo_model = policy.model.eval()
    save_rlhf_start(out, config, train, reward_model=reward_model, ppo_model=ppo_model, times=times)
    return RLHFStart(tokenizer, sft_model, reference, reward_model, ppo_model, out / "sft_merged", times,
                     "trained here")


def rlhf_start(config: dict, train, out, saved=None) -> RLHFStart:
    """Notebook 09's SFT model, reward model and PPO policy for notebook 10: loaded from `saved` (default
    outputs/09_rlhf/) when notebook 09 finished a run there with the same settings (`start_settings`), else
    trained into `out` with notebook 09's code (`train_rlhf_start`). Says which, and why.

    Taught in notebooks/09_rlhf.ipynb; used by notebooks/10_dpo_and_grpo.ipynb.
    """
    from .env import OUTPUT_ROOT

    saved = Path(saved) if saved is not None else OUTPUT_ROOT / "09_rlhf"
    try:
        start = load_rlhf_start(saved, config, train)
    except (FileNotFoundError, ValueError) as why:
        print(f"Not reusing notebook 09's models: {why}.\nTraining them here with notebook 09's code "
              "(its stages 1-3; run notebook 09 first to skip this):")
        return train_rlhf_start(config, train, out)
    print(f"Notebook 09's SFT model, reward model and PPO policy, {start.source} (trained with these settings).")
    return start
