"""A small OpenAI-compatible chat-completions server for a (tuned) model: FastAPI + uvicorn + sse-starlette.

    python -m helpers.serving --model EleutherAI/pythia-70m-deduped --adapter outputs/13_chat_and_api/adapter_chat --port 8000

Endpoints (the request and response shapes of OpenAI's Chat Completions API, so its clients work):
  GET  /v1/models             the one model served
  POST /v1/chat/completions   {"model", "messages": [{"role", "content"}, ...], "max_completion_tokens" (or the
                              older "max_tokens"), "temperature", "top_p", "seed", "stop", "stream",
                              "stream_options": {"include_usage"}}, and "repetition_penalty" (an extension, as in
                              vLLM); temperature 0 is greedy. Roles: system (or developer), user, assistant;
                              content: a string or a list of {"type": "text", "text"} parts. The prompt is the
                              tokenizer's chat template applied to the messages (the course's format when it has
                              none). With "stream": true the answer arrives as server-sent events, `data: {chunk}`
                              lines ending with `data: [DONE]`.
Bad requests get a 4xx status and an OpenAI-style {"error": {"message", "type", "param", "code"}} body,
and the server keeps serving. The server binds to loopback addresses only: it has no authentication.
Requests are answered one at a time (one model, one lock). Taught in notebooks/13_chat_and_api.ipynb.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import subprocess
import sys
import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .chat import ASSISTANT, HUMAN, Generation, stream_generate, template_prompt_ids
from .env import free_port

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


Role = Literal["system", "developer", "user", "assistant"]


class ChatMessage(BaseModel):
    """One message: `content` is text, or a list of parts of which the server reads `{"type": "text", "text": ...}`."""

    model_config = ConfigDict(extra="ignore")  # e.g. "name"
    role: Role
    content: str | list[dict]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of an OpenAI chat-completions request the course's server understands; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)  # OpenAI's older name, deprecated for max_completion_tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)  # not OpenAI's: an extension, as in vLLM
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None


class APIError(Exception):
    """An error answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------
