"""A small OpenAI-compatible chat-completions server for a (tuned) model: FastAPI + uvicorn + sse-starlette.

    python -m helpers.serving --model EleutherAI/pythia-70m-deduped --adapter outputs/07_export_chat_api/adapter_chat --port 8000

Endpoints (the request and response shapes of OpenAI's Chat Completions API, so its clients work):
  GET  /v1/models             the one model served
  POST /v1/chat/completions   {"model", "messages": [{"role", "content"}, ...], "max_tokens", "temperature",
                              "top_p", "seed", "stream"}, and "repetition_penalty" (an extension, as in
                              vLLM); temperature 0 is greedy. With "stream": true the answer arrives as server-sent
                              events, `data: {chunk}` lines ending with `data: [DONE]`.
Bad requests get a 4xx status and an OpenAI-style {"error": {"message", "type", "param", "code"}} body,
and the server keeps serving. The server binds to loopback addresses only: it has no authentication.
Requests are answered one at a time (one model, one lock). Taught in notebooks/07_export_chat_api.ipynb.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import subprocess
import sys
import threading
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .chat import ASSISTANT, HUMAN, Generation, conversation_prompt_ids, stream_generate
from .env import free_port

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    """The fields of an OpenAI chat-completions request the course's server understands; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)  # not OpenAI's: an extension, as in vLLM
    stream: bool = False
    seed: int | None = None


class APIError(Exception):
    """An error answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def messages_to_turns(messages: list[ChatMessage]) -> tuple[list[dict], str]:
    """OpenAI messages -> (history of {"human", "assistant"} turns, the new user message).

    Allowed: an optional first "system" message, then user/assistant alternating, ending with "user".
    The course's `<s>q</s>a</s>` format has no system slot, so a system message is put in front of the
    first user message. Raises APIError(400) naming what was wrong.
    """
    messages = list(messages)
    system = ""
    if messages and messages[0].role == "system":
        system, messages = messages[0].content, messages[1:]
    if not messages:
        raise APIError(400, "messages must contain at least one 'user' message", param="messages")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            where = i + (1 if system else 0)
            extra = " (a 'system' message is only allowed first)" if message.role == "system" else ""
            raise APIError(400, f"messages[{where}] has role {message.role!r} but {expected!r} was expected: after "
                                f"an optional first 'system' message, roles must alternate user, assistant, ..., "
                                f"user{extra}", param=f"messages[{where}].role")
    if messages[-1].role != "user":
        raise APIError(400, "the last message must have role 'user'", param="messages")
    contents = [m.content for m in messages]
    if system:
        contents[0] = f"{system}\n{contents[0]}"
    history = [{HUMAN: contents[i], ASSISTANT: contents[i + 1]} for i in range(0, len(contents) - 1, 2)]
    return history, contents[-1]


def _validation_message(errors) -> tuple[str, str | None]:
    """A readable sentence from pydantic's errors, and the first offending field."""
    parts, param = [], None
    for error in errors:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        if error.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})", None
        field = ".".join(loc) or "body"
        param = param or field
        parts.append(f"{field}: {error['msg']}")
    return "invalid request: " + "; ".join(parts), param


def create_app(model, tokenizer, *, model_id: str = "course-model", max_tokens_limit: int = 256,
               default_max_tokens: int | None = None, context_length: int | None = None):
    """The FastAPI application serving `model` under the name `model_id`.

    `max_tokens_limit` caps what one request may ask for (larger is a 400, not a silent cut);
    `default_max_tokens` (default: 64 or the limit, if lower) applies when a request names none;
    `context_length` (default: the model's `max_position_embeddings`) caps prompt + answer.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from sse_starlette.sse import EventSourceResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    default_max_tokens = default_max_tokens or min(64, max_tokens_limit)
    if not 1 <= default_max_tokens <= max_tokens_limit:
        raise ValueError(f"need 1 <= default_max_tokens <= max_tokens_limit, got {default_max_tokens}, {max_tokens_limit}")
    context_length = context_length or getattr(model.config, "max_position_embeddings", None)
    app = FastAPI(title="llm-finetuning-course OpenAI-compatible API", version="1")
    lock = asyncio.Lock()  # one generation at a time: one model, no batching
    created = int(time.time())

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

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list",
                "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "llm-finetuning-course"}]}

    def prepare(request: ChatCompletionRequest) -> tuple[list[int], int, dict]:
        if request.model != model_id:
            raise APIError(404, f"the model {request.model!r} does not exist here; this server serves {model_id!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")
        max_tokens = request.max_tokens if request.max_tokens is not None else default_max_tokens
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}, more than this server allows ({max_tokens_limit})",
                           param="max_tokens")
        history, message = messages_to_turns(request.messages)
        if not message.strip():
            raise APIError(400, "the last user message is empty", param="messages")
        ids, _ = conversation_prompt_ids(tokenizer, history, message)
        if context_length and len(ids) + max_tokens > context_length:
            raise APIError(400, f"the prompt is {len(ids)} tokens; with max_tokens={max_tokens} that exceeds the "
                                f"model's context of {context_length} tokens: shorten the messages or max_tokens",
                           param="messages", code="context_length_exceeded")
        sampling = {"do_sample": request.temperature > 0, "repetition_penalty": request.repetition_penalty}
        if sampling["do_sample"]:
            sampling.update(temperature=request.temperature, top_p=request.top_p)
        return ids, max_tokens, sampling

    def seed(request: ChatCompletionRequest) -> None:
        if request.seed is not None:
            import torch

            torch.manual_seed(request.seed)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        ids, max_tokens, sampling = prepare(request)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        stamp = int(time.time())

        if not request.stream:
            generation = Generation(prompt_tokens=len(ids))

            def run() -> None:
                seed(request)
                for _ in stream_generate(model, tokenizer, ids, max_new_tokens=max_tokens, generation=generation,
                                         **sampling):
                    pass

            async with lock:
                await run_in_threadpool(run)
            return {"id": completion_id, "object": "chat.completion", "created": stamp, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text.strip()},
                                 "finish_reason": generation.finish_reason}],
                    "usage": {"prompt_tokens": generation.prompt_tokens,
                              "completion_tokens": generation.completion_tokens,
                              "total_tokens": generation.prompt_tokens + generation.completion_tokens}}

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": stamp,
                               "model": model_id,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]},
                              ensure_ascii=False)

        async def events():
            generation = Generation(prompt_tokens=len(ids))
            async with lock:
                await run_in_threadpool(seed, request)
                pieces = stream_generate(model, tokenizer, ids, max_new_tokens=max_tokens, generation=generation,
                                         **sampling)
                try:
                    yield {"data": chunk({"role": "assistant", "content": ""})}
                    first = True
                    while True:
                        piece = await run_in_threadpool(next, pieces, None)
                        if piece is None:
                            break
                        if first:  # leading whitespace dropped, as the non-streamed answer is stripped
                            piece, first = piece.lstrip(), not piece.strip()
                            if not piece:
                                continue
                        yield {"data": chunk({"content": piece})}
                    yield {"data": chunk({}, generation.finish_reason)}
                    yield {"data": "[DONE]"}
                finally:
                    with contextlib.suppress(ValueError):  # the generator may still be finishing a step
                        await run_in_threadpool(pieces.close)

        return EventSourceResponse(events(), sep="\n")

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
