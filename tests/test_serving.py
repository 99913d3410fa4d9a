"""helpers.serving: the OpenAI-compatible server, called over real HTTP on a loopback port, with raw requests and with
OpenAI's official `openai` client (notebook 13)."""
import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from helpers.serving import (APIError, ChatMessage, ServerProcess, ServerThread, StopScanner, check_loopback,
                             create_app, messages_to_turns)
from helpers.chat import ChatSession
from helpers.env import REPO_ROOT
from helpers.export import load_for_inference
from helpers.models import DEFAULT_MODEL

MODEL = DEFAULT_MODEL  # offline: the course's stand-in
LIMIT = 16  # the server's max_tokens limit in these tests


@pytest.fixture(scope="module")
def loaded():
    return load_for_inference(MODEL, verbose=False)


@pytest.fixture(scope="module")
def server(loaded):
    model, tokenizer = loaded
    server = ServerThread(create_app(model, tokenizer, model_id="tiny", max_tokens_limit=LIMIT))
    yield server
    assert server.stop(), "the server thread did not stop"


def _ask(content, **fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def _stream(url, body):
    """POST with stream: true; returns the parsed chunks and whether [DONE] ended the stream."""
    chunks, done = [], False
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue  # blank separators and keep-alive comments
            assert not done, "nothing may follow [DONE]"
            if line == "data: [DONE]":
                done = True
            else:
                chunks.append(json.loads(line.removeprefix("data: ")))
    return chunks, done


def test_models_lists_the_one_served_model(server):
    body = httpx.get(f"{server.url}/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]


@pytest.mark.parametrize("penalty", [None, 1.3])
def test_completion_matches_the_chat_session(server, loaded, penalty):
    model, tokenizer = loaded
    history = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "It is 7."},
               {"role": "user", "content": "And if you add 2 more?"}]
    extra = {} if penalty is None else {"repetition_penalty": penalty}
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": history, "temperature": 0, "max_tokens": 8, **extra})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    session = ChatSession(model, tokenizer, max_new_tokens=8, do_sample=False, repetition_penalty=penalty or 1.0)
    session.history = [{"human": "What is 3 plus 4?", "assistant": "It is 7."}]
    assert choice["message"]["content"] == session.reply("And if you add 2 more?")
    usage = body["usage"]
    assert usage["prompt_tokens"] == session.last.prompt_tokens
    assert usage["completion_tokens"] == session.last.completion_tokens <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streamed_chunks_add_up_to_the_same_answer(server):
    plain = httpx.post(f"{server.url}/v1/chat/completions", json=_ask("Hello", max_tokens=10), timeout=60).json()
    chunks, done = _stream(server.url, _ask("Hello", max_tokens=10, stream=True))
    assert done
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


