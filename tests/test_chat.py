"""helpers.chat and helpers.export: the chat prompt format, streamed replies, the widget, the terminal chat
(notebook 13); merging and blending adapters, answer losses, reusing an adapter another notebook trained (notebooks 12
and 13)."""
import io
import os
import subprocess
import sys

import pytest
import torch

from helpers.chat import (ChatSession, Generation, chat_widget, conversation_prompt_ids, stream_generate,
                          template_prompt_ids, turns_to_messages)
from helpers.env import REPO_ROOT
from helpers.export import (TRAINING_RECORD, answer_losses, load_for_inference, max_logit_difference, merge_and_save,
                            reuse_or_train_adapter)
from helpers.models import DEFAULT_MODEL, load_tokenizer
from helpers.prompts import IGNORE_INDEX, tokenize_conversation
from helpers.standin import CHAT_TEMPLATE, add_chat_template

MODEL = DEFAULT_MODEL  # offline: the course's stand-in


@pytest.fixture(scope="module")
def loaded():
    return load_for_inference(MODEL, verbose=False)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, loaded):
    """A LoRA adapter with random (non-zero) B, so that it really changes the model."""
    from peft import LoraConfig, get_peft_model

    from helpers.models import load_model

    torch.manual_seed(0)
    base = load_model(MODEL, verbose=False)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["query_key_value", "dense_4h_to_h"],
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_is_the_training_format_up_to_the_answer(loaded):
    _, tok = loaded
    history = [{"human": "3 加 4 等于多少？", "assistant": "等于 7。"}]
    ids, kept = conversation_prompt_ids(tok, history, "再加 2 呢？")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    expected = [bos] + _ids(tok, "3 加 4 等于多少？") + [eos] + _ids(tok, "等于 7。") + [eos] + _ids(tok, "再加 2 呢？") + [eos]
    assert ids == expected and kept == 1
    # the same ids tokenize_conversation gives a training example, before the answer
    full = tokenize_conversation(tok, history + [{"human": "再加 2 呢？", "assistant": "等于 9。"}])["input_ids"]
    assert full[:len(ids)] == ids


def test_chat_template_renders_the_training_format_and_marks_its_answers():
    from helpers.data import load_dataset

    tok = add_chat_template(load_tokenizer(MODEL))
    for row in load_dataset("conversations").select(range(40)):  # every turn, answers trained, questions not
        rendered = tok.apply_chat_template(turns_to_messages(row["conversation"]), return_dict=True,
                                           return_assistant_tokens_mask=True)
        trained = tokenize_conversation(tok, row["conversation"])
        assert rendered["input_ids"] == trained["input_ids"]
        assert rendered["assistant_masks"] == [int(label != IGNORE_INDEX) for label in trained["labels"]]
    history = [{"human": "3 加 4 等于多少？", "assistant": "等于 7。"}]
    messages = turns_to_messages(history + [{"human": "再加 2 呢？", "assistant": ""}])
    bos, eos = tok.bos_token, tok.eos_token
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        f"{bos}3 加 4 等于多少？{eos}等于 7。{eos}再加 2 呢？{eos}"
    assert template_prompt_ids(tok, messages) == conversation_prompt_ids(tok, history, "再加 2 呢？")[0]
    # system or developer: in front of the first question, on a line of its own; text parts are read in order
    for role in ("system", "developer"):
        parts = [{"type": "text", "text": "再加 "}, {"type": "text", "text": "2 呢？"}]
        system_first = [{"role": role, "content": "简短回答。"}, {"role": "user", "content": parts}]
        assert tok.apply_chat_template(system_first, tokenize=False) == f"{bos}简短回答。\n再加 2 呢？{eos}"
    from jinja2 import TemplateError

    for bad, message in ([{"role": "tool", "content": "x"}], "unknown role 'tool'"), \
                        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text"):
        with pytest.raises(TemplateError, match=message):
            tok.apply_chat_template(bad, tokenize=False)


