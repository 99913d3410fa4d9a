"""The stand-in model: rebuilt reproducibly, shipped as built, and documented as a stand-in."""
import json

from transformers import AutoConfig

from helpers.models import STANDIN_DIR
from helpers.standin import ARCHITECTURE, CORPUS, PRETRAINING, build, weights_digest


def test_same_seed_same_weights(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS.read_text(encoding="utf-8").splitlines()[:400]), encoding="utf-8")
    first = build(tmp_path / "a", steps=3, corpus=corpus, log_every=0)
    second = build(tmp_path / "b", steps=3, corpus=corpus, log_every=0)
    assert weights_digest(tmp_path / "a") == weights_digest(tmp_path / "b")
    assert first["train_loss_every_50_steps"] == second["train_loss_every_50_steps"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_shipped_standin_matches_the_build_recipe():
    config = AutoConfig.from_pretrained(STANDIN_DIR)
    renamed = {"rotary_pct": ("partial_rotary_factor",), "rotary_emb_base": ("rope_theta",)}
    for key, value in ARCHITECTURE.items():
        if key in renamed:  # transformers 5 keeps these in config.rope_parameters
            assert config.rope_parameters[renamed[key][0]] == value, key
        else:
            assert getattr(config, key) == value, key
    record = json.loads((STANDIN_DIR / "pretraining.json").read_text())
    assert record["pretraining"] == PRETRAINING
    assert record["architecture"] == ARCHITECTURE
    # pretrained, not random: a random model's loss is about ln(vocab_size) = ln(4096) = 8.3
    assert record["validation_loss"] < 2.5
    assert (STANDIN_DIR / "model.safetensors").stat().st_size < 25 * 2**20


def test_shipped_standin_carries_the_course_chat_template():
    from transformers import AutoTokenizer

    from helpers.standin import CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(STANDIN_DIR)  # reads models/tiny-neox-standin/chat_template.jinja
    assert tokenizer.chat_template.strip() == CHAT_TEMPLATE.strip()
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == f"{tokenizer.eos_token}你好{tokenizer.eos_token}"