BAD_REQUESTS = [
    ("invalid JSON", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "valid dictionary"),
    ("missing messages", json.dumps({"model": "tiny"}), 400, "messages: Field required"),
    ("empty messages", json.dumps({"model": "tiny", "messages": []}), 400, "at least 1 item"),
    ("unknown role", json.dumps(_ask("x") | {"messages": [{"role": "bot", "content": "x"}]}), 400,
     "messages.0.role: Input should be 'system', 'developer', 'user' or 'assistant'"),
    ("tool role", json.dumps(_ask("x") | {"messages": [{"role": "tool", "content": "x"}]}), 400,
     "Input should be 'system', 'developer', 'user' or 'assistant'"),
    ("image part", json.dumps(_ask([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "y"}}])),
     400, "messages[0].content[1] is a part of type 'image_url': this server reads text only"),
    ("part without text", json.dumps(_ask([{"type": "text"}])), 400, "messages[0].content[0] is a part of type 'text'"),
    ("developer not first", json.dumps(_ask("x") | {"messages": [{"role": "user", "content": "x"},
                                                                  {"role": "developer", "content": "y"}]}), 400,
     "a 'developer' message is only allowed first"),
    ("starts with assistant", json.dumps(_ask("x") | {"messages": [{"role": "assistant", "content": "x"}]}), 400,
     "messages[0] has role 'assistant' but 'user' was expected"),
    ("ends with assistant", json.dumps(_ask("x") | {"messages": [{"role": "user", "content": "x"},
                                                                  {"role": "assistant", "content": "y"}]}), 400,
     "the last message must have role 'user'"),
    ("system not first", json.dumps(_ask("x") | {"messages": [{"role": "user", "content": "x"},
                                                               {"role": "system", "content": "y"}]}), 400,
     "only allowed first"),
    ("max_tokens too large", json.dumps(_ask("x", max_tokens=LIMIT + 1)), 400,
     f"max_tokens is {LIMIT + 1}, more than this server allows ({LIMIT})"),
    ("max_tokens negative", json.dumps(_ask("x", max_tokens=-5)), 400, "max_tokens: Input should be greater than or equal to 1"),
    ("max_completion_tokens too large", json.dumps(_ask("x", max_completion_tokens=LIMIT + 1, max_tokens=1)), 400,
     f"max_completion_tokens is {LIMIT + 1}, more than this server allows ({LIMIT})"),
    ("five stop sequences", json.dumps(_ask("x", stop=list("abcde"))), 400, "a list of up to 4 non-empty strings"),
    ("empty stop sequence", json.dumps(_ask("x", stop="")), 400, "a list of up to 4 non-empty strings"),
    ("stream_options without stream", json.dumps(_ask("x", stream_options={"include_usage": True})), 400,
     "stream_options is only allowed with stream: true"),
    ("temperature too high", json.dumps(_ask("x", temperature=3)), 400, "temperature"),
    ("n > 1", json.dumps(_ask("x", n=2)), 400, "n: Input should be less than or equal to 1"),
    ("repetition_penalty 0", json.dumps(_ask("x", repetition_penalty=0)), 400, "repetition_penalty: Input should be greater than 0"),
    ("unknown model", json.dumps(_ask("x") | {"model": "gpt-4o"}), 404, "'gpt-4o' does not exist here"),
    ("prompt too long", json.dumps(_ask("hello " * 2100)), 400, "exceeds the model's context"),
]


@pytest.mark.parametrize("body,status,message", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, body, status, message):
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    after = httpx.post(f"{server.url}/v1/chat/completions", json=_ask("Hi", max_tokens=1), timeout=60)
    assert after.status_code == 200


def test_unknown_paths_and_methods_get_openai_style_errors(server):
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["message"] == "GET /v1/nothing: Not Found"
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 405


def test_a_client_that_hangs_up_mid_stream_does_not_block_the_server(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=_ask("Hello", max_tokens=LIMIT, stream=True),
                      timeout=60) as response:
        next(response.iter_lines())  # read the first event, then hang up
    after = httpx.post(f"{server.url}/v1/chat/completions", json=_ask("Hi", max_tokens=2), timeout=60)
    assert after.status_code == 200


def test_messages_to_turns():
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="a"),
                ChatMessage(role="assistant", content="b"), ChatMessage(role="user", content="c")]
    assert messages_to_turns(messages) == ([{"human": "Be brief.\na", "assistant": "b"}], "c")
    assert messages_to_turns(messages[3:]) == ([], "c")
    with pytest.raises(APIError, match="at least one 'user' message"):
        messages_to_turns(messages[:1])
    # developer is OpenAI's newer name for system; content may be a list of text parts, read in order
    parts = [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]
    newer = [ChatMessage(role="developer", content=parts),
             *messages[1:3], ChatMessage(role="user", content=[{"type": "text", "text": "c"}])]
    assert messages_to_turns(newer) == messages_to_turns(messages)


def _scan(pieces, stops):
    scanner = StopScanner(stops)
    sent = [scanner.feed(piece) for piece in pieces]
    return "".join(sent) + ("" if scanner.stopped else scanner.flush()), scanner.stopped, sent


def test_stop_scanner_cuts_at_the_first_stop_even_across_pieces():
    assert _scan(["Hel", "lo wo", "rld"], ["lo w"])[:2] == ("Hel", True)
    assert _scan(["a b", " c. d", "e"], ["c.", "b c"])[:2] == ("a ", True)   # the earliest stop wins
    assert _scan(["one ", "two"], ["three", "x"])[:2] == ("one two", False)  # no stop: everything, in order
    # only an ending that could grow into a stop is held back, and only until it cannot
    assert _scan(["ab", "cd", "x"], ["cde"])[2] == ["ab", "", "cdx"]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_hosts_are_allowed(host):
    assert check_loopback(host) == host


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", "::"])
def test_other_hosts_are_refused(host):
    with pytest.raises(ValueError, match="not a loopback address"):
        check_loopback(host)


