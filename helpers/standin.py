"""Build the course's offline stand-in for EleutherAI/pythia-70m-deduped.

    python -m helpers.standin build            # rebuild models/tiny-neox-standin (about 10 min, one thread)
    python -m helpers.standin build --steps 5 --out /tmp/x   # a quick reproducibility check

Same seed, same machine thread count -> byte-identical weights. What it is and how it differs from
Pythia-70m is explained in lessons/00_setup_and_tour.md; notebooks/00_setup_and_tour.ipynb loads it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

from .env import REPO_ROOT
from .models import STANDIN_DIR

CORPUS = REPO_ROOT / "data" / "corpus.txt"
SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]  # Pythia's ids 0 and 1
CJK_CHARACTER = r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef\u201c\u201d\u2018\u2019]"
# pythia-14m's shape (hidden 128, 6 layers, 4 heads, 512 MLP) with a 4k vocabulary of our own:
# on a CPU a 50k vocabulary would dominate the cost of every step. Like Pythia (50,304 rows for a 50,277-token
# tokenizer) the embedding has more rows than the tokenizer has tokens.
ARCHITECTURE = dict(vocab_size=4096, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                    intermediate_size=512, rotary_pct=0.25, rotary_emb_base=10000,
                    use_parallel_residual=True, max_position_embeddings=2048, hidden_act="gelu",
                    layer_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02,
                    bos_token_id=0, eos_token_id=0, pad_token_id=1)
PRETRAINING = dict(steps=1000, batch_size=16, block_size=128, lr=2e-3, warmup=100, weight_decay=0.01, seed=0)

# The course's conversation format as a chat template (Jinja, what `tokenizer.apply_chat_template` renders):
# `<s>q1</s>a1</s>q2</s>`, the tokens of helpers.prompts.tokenize_conversation, which every course chat trains on.
# The `{% generation %}` block marks the answers (and their </s>), the tokens that format trains on, for
# `return_assistant_tokens_mask=True` (TRL's `assistant_only_loss`). Taught in notebooks/13_chat_and_api.ipynb.
CHAT_TEMPLATE = r"""
{#- <s> and </s> are the tokenizer's BOS and EOS. A system (or developer) message has no slot of its own in the
    course's format: it goes in front of the next user message, on a line of its own. The prompt already ends where
    the answer starts, so add_generation_prompt adds nothing. -#}
{{- bos_token -}}
{%- set pending = namespace(system='') -%}
{%- for message in messages -%}
    {%- if message['content'] is string -%}
        {%- set text = message['content'] -%}
    {%- elif message['content'] | rejectattr('type', 'equalto', 'text') | list -%}
        {{- raise_exception('only text content parts ({"type": "text", "text": ...}) are supported') -}}
    {%- else -%}
        {%- set text = message['content'] | map(attribute='text') | join('') -%}
    {%- endif -%}
    {%- if message['role'] in ['system', 'developer'] -%}
        {%- set pending.system = text -%}
    {%- elif message['role'] == 'user' -%}
        {%- if pending.system -%}
            {{- pending.system ~ '\n' -}}
            {%- set pending.system = '' -%}
        {%- endif -%}
        {{- text ~ eos_token -}}
    {%- elif message['role'] == 'assistant' -%}
        {%- generation -%}{{- text ~ eos_token -}}{%- endgeneration -%}
    {%- else -%}
        {{- raise_exception("unknown role '" ~ message['role'] ~ "': use system, developer, user or assistant") -}}
    {%- endif -%}
{%- endfor -%}
"""


def add_chat_template(tokenizer, template: str = CHAT_TEMPLATE):
    """Give `tokenizer` the course's chat template (replacing any it had) and return it.

    `apply_chat_template(messages)` then renders the format the course's chats are trained on, and
    `save_pretrained` writes the template beside the tokenizer (`chat_template.jinja`), so an exported folder
    carries it. The weights are not touched. Taught in notebooks/13_chat_and_api.ipynb.
    """
    tokenizer.chat_template = template
    return tokenizer


def train_tokenizer(corpus: Path, vocab_size: int):
    """A byte-level BPE (the GPT-NeoX kind) trained on the course corpus, wrapped for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Each CJK character (and CJK punctuation) is its own pre-token, so merges never cross characters:
    # Chinese is tokenized character by character, English into BPE words. Without this, BPE trained on
    # a small templated corpus merges whole phrases ("...归入治疗或手术一类") into single tokens, and the
    # words inside them (the labels the course fine-tunes on) become rare tokens the model barely knows.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK_CHARACTER), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(corpus)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|padding|>",
                                   model_max_length=ARCHITECTURE["max_position_embeddings"])


