"""helpers.ppo: every piece of notebook 09's PPO on small hand-computable cases, then a tiny end-to-end run; and how
notebook 10 gets notebook 09's models (loaded when saved with the same settings, else trained with 09's code)."""
import copy
import math

import pytest
import torch

from helpers.ppo import (PolicyWithValueHead, PPOConfig, clipped_policy_loss, evaluate_policy, full_kl, gae,
                         kl_penalized_rewards, logprobs_from_logits, masked_mean, minibatch_indices,
                         position_ids_from_mask, ppo_step, response_logprobs, response_mask, rollout, value_loss,
                         whiten)


# --- tensor helpers ------------------------------------------------------------------------------
def test_masked_mean_ignores_masked_entries():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 4.0]))
    with pytest.raises(ValueError, match="same shape"):
        masked_mean(values, mask[:, :2])


def test_whiten_gives_mean_zero_std_one_on_the_mask():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = whiten(values, mask)
    s = math.sqrt(1.5)  # population std of 1, 2, 3 is sqrt(2/3); (x - 2) / sqrt(2/3)
    torch.testing.assert_close(out, torch.tensor([[-s, 0.0, s, 0.0]]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(whiten(values, mask, shift_mean=False), torch.tensor([[2 - s, 2.0, 2 + s, 0.0]]),
                               atol=1e-6, rtol=1e-6)


def test_logprobs_from_logits():
    logits = torch.zeros(1, 2, 4)  # uniform over 4 tokens
    logits[0, 1] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    out = logprobs_from_logits(logits, torch.tensor([[3, 2]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.25), math.log(0.3)]]))