def test_server_module_runs_as_a_process_and_stops(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    refused = subprocess.run([sys.executable, "-m", "helpers.serving", "--host", "0.0.0.0"], capture_output=True,
                             text=True, cwd=REPO_ROOT, env=env, timeout=60)
    assert refused.returncode == 2 and "not a loopback address" in refused.stderr
    with pytest.raises(RuntimeError, match="--port must be in 1..65535"):  # a failed start shows the log
        ServerProcess("--model", MODEL, port=70000, log_path=tmp_path / "bad.log")
    server = ServerProcess("--model", MODEL, "--model-id", "tiny", log_path=tmp_path / "server.log")
    try:
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=_ask("Hi", max_tokens=3), timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 3
    finally:
        assert server.stop() is not None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/v1/models", timeout=2)
    assert "serving tiny on" in server.log()


def _complete(url, body):
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_max_completion_tokens_is_preferred_to_max_tokens(server):
    both = _complete(server.url, _ask("Hello", max_completion_tokens=2, max_tokens=LIMIT))
    older = _complete(server.url, _ask("Hello", max_tokens=2))  # the deprecated name alone still works
    assert both["usage"]["completion_tokens"] <= 2
    assert both["choices"] == older["choices"] and both["usage"] == older["usage"]


def test_developer_role_and_text_parts_give_the_same_answer_as_system_and_a_string(server):
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 加 4 等于多少？"}]
    newer = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "3 加 4 "},
                                          {"type": "text", "text": "等于多少？"}]}]
    answers = [_complete(server.url, {"model": "tiny", "messages": m, "temperature": 0, "max_completion_tokens": 8})
               for m in (plain, newer)]
    assert answers[0]["choices"] == answers[1]["choices"] and answers[0]["usage"] == answers[1]["usage"]


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_cuts_the_answer_before_the_stop_text_streamed_or_not(server, as_list):
    plain = _complete(server.url, _ask("Hello", max_completion_tokens=LIMIT))["choices"][0]["message"]["content"]
    stop = plain[len(plain) // 2:len(plain) // 2 + 2]  # greedy: the same answer again, so this text appears in it
    expected = plain[:plain.index(stop)].strip()
    request = _ask("Hello", max_completion_tokens=LIMIT, stop=[stop, "never in it \u2603"] if as_list else stop)
    cut = _complete(server.url, request)
    assert cut["choices"][0]["message"]["content"] == expected and cut["choices"][0]["finish_reason"] == "stop"
    chunks, done = _stream(server.url, request | {"stream": True})
    assert done and "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip() == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    unmatched = _complete(server.url, _ask("Hello", max_completion_tokens=LIMIT, stop="never in it \u2603"))
    assert unmatched["choices"][0]["message"]["content"] == plain


def test_include_usage_adds_a_final_usage_chunk(server):
    request = _ask("Hello", max_completion_tokens=6)
    plain = _complete(server.url, request)
    chunks, done = _stream(server.url, request | {"stream": True, "stream_options": {"include_usage": True}})
    assert done and chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])  # OpenAI: null until the last chunk
    without, _ = _stream(server.url, request | {"stream": True, "stream_options": {"include_usage": False}})
    assert all("usage" not in c for c in without) and without[-1]["choices"][0]["finish_reason"] is not None


def test_prompt_tokens_are_what_the_chat_template_renders(server, loaded):
    """Notebook 13: the prompt the server counts is the course's template rendered on the messages, a developer
    message included (in front of the first question)."""
    from helpers.standin import CHAT_TEMPLATE

    _, tok = loaded
    messages = [{"role": "developer", "content": "只回答结果。"}, {"role": "user", "content": "3 加 4 等于多少？"}]
    answer = _complete(server.url, {"model": "tiny", "messages": messages, "temperature": 0, "max_completion_tokens": 4})
    rendered = tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
    assert answer["usage"]["prompt_tokens"] == len(rendered)