def _blocks(tokenizer, corpus: Path, block_size: int):
    import torch

    ids: list[int] = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids.extend(tokenizer(line)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size]).view(n, block_size), len(ids)


def build(out_dir: Path = STANDIN_DIR, steps: int = PRETRAINING["steps"], corpus: Path = CORPUS,
          log_every: int = 200) -> dict:
    """Train the tokenizer, pretrain the model on the corpus and save both to `out_dir`."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = dict(PRETRAINING, steps=steps)
    # One thread: the same seed then gives byte-identical weights whatever the machine's core count
    # (the order of floating-point sums in a matrix product can depend on the number of threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(cfg["seed"])
    started = time.time()
    tokenizer = train_tokenizer(corpus, ARCHITECTURE["vocab_size"])
    data, n_tokens = _blocks(tokenizer, corpus, cfg["block_size"])
    n_val = max(1, len(data) // 50)
    val, train = data[:n_val], data[n_val:]
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**ARCHITECTURE))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, 0.95))

    def lr_at(step):  # linear warm-up, cosine decay to a tenth
        if step < cfg["warmup"]:
            return cfg["lr"] * (step + 1) / cfg["warmup"]
        progress = (step - cfg["warmup"]) / max(1, steps - cfg["warmup"])
        return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    generator = torch.Generator().manual_seed(cfg["seed"])
    order = torch.randperm(len(train), generator=generator)
    history = []
    model.train()
    for step in range(steps):
        start = (step * cfg["batch_size"]) % len(train)
        if start + cfg["batch_size"] > len(train):  # new epoch, new order
            order = torch.randperm(len(train), generator=generator)
            start = 0
        batch = train[order[start:start + cfg["batch_size"]]]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(round(loss.item(), 4))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.3f}  ({time.time() - started:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        val_loss = sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in val) / len(val)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    add_chat_template(tokenizer)  # apply_chat_template renders the course's format (notebooks 12 and 13)
    tokenizer.save_pretrained(out_dir)
    summary = {"corpus": str(corpus.relative_to(REPO_ROOT)) if corpus.is_relative_to(REPO_ROOT) else str(corpus),
               "corpus_tokens": n_tokens, "architecture": ARCHITECTURE, "pretraining": cfg,
               "parameters": sum(p.numel() for p in model.parameters()),
               "final_train_loss": history[-1], "validation_loss": round(val_loss, 4),
               "validation_perplexity": round(math.exp(val_loss), 2),
               "seconds": round(time.time() - started, 1), "torch_threads": 1,
               "train_loss_every_50_steps": history[::50]}
    torch.set_num_threads(threads)
    (out_dir / "pretraining.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return summary


def weights_digest(folder: Path) -> str:
    """SHA-256 of the saved weights, to check that a rebuild reproduced them."""
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


# GLM-4's architecture (transformers' GlmForCausalLM, model_type "glm") at toy size. THUDM/glm-4-9b-chat-hf has
# 32 query heads sharing 2 key/value heads of width 128; here 4 query heads share 2 of width 16, so the prefix
# and the cache are sized by the key/value heads exactly as in the full model.
TINY_GLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)


def build_tiny_glm(out_dir: Path, seed: int = 0) -> Path:
    """Save a RANDOMLY INITIALISED tiny GlmForCausalLM (TINY_GLM) with the stand-in's tokenizer to `out_dir`.

    It runs notebook 05's GLM-4 recipe (recipes/05_glm_ptuning.py) end to end on a CPU in seconds: loading,
    P-Tuning v2 or LoRA, training, checkpoints, reloading, generation. Its weights are random, so what it
    trains tests the code path and learns nothing. The caller's random state is left as it was.
    Taught in notebooks/05_ptuning_v2.ipynb.
    """
    import torch
    from transformers import AutoTokenizer, GlmConfig, GlmForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(STANDIN_DIR)
    config = GlmConfig(vocab_size=len(tokenizer), **TINY_GLM, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                       tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GlmForCausalLM(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.standin", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the tokenizer and pretrain the stand-in")
    b.add_argument("--out", type=Path, default=STANDIN_DIR, help=f"output folder (default {STANDIN_DIR})")
    b.add_argument("--steps", type=int, default=PRETRAINING["steps"], help="pretraining steps")
    args = parser.parse_args(argv)
    summary = build(args.out, args.steps)
    print(json.dumps({k: summary[k] for k in ("parameters", "corpus_tokens", "final_train_loss",
                                               "validation_loss", "validation_perplexity", "seconds")}))
    print(f"saved to {args.out}; weights sha256 {weights_digest(args.out)}")


if __name__ == "__main__":
    main()