def test_response_mask_stops_after_the_first_eos():
    eos = 0
    responses = torch.tensor([[5, 0, 1, 1], [5, 6, 7, 8], [0, 1, 1, 1], [5, 0, 0, 7]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float)
    torch.testing.assert_close(response_mask(responses, eos), expected)


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


# --- rewards, GAE, losses ------------------------------------------------------------------------
def test_kl_penalized_rewards_by_hand():
    logprobs = torch.tensor([[-1.0, -1.0, -5.0], [-0.5, -2.0, -3.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.0], [-1.0, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, kl = kl_penalized_rewards(torch.tensor([3.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    # row 0: kl = [1, 0, (masked)], score 3 lands on token 1 (the last real one)
    # row 1: kl = [0.5, -1, 0], score -1 lands on token 2
    torch.testing.assert_close(kl, torch.tensor([[1.0, 0.0, 0.0], [0.5, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 3.0, 0.0], [-0.05, 0.1, -1.0]]))


def test_kl_penalized_rewards_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        kl_penalized_rewards(torch.zeros(2), x, x, x, kl_coef=-1)
    with pytest.raises(ValueError, match="one per response"):
        kl_penalized_rewards(torch.zeros(3), x, x, x, kl_coef=0.1)
    with pytest.raises(ValueError, match="same shape"):
        kl_penalized_rewards(torch.zeros(2), x, x[:, :2], x, kl_coef=0.1)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 0]])  # the third token does not exist: its reward and value are ignored
    # lam = 1, gamma = 1: delta = [0 + 0.5 - 0.5, 1 + 0 - 0.5] = [0, 0.5]; A = [0.5, 0.5]; returns = A + V = [1, 1]
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 0.0]]))
    # lam = 0.5: A_1 = 0.5, A_0 = 0 + 0.5 * 0.5 = 0.25
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.25, 0.5, 0.0]]))
    # gamma = 0.5, lam = 1: delta_0 = 0 + 0.5 * 0.5 - 0.5 = -0.25; A_0 = -0.25 + 0.5 * 0.5 = 0
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.5, 0.0]]))


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # ratio 1: the loss is -mean(A), nothing clipped
    loss, stats = clipped_policy_loss(old.clone(), old, torch.tensor([[1.0, 3.0]]), mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-2.0) and stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0
    # ratio 1.5 on both tokens: with A = +1 the gain is capped at 1.2; with A = -1 the loss is NOT capped (1.5)
    logprobs = torch.full((1, 2), math.log(1.5))
    loss, stats = clipped_policy_loss(logprobs, old, torch.tensor([[1.0, -1.0]]), mask, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert stats["approx_kl"] == pytest.approx(0.5 * math.log(1.5) ** 2)
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        clipped_policy_loss(old, old, old, mask, clip_range=0)


def test_clipped_policy_loss_has_no_gradient_beyond_the_clip():
    logprobs = torch.full((1, 1), math.log(1.5), requires_grad=True)
    loss, _ = clipped_policy_loss(logprobs, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert logprobs.grad.item() == 0.0


def test_value_loss_by_hand():
    old, returns, mask = torch.ones(1, 1), torch.full((1, 1), 3.0), torch.ones(1, 1)
    # unclipped: (2 - 3)^2 = 1; clipped value 1.2: (1.2 - 3)^2 = 3.24; the max, halved: 1.62
    assert value_loss(torch.full((1, 1), 2.0), old, returns, mask, 0.2).item() == pytest.approx(1.62)
    # inside the clip range both terms agree: 0.5 * (1.1 - 3)^2
    assert value_loss(torch.full((1, 1), 1.1), old, returns, mask, 0.2).item() == pytest.approx(0.5 * 1.9 ** 2)


def test_full_kl_by_hand():
    p = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.143841...; the second token adds 0
    torch.testing.assert_close(full_kl(p, q, torch.ones(1, 2)), torch.tensor([expected]))
    torch.testing.assert_close(full_kl(p, p, torch.ones(1, 2)), torch.tensor([0.0]))


def test_minibatch_indices_partition_the_batch():
    parts = minibatch_indices(10, 4, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="minibatch_size >= 1"):
        minibatch_indices(10, 0)


def test_ppo_config_validates():
    with pytest.raises(ValueError, match="must divide batch_size"):
        PPOConfig(batch_size=8, minibatch_size=3)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        PPOConfig(kl_coef=-0.1)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        PPOConfig(lam=1.5)
    assert PPOConfig().as_dict()["clip_range"] == 0.2


# --- a tiny model end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_neox):
    """A 7-word tokenizer and a one-layer GPT-NeoX: fast, and sampled words are whole words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "q": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="q"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    model = tiny_neox(vocab_size=7, hidden_size=16, num_hidden_layers=1, intermediate_size=32)  # pad 1, eos 0 as here
    return tokenizer, model.eval()


def test_value_head_starts_at_zero(tiny):
    tokenizer, model = tiny
    policy = PolicyWithValueHead(copy.deepcopy(model))
    batch = tokenizer(["a b", "c"], return_tensors="pt", padding=True)
    logits, values = policy(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (2, 2, 7) and values.shape == (2, 2)
    assert torch.count_nonzero(values) == 0


def test_rollout_logprobs_match_what_generate_sampled_from(tiny):
    """With left padding the forward pass must see the same positions generate saw (position ids)."""
    tokenizer, model = tiny
    torch.manual_seed(1)
    ro = rollout(model, tokenizer, ["a b c d", "b"], max_new_tokens=5)
    assert ro.query_ids[1, 0] == tokenizer.pad_token_id  # the short prompt was padded on the left
    tokenizer.padding_side = "left"
    batch = tokenizer(["a b c d", "b"], return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=1, eos_token_id=0)
    greedy = out.sequences[:, batch["input_ids"].shape[1]:]
    ro.responses, ro.mask = greedy, response_mask(greedy, 0)
    expected = logprobs_from_logits(torch.stack(out.logits, dim=1), greedy)
    with torch.no_grad():
        ours = response_logprobs(model, ro)
    torch.testing.assert_close(ours * ro.mask, expected * ro.mask, atol=1e-5, rtol=1e-5)


def test_evaluate_policy_puts_a_model_at_kl_zero_from_its_frozen_copy(tiny):
    """Notebook 10's comparison table: the SFT model, scored against the reference (a frozen copy of it), is at KL 0."""
    tokenizer, model = tiny
    reference = copy.deepcopy(model).requires_grad_(False)
    result = evaluate_policy(model, reference, tokenizer, ["a b", "c", "d d", "b c a"], lambda p, t: [0.0] * len(t),
                             max_new_tokens=5, seed=0)
    assert result["mean_kl"] == pytest.approx(0.0, abs=1e-6) and len(result["responses"]) == 4


def test_ppo_raises_the_reward_on_a_tiny_model(tiny):
    """Reward = share of the word "a" in the response. A few PPO iterations must raise it; KL becomes > 0."""
    tokenizer, model = tiny
    torch.manual_seed(0)
    reference = copy.deepcopy(model).requires_grad_(False)
    policy = PolicyWithValueHead(copy.deepcopy(model))

    def reward_fn(prompts, texts):
        return [t.split().count("a") / max(len(t.split()), 1) for t in texts]

    config = PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=2, learning_rate=3e-2, kl_coef=0.01,
                       max_new_tokens=6)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate)
    prompts = ["a b", "c", "d d", "b c a", "q", "a", "b b", "c d"]
    before = evaluate_policy(policy, reference, tokenizer, prompts, reward_fn, max_new_tokens=6, seed=0)
    assert before["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    history = [ppo_step(policy, reference, tokenizer, prompts, reward_fn, optimizer, config, generator)
               for _ in range(12)]
    after = evaluate_policy(policy, reference, tokenizer, prompts, reward_fn, max_new_tokens=6, seed=0)
    assert {"score", "kl", "policy_loss", "value_loss", "clipfrac", "approx_kl"} <= set(history[0])
    assert after["mean_score"] > before["mean_score"] + 0.3, (before["mean_score"], after["mean_score"])
    assert after["mean_kl"] > 0.1
    with pytest.raises(ValueError, match="batch_size is 8"):
        ppo_step(policy, reference, tokenizer, prompts[:3], reward_fn, optimizer, config)