# Reading a request: messages, stop sequences, token budget, sampling
# ----------------------------------------------------------------------------------------------
def message_text(message: ChatMessage, index: int) -> str:
    """The text of `messages[index]`: its string, or its text parts joined; any other part is an APIError(400)."""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{index}].content[{j}] is a part of type {part.get('type')!r}: this server "
                                'reads text only, parts of the form {"type": "text", "text": "..."}',
                           param=f"messages[{index}].content[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def normalize_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages -> `[{"role": "system" | "user" | "assistant", "content": text}]`, checked.

    Allowed: an optional first "system" (or "developer", OpenAI's newer name for it, treated as system), then
    user/assistant alternating, ending with "user": the course's format has no slot for anything else. Content
    may be a string or a list of text parts. Raises APIError(400) naming what was wrong.
    """
    normalized = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
                  for i, m in enumerate(messages)]
    offset = 1 if normalized and normalized[0]["role"] == "system" else 0
    if len(normalized) == offset:
        raise APIError(400, "messages must contain at least one 'user' message", param="messages")
    for i in range(offset, len(normalized)):
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if normalized[i]["role"] != expected:
            role = messages[i].role
            extra = f" (a {role!r} message is only allowed first)" if normalized[i]["role"] == "system" else ""
            raise APIError(400, f"messages[{i}] has role {role!r} but {expected!r} was expected: after an optional "
                                f"first 'system' (or 'developer') message, roles must alternate user, assistant, ..., "
                                f"user{extra}", param=f"messages[{i}].role")
    if normalized[-1]["role"] != "user":
        raise APIError(400, "the last message must have role 'user'", param="messages")
    if not normalized[-1]["content"].strip():
        raise APIError(400, "the last user message is empty", param="messages")
    return normalized


def messages_to_turns(messages: list[ChatMessage]) -> tuple[list[dict], str]:
    """OpenAI messages -> (history of {"human", "assistant"} turns, the new user message), checked.

    The course's `<s>q</s>a</s>` format has no system slot, so a system message is put in front of the first
    user message, on a line of its own (as the course's chat template does: helpers.standin.CHAT_TEMPLATE).
    """
    normalized = normalize_messages(messages)
    system = normalized[0]["content"] if normalized[0]["role"] == "system" else ""
    contents = [m["content"] for m in normalized if m["role"] != "system"]
    if system:
        contents[0] = f"{system}\n{contents[0]}"
    history = [{HUMAN: contents[i], ASSISTANT: contents[i + 1]} for i in range(0, len(contents) - 1, 2)]
    return history, contents[-1]


def stop_sequences(stop: str | list[str] | None) -> list[str]:
    """`stop` as a list of at most 4 non-empty strings (OpenAI's limit), or an APIError(400)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, f"stop must be a string or a list of up to 4 non-empty strings, got {stop!r}", param="stop")
    return stops


class StopScanner:
    """Cuts streamed text at the first stop sequence, which is left out (OpenAI's `stop`).

    `feed(piece)` returns the text that is safe to send: it holds back only an ending that could still grow into
    a stop sequence, and once one has appeared (`stopped`), what came before it. `flush()` returns what is held.
    """

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = list(stops), "", False

    def feed(self, piece: str) -> str:
        if self.stopped:  # nothing after the stop sequence is ever sent
            return ""
        self.held += piece
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            text, self.held = self.held[:min(found)], ""
            return text
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        text, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return text

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


@dataclass
class Prepared:
    """A checked request, ready to generate: prompt ids, token budget, sampling settings, stop sequences."""

    ids: list[int]
    max_tokens: int
    sampling: dict
    stops: list[str]
    include_usage: bool


@dataclass
class Served:
    """What one app serves, and its limits (see `create_app`)."""

    model: object
    tokenizer: object
    model_id: str
    max_tokens_limit: int
    default_max_tokens: int
    context_length: int | None
    created: int = field(default_factory=lambda: int(time.time()))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one generation at a time: one model, no batching


def prepare(served: Served, request: ChatCompletionRequest) -> Prepared:
    """Check `request` against what is served and render its prompt with the chat template; APIError if wrong."""
    if request.model != served.model_id:
        raise APIError(404, f"the model {request.model!r} does not exist here; this server serves "
                            f"{served.model_id!r} (see GET /v1/models)", param="model", code="model_not_found")
    # max_completion_tokens is OpenAI's current name; max_tokens, the older one, is still accepted
    name, max_tokens = next(((n, v) for n, v in (("max_completion_tokens", request.max_completion_tokens),
                                                  ("max_tokens", request.max_tokens)) if v is not None),
                            ("max_completion_tokens", served.default_max_tokens))
    if max_tokens > served.max_tokens_limit:
        raise APIError(400, f"{name} is {max_tokens}, more than this server allows ({served.max_tokens_limit})",
                       param=name)
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    stops = stop_sequences(request.stop)
    ids = template_prompt_ids(served.tokenizer, normalize_messages(request.messages))
    if served.context_length and len(ids) + max_tokens > served.context_length:
        raise APIError(400, f"the prompt is {len(ids)} tokens; with {name}={max_tokens} that exceeds the model's "
                            f"context of {served.context_length} tokens: shorten the messages or {name}",
                       param="messages", code="context_length_exceeded")
    sampling = {"do_sample": request.temperature > 0, "repetition_penalty": request.repetition_penalty}
    if sampling["do_sample"]:
        sampling.update(temperature=request.temperature, top_p=request.top_p)
    return Prepared(ids, max_tokens, sampling, stops,
                    include_usage=bool(request.stream_options and request.stream_options.include_usage))


# ----------------------------------------------------------------------------------------------
# Answering: the text of the answer, then a whole completion or a stream of chunks
# ----------------------------------------------------------------------------------------------
def answer_pieces(served: Served, prepared: Prepared, generation: Generation, seed: int | None = None) -> Iterator[str]:
    """The answer's text as it is generated: leading whitespace dropped, cut before the first stop sequence.

    Generation ends at </s>, at `max_tokens`, or as soon as a stop sequence appears (then `generation.finish_reason`
    is "stop", as at </s>). Closing this generator early stops the model at its next token.
    """
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    pieces = stream_generate(served.model, served.tokenizer, prepared.ids, max_new_tokens=prepared.max_tokens,
                             generation=generation, **prepared.sampling)
    scanner, started = StopScanner(prepared.stops), False
    try:
        for piece in itertools.chain(pieces, [None]):
            text = scanner.flush() if piece is None else scanner.feed(piece)
            if not started:  # leading whitespace dropped, as the whole answer is stripped
                text, started = text.lstrip(), bool(text.strip())
            if text:
                yield text
            if scanner.stopped:
                break
    finally:
        with contextlib.suppress(ValueError):  # the generator may still be finishing a step
            pieces.close()
        if scanner.stopped:
            generation.finish_reason = "stop"


def usage(generation: Generation) -> dict:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


async def complete(served: Served, request: ChatCompletionRequest, prepared: Prepared) -> dict:
    """The whole answer as one `chat.completion` object."""
    from starlette.concurrency import run_in_threadpool

    generation = Generation(prompt_tokens=len(prepared.ids))
    async with served.lock:
        text = await run_in_threadpool(lambda: "".join(answer_pieces(served, prepared, generation, request.seed)))
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": served.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                         "finish_reason": generation.finish_reason}],
            "usage": usage(generation)}


def stream_completion(served: Served, request: ChatCompletionRequest, prepared: Prepared):
    """The answer as server-sent events: `chat.completion.chunk`s, a usage chunk if asked for, then [DONE]."""
    from sse_starlette.sse import EventSourceResponse
    from starlette.concurrency import run_in_threadpool

    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": served.model_id}

    def chunk(choices: list, **more) -> dict:
        if prepared.include_usage:  # then every chunk has a usage field, null until the last one
            more.setdefault("usage", None)
        return {"data": json.dumps({**head, "choices": choices, **more}, ensure_ascii=False)}

    def delta(content: dict, finish_reason: str | None = None) -> dict:
        return chunk([{"index": 0, "delta": content, "finish_reason": finish_reason}])

    async def events():
        generation = Generation(prompt_tokens=len(prepared.ids))
        async with served.lock:
            pieces = answer_pieces(served, prepared, generation, request.seed)  # runs on the first next()
            try:
                yield delta({"role": "assistant", "content": ""})
                while (piece := await run_in_threadpool(next, pieces, None)) is not None:
                    yield delta({"content": piece})
                yield delta({}, generation.finish_reason)
                if prepared.include_usage:
                    yield chunk([], usage=usage(generation))
                yield {"data": "[DONE]"}
            finally:
                with contextlib.suppress(ValueError):  # a hang-up can arrive while a thread is inside next()
                    await run_in_threadpool(pieces.close)

    return EventSourceResponse(events(), sep="\n")


def _validation_message(errors) -> tuple[str, str | None]:
    """A readable sentence from pydantic's errors, and the first offending field."""
    parts, param = [], None
    for error in errors:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        if error.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})", None
        field_name = ".".join(loc) or "body"
        param = param or field_name
        parts.append(f"{field_name}: {error['msg']}")
    return "invalid request: " + "; ".join(parts), param