def test_chat_template_travels_with_the_tokenizer_and_is_the_fallback(tmp_path):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert load_tokenizer(MODEL).chat_template == CHAT_TEMPLATE  # the stand-in ships with it (chat_template.jinja)
    plain = load_tokenizer(MODEL)
    plain.chat_template = None  # a base model's tokenizer (Pythia's has none): template_prompt_ids falls back to it
    add_chat_template(load_tokenizer(MODEL)).save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert saved.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "3 加 4 等于多少？"}]
    assert template_prompt_ids(saved, messages) == template_prompt_ids(plain, messages) == \
        conversation_prompt_ids(plain, [], "3 加 4 等于多少？")[0]
    # what TRL's assistant_only_loss needs: answer marks, with the answer's </s> inside (so the model learns to stop)
    assert has_generation_markers(CHAT_TEMPLATE) and is_chat_template_stop_token_trained(saved)


def test_prompt_drops_oldest_turns_first_and_rejects_a_message_too_long(loaded):
    _, tok = loaded
    history = [{"human": f"question {i}", "assistant": f"answer {i}"} for i in range(5)]
    full, kept = conversation_prompt_ids(tok, history, "last")
    assert kept == 5
    ids, kept = conversation_prompt_ids(tok, history, "last", max_prompt_tokens=len(full) - 1)
    assert kept == 4 and ids == conversation_prompt_ids(tok, history[1:], "last")[0]
    with pytest.raises(ValueError, match="the message alone is"):
        conversation_prompt_ids(tok, [], "a long message " * 20, max_prompt_tokens=5)
    with pytest.raises(ValueError, match="non-empty"):
        conversation_prompt_ids(tok, [], "   ")


def test_greedy_reply_equals_generate_and_streams_the_same_text(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, max_new_tokens=12, do_sample=False)
    pieces = []
    answer = session.reply("What is 3 plus 4?", on_token=pieces.append)
    prompt = conversation_prompt_ids(tok, [], "What is 3 plus 4?")[0]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # ChatSession's default
    reference = tok.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
    assert answer == reference
    assert "".join(pieces).strip() == answer
    assert session.history == [{"human": "What is 3 plus 4?", "assistant": answer}]
    assert session.last.prompt_tokens == len(prompt) and 1 <= session.last.completion_tokens <= 12
    assert session.last.finish_reason in ("stop", "length")


def test_history_is_sent_with_the_next_message_and_reset_forgets_it(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, max_new_tokens=4, do_sample=False)
    first = session.reply("What is 3 plus 4?")
    assert session.prompt_ids("And 2 more?") == conversation_prompt_ids(
        tok, [{"human": "What is 3 plus 4?", "assistant": first}], "And 2 more?")[0]
    session.reply("And 2 more?")
    assert [t["human"] for t in session.history] == ["What is 3 plus 4?", "And 2 more?"]
    session.reset()
    assert session.history == [] and session.prompt_ids("hi") == conversation_prompt_ids(tok, [], "hi")[0]


def test_sampling_is_reproducible_with_a_seed(loaded):
    model, tok = loaded
    replies = []
    for _ in range(2):
        torch.manual_seed(7)
        replies.append(ChatSession(model, tok, max_new_tokens=10, temperature=1.0).reply("Hello"))
    assert replies[0] == replies[1]


def test_closing_the_stream_stops_generation(loaded):
    model, tok = loaded
    generation = Generation(prompt_tokens=0)
    ids = conversation_prompt_ids(tok, [], "Tell me a story")[0]
    # min_new_tokens forbids </s>, so only the cancel can stop it before 1000 tokens
    stream = stream_generate(model, tok, ids, max_new_tokens=1000, min_new_tokens=1000, generation=generation)
    next(stream)
    stream.close()
    assert generation.finish_reason == "cancelled" and generation.completion_tokens < 1000