# --- OpenAI's official client (openai.OpenAI), as notebook 13 calls the server ---------------------------------------

@pytest.fixture(scope="module")
def client(server):
    """The official client pointed at the server, sending through an httpx client of ours; no retries, so that a
    refused request fails at once."""
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", http_client=httpx.Client(timeout=60),
                       max_retries=0) as client:
        yield client


def _user(content):
    return [{"role": "user", "content": content}]


def test_official_client_lists_the_model_and_sends_max_completion_tokens(server, client):
    assert [model.id for model in client.models.list()] == ["tiny"]
    answer = client.chat.completions.create(model="tiny", messages=_user("Hello"), temperature=0,
                                            max_completion_tokens=3)
    raw = _complete(server.url, _ask("Hello", max_completion_tokens=3))
    assert answer.object == "chat.completion" and answer.model == "tiny"
    assert answer.choices[0].message.content == raw["choices"][0]["message"]["content"]
    assert answer.choices[0].finish_reason == raw["choices"][0]["finish_reason"]
    assert answer.usage.model_dump(exclude_none=True) == raw["usage"] and answer.usage.completion_tokens <= 3


def test_official_client_sends_a_developer_message_and_text_parts(server, client):
    plain = _complete(server.url, {"model": "tiny", "temperature": 0, "max_completion_tokens": 8,
                                   "messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "3 加 4 等于多少？"}]})
    newer = client.chat.completions.create(
        model="tiny", temperature=0, max_completion_tokens=8,
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "3 加 4 "}, {"type": "text", "text": "等于多少？"}]}])
    assert newer.choices[0].message.content == plain["choices"][0]["message"]["content"]
    assert newer.usage.prompt_tokens == plain["usage"]["prompt_tokens"]


@pytest.mark.parametrize("as_list", [False, True])
def test_official_client_sends_stop_streamed_or_not(server, client, as_list):
    plain = _complete(server.url, _ask("Hello", max_completion_tokens=LIMIT))["choices"][0]["message"]["content"]
    stop = plain[len(plain) // 2:len(plain) // 2 + 2]  # greedy: the same answer again, so this text appears in it
    expected = plain[:plain.index(stop)].strip()
    request = {"model": "tiny", "messages": _user("Hello"), "temperature": 0, "max_completion_tokens": LIMIT,
               "stop": [stop, "never in it \u2603"] if as_list else stop}
    cut = client.chat.completions.create(**request)
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_official_client_streams_with_include_usage(server, client):
    plain = _complete(server.url, _ask("Hello", max_completion_tokens=6))
    stream = client.chat.completions.create(model="tiny", messages=_user("Hello"), temperature=0,
                                            max_completion_tokens=6, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain["choices"][0]["message"]["content"]
    assert chunks[-2].choices[0].finish_reason == plain["choices"][0]["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(exclude_none=True) == plain["usage"]
    assert all(c.usage is None for c in chunks[:-1])  # OpenAI: null until the last chunk


@pytest.mark.parametrize("request_fields,error,message", [
    ({"model": "gpt-4o"}, openai.NotFoundError, "'gpt-4o' does not exist here"),
    ({"max_completion_tokens": LIMIT + 1}, openai.BadRequestError,
     f"max_completion_tokens is {LIMIT + 1}, more than this server allows ({LIMIT})"),
    ({"stop": list("abcde")}, openai.BadRequestError, "a list of up to 4 non-empty strings"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.png"}}]}]},
     openai.BadRequestError, "messages[0].content[0] is a part of type 'image_url'"),
], ids=["unknown model", "max_completion_tokens too large", "five stop sequences", "an image part"])
def test_official_client_raises_the_servers_4xx_as_its_exceptions(client, request_fields, error, message):
    with pytest.raises(error) as raised:
        client.chat.completions.create(**{"model": "tiny", "messages": _user("Hello"), **request_fields})
    assert message in raised.value.body["message"] and raised.value.status_code in (400, 404)
    assert client.chat.completions.create(model="tiny", messages=_user("Hi"), max_completion_tokens=1).choices