def add_error_handlers(app) -> None:
    """Every error, ours or FastAPI's (validation, unknown path, wrong method), as an OpenAI-style error body."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        message, param = _validation_message(error.errors())
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code)


def create_app(model, tokenizer, *, model_id: str = "course-model", max_tokens_limit: int = 256,
               default_max_tokens: int | None = None, context_length: int | None = None):
    """The FastAPI application serving `model` under the name `model_id`.

    The prompt is the tokenizer's chat template applied to the messages (the course's format,
    helpers.standin.CHAT_TEMPLATE, when the tokenizer has none). `max_tokens_limit` caps what one request may
    ask for (larger is a 400, not a silent cut); `default_max_tokens` (default: 64 or the limit, if lower) applies
    when a request names none; `context_length` (default: the model's `max_position_embeddings`) caps prompt + answer.
    """
    from fastapi import FastAPI

    default_max_tokens = default_max_tokens or min(64, max_tokens_limit)
    if not 1 <= default_max_tokens <= max_tokens_limit:
        raise ValueError(f"need 1 <= default_max_tokens <= max_tokens_limit, got {default_max_tokens}, {max_tokens_limit}")
    served = Served(model, tokenizer, model_id, max_tokens_limit, default_max_tokens,
                    context_length or getattr(model.config, "max_position_embeddings", None))
    app = FastAPI(title="llm-finetuning-course OpenAI-compatible API", version="1")
    add_error_handlers(app)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": served.created,
                                            "owned_by": "llm-finetuning-course"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        prepared = prepare(served, request)
        if request.stream:
            return stream_completion(served, request, prepared)
        return await complete(served, request, prepared)

    return app


# ----------------------------------------------------------------------------------------------
# Running it: in a thread (tests, notebooks) or as a process (python -m helpers.serving)
# ----------------------------------------------------------------------------------------------
def check_loopback(host: str) -> str:
    """Return `host` if it is a loopback address, else raise: the course's server has no authentication."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"host {host!r} is not a loopback address; this server has no authentication, so it "
                         f"only listens on {', '.join(LOOPBACK_HOSTS)}. Put a proxy with authentication in front "
                         "to expose it.")
    return host


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread on a loopback port; `stop()` shuts it down.

        with ServerThread(app) as server:
            httpx.get(server.url + "/v1/models")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 30.0):
        import uvicorn

        self.host, self.port = check_loopback(host), port or free_port(host)
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self._server.started:  # bounded: gives up after startup_timeout seconds
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.url} within {startup_timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask uvicorn to exit and wait; returns True when the thread has ended."""
        self._server.should_exit = True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def wait_until_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 120.0) -> float:
    """Poll `url`/v1/models until it answers 200 (at most `timeout` s); returns the seconds waited.

    With `process`, fails at once if the process exits instead.
    """
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise RuntimeError(f"the server process exited with status {process.returncode}. {output}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2.0).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class ServerProcess:
    """`python -m helpers.serving ARGS --host HOST --port PORT` as a child process, ready when constructed.

    Its output goes to `log_path`. `stop()` (or leaving a `with` block) terminates it; it is also killed
    when the Python process that started it exits, so a failed notebook cell never leaves it running.
    """

    def __init__(self, *args: str, host: str = "127.0.0.1", port: int | None = None, log_path=None,
                 startup_timeout: float = 120.0):
        import atexit
        import tempfile

        self.host, self.port = check_loopback(host), port or free_port(host)
        self.url = f"http://{self.host}:{self.port}"
        self.log_path = log_path or tempfile.mkstemp(prefix="helpers-serving-", suffix=".log")[1]
        self.command = [sys.executable, "-m", "helpers.serving", *map(str, args), "--host", self.host,
                        "--port", str(self.port)]
        from .env import REPO_ROOT

        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(self._kill)
        try:
            self.startup_seconds = wait_until_ready(self.url, self.process, timeout=startup_timeout)
        except (RuntimeError, TimeoutError) as error:
            self._kill()
            raise RuntimeError(f"{error}\n--- server log ({self.log_path}) ---\n{self.log()}") from None

    def log(self) -> str:
        """What the server printed so far."""
        with open(self.log_path) as log:
            return log.read()

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 30.0) -> int:
        """Terminate the server (SIGTERM: uvicorn shuts down cleanly) and return its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="python -m helpers.serving", description=(
        "Serve a base model (+ a LoRA adapter) with an OpenAI-compatible API: GET /v1/models, "
        "POST /v1/chat/completions (stream: true for server-sent events). Loopback addresses only."))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model: Hub id or local folder (default: %(default)s)")
    parser.add_argument("--adapter", default=None, help="folder of a saved peft adapter")
    parser.add_argument("--quantization", choices=["nf4", "fp4", "int8"], default=None)
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base first")
    parser.add_argument("--model-id", default=None, help="the name clients use in 'model' (default: the model path)")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-tokens-limit", type=int, default=256, help="largest max_tokens a request may ask for")
    parser.add_argument("--default-max-tokens", type=int, default=None,
                        help="max_tokens when a request gives none (default: 64, or the limit if lower)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load the model and serve it with uvicorn until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    from .export import load_for_inference

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_loopback(args.host)
    except ValueError as error:
        parser.error(str(error))
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # loading messages go to stderr
            model, tokenizer = load_for_inference(args.model, args.adapter, quantization=args.quantization,
                                                  merge=args.merge)
    except (OSError, ValueError, RuntimeError) as error:  # a wrong path or option: say which, no traceback
        print(f"python -m helpers.serving: error: {error}", file=sys.stderr)
        return 2
    app = create_app(model, tokenizer, model_id=args.model_id or args.model, max_tokens_limit=args.max_tokens_limit,
                     default_max_tokens=args.default_max_tokens)
    print(f"serving {args.model_id or args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