def test_bad_settings_are_refused(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="max_new_tokens"):
        ChatSession(model, tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature > 0"):
        ChatSession(model, tok, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(stream_generate(model, tok, [0], max_new_tokens=0))


def test_widget_keeps_the_history(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, max_new_tokens=4, do_sample=False)
    box = chat_widget(session)
    display, (text, send, reset) = box.children[0], box.children[1].children
    text.value = "What is 3 plus 4?"
    send.click()
    assert text.value == "" and len(session.history) == 1
    assert "What is 3 plus 4?" in display.value and "▌" not in display.value
    text.value = "   "
    send.click()  # an empty message is ignored
    assert len(session.history) == 1
    reset.click()
    assert session.history == [] and "no messages yet" in display.value


def test_adapter_loads_kept_separate_or_merged_with_the_same_logits(loaded, adapter_dir, tmp_path):
    base, tok = loaded
    separate, _ = load_for_inference(MODEL, adapter_dir, verbose=False)
    merged, _ = load_for_inference(MODEL, adapter_dir, merge=True, verbose=False)
    ids = torch.tensor([conversation_prompt_ids(tok, [], "What is 3 plus 4?")[0]])
    assert max_logit_difference(base, separate, ids) > 1e-2  # the adapter changes the model
    assert max_logit_difference(separate, merged, ids) < 1e-4  # merging does not
    files = merge_and_save(MODEL, adapter_dir, tmp_path / "merged", max_shard_size="5MB")
    names = {f.name for f in files}
    assert "model.safetensors.index.json" in names and "tokenizer.json" in names
    assert sum(name.startswith("model-") and name.endswith(".safetensors") for name in names) >= 2
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth"))]  # no pickle files

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    keys = [key for shard in sorted((tmp_path / "merged").glob("*.safetensors")) for key in safe_open(shard, "pt").keys()]
    assert keys and not [key for key in keys if "lora" in key]  # merged: no adapter tensor left (notebook 12)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("3 加 4")["input_ids"] == tok("3 加 4")["input_ids"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert max_logit_difference(separate, reloaded, ids) < 1e-4


def test_weighted_adapters_cat_is_the_weighted_sum_linear_is_not_and_dare_drops_a_share(tmp_path):
    """Notebook 12, section 5: peft's add_weighted_adapter on two LoRA adapters. `cat` is exactly the weighted sum of
    the updates, `linear` is not (cross terms); DARE at density 1 is `linear`; at density d a share of about (1 - d)^2
    of a DARE merge's factor entries is zero (an entry is zero only where both adapters dropped it)."""
    import math
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model

    from helpers.models import load_model

    for seed, name in ((1, "one"), (2, "two")):  # two adapters with random, non-zero A and B
        torch.manual_seed(seed)
        config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                            target_modules=["query_key_value", "dense_4h_to_h"])
        get_peft_model(load_model(MODEL, verbose=False), config).save_pretrained(tmp_path / name)
    both = PeftModel.from_pretrained(load_model(MODEL, verbose=False), tmp_path / "one", adapter_name="one")
    both.load_adapter(tmp_path / "two", adapter_name="two")
    both.add_weighted_adapter(["one", "two"], [0.5, 0.5], "cat", combination_type="cat")
    both.add_weighted_adapter(["one", "two"], [0.5, 0.5], "linear", combination_type="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft warns that density 1 drops nothing
        both.add_weighted_adapter(["one", "two"], [0.5, 0.5], "dare_whole", combination_type="dare_linear", density=1.0)
    torch.manual_seed(0)
    density = 0.5
    both.add_weighted_adapter(["one", "two"], [0.5, 0.5], "dare", combination_type="dare_linear", density=density)
    layer = both.base_model.model.gpt_neox.layers[0].attention.query_key_value
    expected = 0.5 * layer.get_delta_weight("one") + 0.5 * layer.get_delta_weight("two")
    assert (layer.get_delta_weight("cat") - expected).abs().max().item() < 1e-6
    assert (layer.get_delta_weight("linear") - expected).abs().max().item() > 1e-6
    for factor in (layer.lora_A, layer.lora_B):
        assert torch.equal(factor["dare_whole"].weight, factor["linear"].weight)
    dare = [f["dare"].weight for m in both.modules() if hasattr(m, "lora_A") and "dare" in m.lora_A
            for f in (m.lora_A, m.lora_B)]
    zeros, total = sum(int((w == 0).sum()) for w in dare), sum(w.numel() for w in dare)
    share = (1 - density) ** 2
    assert abs(zeros / total - share) < 6 * math.sqrt(share * (1 - share) / total), (zeros / total, share)


def test_answer_losses_are_each_answers_mean_loss_given_its_prompt(loaded):
    """Notebooks 12 and 13: answer_losses gives, per answer, the model's own loss with labels on the answer and its
    </s> only, whether the answers are scored in one padded batch or one by one."""
    model, tok = loaded
    items = [(conversation_prompt_ids(tok, [], question)[0], answer) for question, answer in
             (("3 加 4 等于多少？", "等于 7。"), ("Hello", "Hi there, how can I help you today?"), ("再加 2 呢？", "9"))]
    batched = answer_losses(model, tok, items)
    assert batched.shape == (3,)
    assert torch.allclose(batched, torch.cat([answer_losses(model, tok, [item]) for item in items]), rtol=1e-5)
    for (prompt, answer), value in zip(items, batched):
        answer_ids = _ids(tok, answer) + [tok.eos_token_id]
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([prompt + answer_ids]),
                         labels=torch.tensor([[IGNORE_INDEX] * len(prompt) + answer_ids])).loss
        assert value.item() == pytest.approx(loss.item(), rel=1e-5)  # float32, summed in another order


def test_reuse_or_train_adapter_copies_only_an_adapter_trained_the_same_way(tmp_path):
    """Notebook 13 copies notebook 12's chat adapter when its training.json is the record of the very training notebook
    13 would run, and trains otherwise (no adapter there, other arguments, an unreadable record). Both paths, and what
    the copy relies on: the same call trains the same adapter again."""
    from safetensors.torch import load_file

    from helpers.data import load_dataset
    from helpers.prompts import tokenize_dataset

    rows = tokenize_dataset(load_dataset("conversations").select(range(8)), load_tokenizer(MODEL), max_length=48)
    arguments = {"model_name": MODEL, "max_steps": 2, "batch_size": 4, "seed": 0, "logging_steps": 1}

    def adapter(name, reuse=None, **changes):
        return reuse_or_train_adapter(tmp_path / name, "lora", rows, output_dir=tmp_path / f"{name}-trainer",
                                      reuse=reuse, **{**arguments, **changes})

    first = adapter("first", reuse=tmp_path / "not-there")
    assert first["reused_from"] is None and first["run"]["steps"] == 2 and (tmp_path / "first-trainer").is_dir()
    copied = adapter("copied", reuse=tmp_path / "first")
    assert copied["reused_from"] == str(tmp_path / "first") and not (tmp_path / "copied-trainer").exists()
    assert (copied["trained"], copied["run"]) == (first["trained"], first["run"])
    again = adapter("again")  # nothing to reuse: trained here, by the same call
    assert again["reused_from"] is None and again["trained"] == first["trained"]
    weights = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("first", "again")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    other = adapter("other-seed", reuse=tmp_path / "first", seed=1)
    assert other["reused_from"] is None and other["trained"]["arguments"]["seed"] == 1
    (tmp_path / "first" / TRAINING_RECORD).write_text('{"trained": ')  # a record being written, or broken
    assert adapter("after-a-broken-record", reuse=tmp_path / "first")["reused_from"] is None


def test_export_refuses_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_for_inference(MODEL, tmp_path, verbose=False)
    with pytest.raises(ValueError, match="re-quantize"):
        load_for_inference(MODEL, tmp_path, quantization="nf4", merge=True, verbose=False)


def _run_chat(args, stdin, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "helpers.chat", "--model", MODEL, *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=timeout)


def test_command_line_chat_through_standard_input(adapter_dir):
    done = _run_chat(["--adapter", str(adapter_dir), "--greedy", "--max-new-tokens", "6"],
                     "What is 3 plus 4?\nAnd 2 more?\n/history\n/reset\n/history\n/nonsense\n/exit\nnot read\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    replies = [line.removeprefix("Model: ") for line in lines if line.startswith("Model: ")]
    assert len(replies) == 2
    # the same two turns in-process give the same greedy replies
    model, tok = load_for_inference(MODEL, adapter_dir, verbose=False)
    session = ChatSession(model, tok, max_new_tokens=6, do_sample=False)
    assert [session.reply("What is 3 plus 4?"), session.reply("And 2 more?")] == [r.strip() for r in replies]
    assert "[2 turns]" in lines and "[history cleared]" in lines and "[0 turns]" in lines
    assert any(line.startswith("[unknown command /nonsense") for line in lines)
    assert lines[-1] == "[bye]" and "not read" not in done.stdout
    assert "Loaded" in done.stderr and "Loaded" not in done.stdout  # loading messages stay off the chat


def test_command_line_chat_ends_at_end_of_input_and_reports_a_bad_adapter(tmp_path, monkeypatch, capsys):
    from helpers.chat import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))  # in-process: the same main() as above
    assert main(["--model", MODEL, "--greedy", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "[bye]" and sum(line.startswith("Model: ") for line in out) == 1
    assert main(["--model", MODEL, "--adapter", str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