# --- notebook 10's start: notebook 09's three models, loaded or trained again ------------------------
def test_notebook_10_trains_notebook_09s_models_when_none_are_saved_and_loads_them_when_they_are(tmp_path):
    """Both paths of `rlhf_start`, on the course's stand-in and data at a few steps: with no saved run of notebook 09 it
    trains stages 1-3 with 09's code and saves them as notebook 09 does; given that folder, it loads the same models."""
    from helpers.data import load_dataset
    from helpers.models import DEFAULT_MODEL
    from helpers.ppo import START_FILE, load_rlhf_start, rlhf_start
    from helpers.rewards import score_with_reward_model

    config = {"model_name": DEFAULT_MODEL, "dataset": "preference_pairs", "dev_ratio": 0.2, "max_new_tokens": 8,
              "lora_r": 4, "lora_alpha": 8, "sft_method": "full", "sft_steps": 2, "sft_learning_rate": 1e-3,
              "rm_steps": 2, "rm_batch_size": 4, "rm_learning_rate": 1e-3, "ppo_iterations": 2, "ppo_batch_size": 4,
              "ppo_minibatch_size": 2, "ppo_epochs": 1, "ppo_learning_rate": 1e-2, "kl_coef": 0.2, "seed": 0}
    train = load_dataset("preference_pairs", dev_ratio=0.2, seed=0)["train"].select(range(16))
    trained = rlhf_start(config, train, out=tmp_path / "10", saved=tmp_path / "no-run-of-07")
    assert trained.source == "trained here" and (tmp_path / "10" / START_FILE).is_file()
    assert set(trained.times) == {"SFT", "reward model", "PPO"}

    loaded = rlhf_start(config, train, out=tmp_path / "unused", saved=tmp_path / "10")
    assert loaded.source == f"loaded from {tmp_path / '10'}" and not (tmp_path / "unused").exists()
    assert loaded.times == trained.times
    prompts, replies = train["prompt"][:3], train["chosen"][:3]
    torch.testing.assert_close(score_with_reward_model(loaded.reward_model, loaded.tokenizer, prompts, replies),
                               score_with_reward_model(trained.reward_model, trained.tokenizer, prompts, replies))
    batch = trained.tokenizer(prompts[0], return_tensors="pt")
    with torch.no_grad():
        for ours, theirs in ((loaded.sft_model, trained.sft_model), (loaded.ppo_model, trained.ppo_model),
                             (loaded.reference, trained.sft_model)):
            torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits)
        # PPO moved the policy (in its second iteration: the cosine schedule's warm-up starts at a learning rate of 0)
        assert not torch.equal(trained.ppo_model(**batch).logits, trained.sft_model(**batch).logits)

    with pytest.raises(ValueError, match="kl_coef 0.2 there, 0.5 here"):
        load_rlhf_start(tmp_path / "10", {**config, "kl_coef": 0.5}, train)
    with pytest.raises(ValueError, match="train_rows"):
        load_rlhf_start(tmp_path / "10", config, train.select(range(8)))
    with pytest.raises(KeyError, match="sft_steps"):
        load_rlhf_start(tmp_path / "10", {k: v for k, v in config.items() if k != "sft_steps"}, train)


def test_the_code_that_trains_notebook_10s_start_keeps_notebook_09s_settings():
    """`train_rlhf_start` repeats notebook 09's stages 1-3 in helpers/ (so notebook 10 can run alone); a library call
    there must take the same keywords as in notebook 09's cells, with the same values where they are literals."""
    import ast
    import inspect
    import json

    from helpers.env import REPO_ROOT
    from helpers.ppo import train_ppo_policy, train_rlhf_start
    from helpers.rewards import train_reward_model

    cells = json.loads((REPO_ROOT / "notebooks" / "09_rlhf.ipynb").read_text(encoding="utf-8"))["cells"]
    taught = cells[:[i for i, c in enumerate(cells) if "".join(c["source"]).startswith("### Solutions")][0]]
    notebook = ast.parse("\n".join("".join(c["source"]) for c in taught if c["cell_type"] == "code"))
    helpers = ast.parse("\n".join(inspect.getsource(f) for f in (train_rlhf_start, train_reward_model, train_ppo_policy)))

    def literal(node):
        return ast.literal_eval(node) if isinstance(node, ast.Constant) else "<expression>"

    def calls(tree):
        found = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
                name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                found.setdefault(name, []).append(
                    [literal(a) for a in node.args] + [{k.arg: literal(k.value) for k in node.keywords}])
        return found

    ours, theirs = calls(helpers), calls(notebook)
    for name in ("finetune", "tokenize_dataset", "RewardConfig", "RewardTrainer", "LoraConfig", "PPOConfig",
                 "load_model", "get_peft_model", "get_cosine_schedule_with_warmup", "AdamW"):
        for call in ours[name]:
            assert call in theirs[name], f"{name}({call}) is not how notebook 09 calls it: {theirs[name]}"
