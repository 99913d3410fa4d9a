"""Chatting with a (tuned) model: multi-turn prompts, streamed tokens, a notebook widget and a terminal chat.

The prompt is the course's multi-turn training format (`helpers.prompts.tokenize_conversation`),
`<s>question1</s>answer1</s>question2</s>`, so the model sees at inference exactly what it was trained
on, and answers until it emits `</s>`. Taught in notebooks/13_chat_and_api.ipynb (the widget is
also used in notebooks/04_qlora_training.ipynb).

    session = ChatSession(model, tokenizer)
    session.reply("What is 3 plus 4?", on_token=lambda piece: print(piece, end=""))

From a terminal (lines on standard input; /reset forgets the history, /exit quits):

    python -m helpers.chat --model EleutherAI/pythia-70m-deduped --adapter outputs/13_chat_and_api/adapter_chat
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .models import evaluating
from .prompts import tokenize_conversation

HUMAN, ASSISTANT = "human", "assistant"


def conversation_prompt_ids(tokenizer, history: list[dict], message: str,
                            max_prompt_tokens: int | None = None) -> tuple[list[int], int]:
    """Token ids of `<s>q1</s>a1</s>…<s>message</s>`: the prompt after which the model writes its answer.

    Built by `tokenize_conversation` on the history plus the new question with an empty answer, whose
    closing `</s>` is then dropped, so training and chatting share one format. When the prompt is
    longer than `max_prompt_tokens`, the OLDEST turns are left out first; returns (ids, turns kept).
    A new message that does not fit alone is an error.
    """
    if not isinstance(message, str) or not message.strip():
        raise ValueError("the message must be a non-empty string")
    kept = list(history)
    while True:
        turns = kept + [{HUMAN: message, ASSISTANT: ""}]
        ids = tokenize_conversation(tokenizer, turns)["input_ids"][:-1]  # drop the empty answer's </s>
        if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
            return ids, len(kept)
        if not kept:
            raise ValueError(f"the message alone is {len(ids)} tokens, more than the {max_prompt_tokens} "
                             "the prompt may use (context length minus max_new_tokens): shorten it")
        kept = kept[1:]


def turns_to_messages(turns: list[dict]) -> list[dict]:
    """The course's `{"human", "assistant"}` turns as chat messages: `[{"role": "user", "content": ...},
    {"role": "assistant", "content": ...}, ...]`, the shape `apply_chat_template` and TRL's SFTTrainer read.

    A turn whose answer is empty ends the list with its question: the prompt for that answer.
    Taught in notebooks/13_chat_and_api.ipynb.
    """
    messages = []
    for turn in turns:
        messages.append({"role": "user", "content": turn[HUMAN]})
        if turn[ASSISTANT]:
            messages.append({"role": "assistant", "content": turn[ASSISTANT]})
    return messages


def template_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt for the next answer, rendered by the tokenizer's chat template.

    A tokenizer without a template (a base model, the stand-in as shipped) gets the course's
    (`helpers.standin.CHAT_TEMPLATE`), which gives exactly `conversation_prompt_ids`'s tokens.
    Taught in notebooks/13_chat_and_api.ipynb.
    """
    from .standin import CHAT_TEMPLATE

    template = None if getattr(tokenizer, "chat_template", None) else CHAT_TEMPLATE
    return list(tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


@dataclass
class Generation:
    """What one streamed generation produced, filled in as its tokens arrive."""

    prompt_tokens: int
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (the model wrote </s>), "length" (max_new_tokens), "cancelled"
    pieces: list[str] = field(default_factory=list, repr=False)


def stream_generate(model, tokenizer, input_ids: list[int], *, max_new_tokens: int = 64,
                    generation: Generation | None = None, timeout: float = 300.0, **generate_kwargs) -> Iterator[str]:
    """Generate from `input_ids` (one prompt) and yield the new text piece by piece as it is decoded.

    `model.generate` runs in a worker thread and hands tokens to a `TextIteratorStreamer`; this
    generator reads them. Closing the generator early (a client that hangs up) stops the worker at
    the next token. Pass a `Generation` to learn the token counts and why it stopped.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    generation = generation if generation is not None else Generation(prompt_tokens=len(input_ids))
    generation.prompt_tokens = len(input_ids)
    cancel = threading.Event()

    class _Cancelled(StoppingCriteria):
        def __call__(self, ids, scores, **kwargs):
            return cancel.is_set()

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
    device = next(model.parameters()).device
    inputs = torch.tensor([input_ids], device=device)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    if not generate_kwargs.get("do_sample", False):  # greedy: drop sampling knobs generate would warn about
        for key in ("temperature", "top_p", "top_k"):
            generate_kwargs.pop(key, None)
    outcome: dict = {}

    def work():
        try:
            with torch.no_grad():
                outcome["ids"] = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                                max_new_tokens=max_new_tokens, streamer=streamer,
                                                stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                                                **generate_kwargs)
        except BaseException as error:  # handed to the reader below, which re-raises it
            outcome["error"] = error
            streamer.end()

    with evaluating(model):
        worker = threading.Thread(target=work, name="stream_generate", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if "error" in outcome:
                    break
                if piece:
                    generation.pieces.append(piece)
                    generation.text += piece
                    yield piece
        finally:  # also runs when the reader closes the generator early
            cancel.set()  # no-op when generation already ended; stops it at the next token otherwise
            worker.join()
            if "ids" in outcome:
                new = outcome["ids"][0, len(input_ids):].tolist()
                eos = tokenizer.eos_token_id
                if eos in new:
                    generation.completion_tokens, generation.finish_reason = new.index(eos) + 1, "stop"
                else:
                    generation.completion_tokens = len(new)
                    generation.finish_reason = "length" if len(new) >= max_new_tokens else "cancelled"
    if "error" in outcome:
        raise outcome["error"]


class ChatSession:
    """A multi-turn chat with a causal LM: keeps the history and streams each reply.

    `history` is a list of {"human": ..., "assistant": ...} turns, the same shape as the course's
    `conversations` dataset. Sampling settings are the usual chat defaults; `do_sample=False` gives
    greedy, reproducible replies. Taught in notebooks/13_chat_and_api.ipynb.
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 64, do_sample: bool = True,
                 temperature: float = 0.7, top_p: float = 0.9, repetition_penalty: float = 1.1,
                 context_length: int | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if do_sample and not (temperature > 0 and 0 < top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.generate_kwargs = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p,
                                "repetition_penalty": repetition_penalty}
        self.context_length = context_length or getattr(model.config, "max_position_embeddings", None)
        self.history: list[dict] = []
        self.last: Generation | None = None

    def prompt_ids(self, message: str) -> list[int]:
        """The prompt `reply(message)` would send: the history (oldest turns dropped if too long) + message."""
        limit = self.context_length - self.max_new_tokens if self.context_length else None
        return conversation_prompt_ids(self.tokenizer, self.history, message, limit)[0]

    def reply(self, message: str, on_token: Callable[[str], None] | None = None) -> str:
        """Answer `message` given the history, call `on_token(piece)` as text arrives, and remember the turn."""
        self.last = Generation(prompt_tokens=0)
        started = False  # leading whitespace is not streamed, as it is stripped from the answer
        for piece in stream_generate(self.model, self.tokenizer, self.prompt_ids(message),
                                     max_new_tokens=self.max_new_tokens, generation=self.last,
                                     **self.generate_kwargs):
            if not started:
                piece, started = piece.lstrip(), bool(piece.strip())
            if on_token is not None and piece:
                on_token(piece)
        answer = self.last.text.strip()
        self.history.append({HUMAN: message, ASSISTANT: answer})
        return answer

    def reset(self) -> None:
        """Forget the history (the next reply starts a new conversation)."""
        self.history.clear()
        self.last = None


def chat_widget(session: ChatSession):
    """An ipywidgets chat box for `session`: history display, text field, Send and Reset buttons.

    Replies stream into the display as they are generated; the session keeps the history. Returns the
    box; its `.children` are (display, text field, send button, reset button) for driving it from code.
    Taught in notebooks/13_chat_and_api.ipynb.
    """
    import html

    import ipywidgets as widgets

    display = widgets.HTML(layout=widgets.Layout(border="1px solid #ccc", padding="4px", min_height="80px"))
    text = widgets.Text(placeholder="Type a message, then press Send",
                        layout=widgets.Layout(width="70%"))
    send = widgets.Button(description="Send", button_style="primary")
    reset = widgets.Button(description="Reset")

    def render(pending_user: str | None = None, pending_reply: str = "") -> None:
        rows = []
        for turn in session.history:
            rows.append(f"<b>You:</b> {html.escape(turn[HUMAN])}<br><b>Model:</b> {html.escape(turn[ASSISTANT])}")
        if pending_user is not None:
            rows.append(f"<b>You:</b> {html.escape(pending_user)}<br><b>Model:</b> {html.escape(pending_reply)}▌")
        display.value = "<br>".join(rows) or "<i>(no messages yet)</i>"

    def on_send(_=None) -> None:
        message = text.value.strip()
        if not message:
            return
        text.value, text.disabled, send.disabled = "", True, True
        streamed = []

        def on_token(piece: str) -> None:
            streamed.append(piece)
            render(message, "".join(streamed))

        try:
            session.reply(message, on_token=on_token)
        finally:
            text.disabled, send.disabled = False, False
            render()

    def on_reset(_=None) -> None:
        session.reset()
        render()

    send.on_click(on_send)
    reset.on_click(on_reset)
    render()
    return widgets.VBox([display, widgets.HBox([text, send, reset])])


# ----------------------------------------------------------------------------------------------
# The terminal chat: python -m helpers.chat --model ... --adapter ...
# ----------------------------------------------------------------------------------------------
COMMANDS = {"/reset": "forget the conversation so far", "/history": "show the conversation so far",
            "/help": "show these commands", "/exit": "quit (end of input quits too)"}


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="python -m helpers.chat", description=(
        "Chat with a base model and (optionally) a LoRA adapter in the terminal. Each line you type is "
        "one message; the reply streams as it is generated. Commands: "
        + "; ".join(f"{c} {h}" for c, h in COMMANDS.items()) + "."))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model: Hub id or local folder (default: %(default)s)")
    parser.add_argument("--adapter", default=None, help="folder of a saved peft adapter (adapter_config.json)")
    parser.add_argument("--quantization", choices=["nf4", "fp4", "int8"], default=None,
                        help="load the base quantized with bitsandbytes (the adapter stays 16/32-bit)")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base before chatting")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling (reproducible)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the terminal chat; reads messages from standard input until /exit or end of input."""
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        build_parser().error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    from .export import load_for_inference

    try:
        with contextlib.redirect_stdout(sys.stderr):  # loading messages go to stderr, the chat to stdout
            model, tokenizer = load_for_inference(args.model, args.adapter, quantization=args.quantization,
                                                  merge=args.merge)
    except (OSError, ValueError, RuntimeError) as error:  # a wrong path or option: say which, no traceback
        print(f"python -m helpers.chat: error: {error}", file=sys.stderr)
        return 2
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    session = ChatSession(model, tokenizer, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                          temperature=args.temperature, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty)
    interactive = sys.stdin.isatty()
    print(f"Chatting with {args.model}" + (f" + {args.adapter}" if args.adapter else "")
          + ". Commands: " + ", ".join(COMMANDS), flush=True)
    while True:
        if interactive:
            print("You: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        message = line.strip()
        if not message:
            continue
        if message.startswith("/"):
            command = message.split()[0].lower()
            if command == "/exit":
                break
            if command == "/reset":
                session.reset()
                print("[history cleared]", flush=True)
            elif command == "/history":
                for i, turn in enumerate(session.history, 1):
                    print(f"[{i}] You: {turn[HUMAN]}\n[{i}] Model: {turn[ASSISTANT]}", flush=True)
                print(f"[{len(session.history)} turns]", flush=True)
            elif command == "/help":
                for name, what in COMMANDS.items():
                    print(f"{name:<9} {what}", flush=True)
            else:
                print(f"[unknown command {command}; commands: {', '.join(COMMANDS)}]", flush=True)
            continue
        print("Model: ", end="", flush=True)
        try:
            session.reply(message, on_token=lambda piece: print(piece, end="", flush=True))
        except ValueError as error:  # e.g. a message longer than the context
            print(f"[error: {error}]", flush=True)
            continue
        print(flush=True)
    print("[bye]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
