"""helpers.rewards: the verifiable reward of notebooks 09 and 10 and reading a reward model (training one: test_ppo)."""
import pytest
import torch

from helpers.rewards import (correctness_rate, correctness_reward, extract_numbers, is_correct, pairwise_accuracy,
                             partial_credit, partial_credit_reward, reward_model_texts, score_with_reward_model)


def test_extract_numbers_in_order_chinese_and_full_width():
    assert extract_numbers("28 减 6 等于 22。") == [28, 6, 22]
    assert extract_numbers("１２ plus 3") == [12, 3]  # NFKC turns full-width digits into ASCII
    assert extract_numbers("no digits") == []


@pytest.mark.parametrize("completion, answer, expected", [
    ("28 减 6 等于 22。", "22", True),
    ("28 减 6 等于 21。", "22", False),
    ("28 减 6", "6", True),             # the last number decides
    ("28 减 6 等于 22。", "6", False),  # the question's numbers do not count
    ("22", "22", True),
    ("Sure! 5 plus 16 is 21. I hope this helps.", "21", True),
    ("From smallest to largest: 15, 21, 49.", "15, 21, 49", True),
    ("Please sort 49, 15, 21 from smallest to largest.", "15, 21, 49", False),
    ("15, 49, 21", "15, 21, 49", False),
    ("21, 49", "15, 21, 49", False),    # too few numbers
    ("For chest pain, the right department is Cardiology.", "cardiology", True),
    ("The Chinese word for water is 水。", "水", True),
    ("“家”的英文是 home。", "home", True),
    ("“家”的英文是 homely。", "home", False),  # ASCII answers must be whole words
    ("便血建议挂消化内科就诊。", "消化内科", True),
    ("便血建议挂 消化 内科。", "消化内科", True),  # spaces are normalized away for CJK answers
    ("我最近在学做饭。", "消化内科", False),
    ("", "22", False),
])
def test_is_correct(completion, answer, expected):
    assert is_correct(completion, answer) is expected


def test_is_correct_rejects_an_empty_answer():
    with pytest.raises(ValueError, match="non-empty"):
        is_correct("anything", "  ")


def test_correctness_reward_has_trl_signature_and_reads_chat_messages():
    completions = ["28 减 6 等于 22。", "随便吧。", [{"role": "assistant", "content": "It is 7."}]]
    rewards = correctness_reward(prompts=["p"] * 3, completions=completions, answer=["22", "22", "7"],
                                 completion_ids=None, trainer_state=None)
    assert rewards == [1.0, 0.0, 1.0]
    assert correctness_rate(["22", "21", "22", "x"], ["22"] * 4) == 50.0


def test_correctness_reward_errors_name_the_problem():
    with pytest.raises(ValueError, match="answer"):
        correctness_reward(prompts=["p"], completions=["1"])
    with pytest.raises(ValueError, match="2 completions for 1 answers"):
        correctness_reward(completions=["1", "2"], answer=["1"])
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        correctness_reward(completions=[3], answer=["3"])


def test_the_rule_calls_every_chosen_reply_right_and_every_rejected_one_wrong():
    """Notebook 09 prints both rates on its training split; the rule and the data must agree on every row."""
    from helpers.data import load_dataset

    rows = load_dataset("preference_pairs")
    assert len(rows) > 0 and correctness_rate(rows["chosen"], rows["answer"]) == 100
    assert correctness_rate(rows["rejected"], rows["answer"]) == 0


@pytest.mark.parametrize("completion, answer, expected", [
    ("从小到大排列是 2, 32, 47。", "2, 32, 47", 1.0),
    ("从小到大排列是 1, 41, 47。", "2, 32, 47", 1 / 3),   # only the last position is right
    ("From smallest to largest: 32, 47.", "2, 32, 47", 2 / 3),  # too few numbers: aligned from the end
    ("28 减 6 等于 20。", "22", 0.8),                    # off by 2
    ("28 减 6 等于 40。", "22", 0.0),                    # off by 10 or more
    ("I do not know.", "22", 0.0),
    ("“家”的英文是 house。", "home", 0.0),              # text answers: all or nothing
    ("“家”的英文是 home。", "home", 1.0),
])
def test_partial_credit(completion, answer, expected):
    assert partial_credit(completion, answer) == pytest.approx(expected)


def test_partial_credit_reward_signature():
    assert partial_credit_reward(prompts=["p", "q"], completions=["20", "22"], answer=["22", "22"]) == [0.8, 1.0]
    with pytest.raises(ValueError, match="1 completions for 2 answers"):
        partial_credit_reward(completions=["1"], answer=["1", "2"])


class _EosTokenizer:
    eos_token = "<|endoftext|>"


def test_reward_model_texts_append_eos_once():
    texts = reward_model_texts(_EosTokenizer(), ["Q1 ", "Q2 "], ["A1", "A2<|endoftext|>"])
    assert texts == ["Q1 A1<|endoftext|>", "Q2 A2<|endoftext|>"]
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        reward_model_texts(_EosTokenizer(), ["a", "b"], ["c"])
    with pytest.raises(TypeError):
        reward_model_texts(_EosTokenizer(), "a", "b")


def test_pairwise_accuracy():
    assert pairwise_accuracy([1.0, 2.0, 0.0, 5.0], [0.0, 3.0, 0.0, 4.0]) == 50.0  # ties do not count as wins
    with pytest.raises(ValueError, match="no pairs"):
        pairwise_accuracy([], [])


def _tiny_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "?": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def test_score_with_reward_model_is_independent_of_padding(tiny_neox):
    from transformers import GPTNeoXForSequenceClassification

    model = tiny_neox(model_class=GPTNeoXForSequenceClassification, vocab_size=7, hidden_size=16, num_hidden_layers=1,
                      intermediate_size=32, max_position_embeddings=32, num_labels=1).eval()
    tokenizer = _tiny_word_tokenizer()
    alone = score_with_reward_model(model, tokenizer, ["a b "], ["c"])
    batched = score_with_reward_model(model, tokenizer, ["a b ", "a b c d a b "], ["c", "d d d"])
    assert alone.dtype == torch.float32 and alone.shape == (1,)
    torch.testing.assert_close(batched[0], alone[0])  # the head reads the last real token, not a pad
    with torch.no_grad():  # and it is exactly the model's logit on "a b c <eos>"
        direct = model(input_ids=torch.tensor([[2, 3, 4, 0]])).logits[0, 0]
    torch.testing.assert_close(alone[0], direct)
