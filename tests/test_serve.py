"""The OpenAI-compatible server end to end: the official `openai` client (and plain httpx for
malformed requests) against a uvicorn server on a loopback port, serving the `tiny` preset's
model in fp32 (the command without --checkpoint serves the trained built-in model), where
every greedy answer must equal `gptoss_jax.generate` for the same prompt token for token (in
bf16 a row's logits can depend on the batch it ran in: see docs/serving.md). The tiny model's
random weights do not write harmony, so the answers are plain text (read as content); tool
calls are checked here by the prompts the server renders and the tokens it forces, and by
real harmony sequences in test_serve_openai.py."""

import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gptoss_jax import chat_format
from gptoss_jax.chat_format import Conversation, FunctionTool, render_for_completion
from gptoss_jax.engine import generate
from gptoss_jax.loader import load
from gptoss_jax.openai_api import final_prefix, tool_call_prefix
from gptoss_jax.serve import create_app
from gptoss_jax.tokenizer import get_tokenizer

KEY = "test-key"
DATE = "2026-01-01"
CONTEXT = 256
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Gets the weather.",
                                           "parameters": WEATHER}}]


class Server:
    def __init__(self, app):
        self.app = app
        sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def metrics(self) -> dict:
        text = httpx.get(f"{self.url}/metrics").text
        return {sample.name + json.dumps(sample.labels, sort_keys=True) if sample.labels else sample.name: sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture(scope="module")
def model():
    return load("tiny", dtype="float32")


@pytest.fixture(scope="module")
def server(model):
    server = Server(create_app(model, slots=8, max_context=CONTEXT, chunk=4, api_key=KEY, current_date=DATE,
                               max_body_bytes=1 << 16))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def expected(model):
    @functools.cache
    def greedy(prompt: tuple, max_tokens: int) -> list[int]:
        return generate(model, [list(prompt)], max_new_tokens=max_tokens, temperature=0)[0]

    return lambda prompt, max_tokens: greedy(tuple(prompt), max_tokens)


def conversation(*messages, **settings):
    return Conversation(list(messages), current_date=DATE, **settings)


def ids(response):
    return response.model_extra["prompt_token_ids"], response.choices[0].model_extra["token_ids"]


def chat(client, messages, max_tokens=12, **fields):
    extra = {"return_token_ids": True} | fields.pop("extra_body", {})
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body=extra, **fields)


QUESTION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}]
QUESTION_PROMPT = render_for_completion(conversation(chat_format.user("Why is the sky blue?"),
                                                     developer_instructions="Answer briefly."))


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_chat_completion_equals_generate(client, expected):
    response = chat(client, QUESTION)
    prompt, tokens = ids(response)
    assert prompt == QUESTION_PROMPT and tokens == expected(prompt, 12)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt), len(tokens))
    # Random weights write no harmony header: the answer is the plain text, read as content.
    assert response.choices[0].message.content == get_tokenizer().decode(tokens)
    assert response.choices[0].finish_reason == "length" and response.model == "tiny"


def test_streamed_chat_completion(client, expected):
    whole = chat(client, QUESTION)
    stream = chat(client, QUESTION, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert deltas[0].delta.role == "assistant"
    assert "".join(d.delta.content or "" for d in deltas) == whole.choices[0].message.content
    assert sum((d.model_extra.get("token_ids") or [] for d in deltas), []) == ids(whole)[1]
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len(QUESTION_PROMPT)


def test_responses_api(client, expected):
    answer = chat(client, QUESTION).choices[0].message.content
    response = client.responses.create(model="tiny", instructions="Answer briefly.", input="Why is the sky blue?",
                                       max_output_tokens=12, temperature=0)
    assert response.output_text == answer
    assert (response.status, response.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (len(QUESTION_PROMPT), 12)
    with client.responses.stream(model="tiny", instructions="Answer briefly.", input="Why is the sky blue?",
                                 max_output_tokens=12, temperature=0) as stream:
        events = list(stream)
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == answer
    assert events[-1].response.output_text == answer


@pytest.mark.parametrize("effort", ["low", "high"])
def test_reasoning_effort(client, expected, effort):
    response = chat(client, QUESTION[1:], reasoning_effort=effort)
    prompt, tokens = ids(response)
    assert prompt == render_for_completion(conversation(chat_format.user("Why is the sky blue?"),
                                                        reasoning_effort=effort))
    assert tokens == expected(prompt, 12)
    via_responses = client.responses.create(model="tiny", input="Why is the sky blue?", reasoning={"effort": effort},
                                            max_output_tokens=12, temperature=0)
    assert via_responses.output_text == response.choices[0].message.content


def test_stop_sequences(client, server, expected):
    """The answer continues a final-channel message, so its text is content from the first
    token on; a stop string ends it there, and the server stops generating."""
    messages = QUESTION[1:] + [{"role": "assistant", "content": "Because"}]
    free = chat(client, messages, max_tokens=40, extra_body={"continue_final_message": True})
    prompt, tokens = ids(free)
    assert prompt == render_for_completion(conversation(
        chat_format.user("Why is the sky blue?"))) + final_prefix("Because")
    assert tokens == expected(prompt, 40)
    text = free.choices[0].message.content
    assert text == get_tokenizer().decode(tokens)
    stop = text[len(text) // 3:len(text) // 3 + 3]
    before = text[:text.index(stop)]
    stopped = chat(client, messages, max_tokens=40, stop=[stop, "never appears"],
                   extra_body={"continue_final_message": True})
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == (before, "stop")
    assert stopped.usage.completion_tokens < 40 and ids(stopped)[1] == tokens[:stopped.usage.completion_tokens]
    streamed = chat(client, messages, max_tokens=40, stop=stop, stream=True, extra_body={"continue_final_message": True})
    deltas = [c.choices[0] for c in streamed]
    assert "".join(d.delta.content or "" for d in deltas) == before and deltas[-1].finish_reason == "stop"


def test_tool_call_round_trip(client, expected):
    """Turn 1 forces a call of get_weather: the prompt ends with the call's header and the
    model writes the arguments (random weights: not JSON, so no call comes back). Turn 2
    sends the call as a client holds it, with the tool's result: the prompt is the harmony
    history of both, and the answer is generated from it."""
    question = [{"role": "user", "content": "Weather in Paris?"}]
    forced = chat(client, question, max_tokens=8, tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    prompt, tokens = ids(forced)
    tools = [FunctionTool("get_weather", "Gets the weather.", WEATHER)]
    user = chat_format.user("Weather in Paris?")
    assert prompt == render_for_completion(conversation(user, tools=tools)) + tool_call_prefix("get_weather")
    assert tokens == expected(prompt, 8)
    choice = forced.choices[0]
    if choice.finish_reason == "tool_calls":  # a model that writes harmony
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    else:  # random weights: arguments cut off at max_tokens (or not JSON): no call comes back
        assert choice.finish_reason in ("length", "incomplete") and choice.message.tool_calls is None

    history = question + [
        {"role": "assistant", "content": None, "reasoning_content": "Look it up.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    answer = chat(client, history, tools=TOOLS)
    prompt, tokens = ids(answer)
    assert prompt == render_for_completion(conversation(
        user, chat_format.assistant("Look it up.", "analysis"), chat_format.tool_call("functions.get_weather", {"city": "Paris"}),
        chat_format.tool_result("functions.get_weather", '{"temperature": 21}'), tools=tools))
    assert tokens == expected(prompt, 12)

    via_responses = client.responses.create(
        model="tiny", max_output_tokens=12, temperature=0,
        tools=[{"type": "function", "name": "get_weather", "description": "Gets the weather.", "parameters": WEATHER}],
        input=question + [{"type": "reasoning", "id": "rs_1", "summary": [],
                           "content": [{"type": "reasoning_text", "text": "Look it up."}]},
                          {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                           "arguments": '{"city": "Paris"}'},
                          {"type": "function_call_output", "call_id": "call_1", "output": '{"temperature": 21}'}])
    assert via_responses.usage.input_tokens == len(prompt)
    assert via_responses.output_text == answer.choices[0].message.content


def occupancy_above_one(metrics) -> float:
    return metrics["gptoss_batch_occupancy_count"] - metrics['gptoss_batch_occupancy_bucket{"le": "1.0"}']


def test_concurrent_streams_each_equal_their_solo_output(server, expected):
    """32 streamed requests of mixed prompt and answer lengths at once on 8 slots."""
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    requests = [([{"role": "user", "content": " ".join(words[:1 + i % 12]) + f" ({i})"}], 4 + (i * 5) % 17)
                for i in range(32)]
    before = occupancy_above_one(server.metrics())

    async def stream(client, messages, max_tokens):
        chunks = await client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
        prompt, tokens, text, finish = None, [], "", None
        async for chunk in chunks:
            if chunk.choices:
                choice = chunk.choices[0]
                prompt = prompt or chunk.model_extra.get("prompt_token_ids")
                tokens += choice.model_extra.get("token_ids") or []
                text += choice.delta.content or ""
                finish = finish or choice.finish_reason
        return prompt, tokens, text, finish, chunk.usage.completion_tokens

    async def all_streams():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=600) as client:
            return await asyncio.gather(*(stream(client, m, n) for m, n in requests))

    results = asyncio.run(all_streams())
    for (messages, max_tokens), (prompt, tokens, text, finish, usage) in zip(requests, results):
        assert prompt == render_for_completion(conversation(chat_format.user(messages[0]["content"])))
        assert tokens == expected(prompt, max_tokens) and usage == len(tokens)
        assert text == get_tokenizer().decode(tokens) and finish == "length"
    assert occupancy_above_one(server.metrics()) > before


def wait_for(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_client_that_hangs_up_frees_its_slot(server, client, expected):
    metrics = server.metrics()
    cancelled = metrics.get('gptoss_requests_total{"endpoint": "chat", "finish_reason": "cancelled"}', 0)
    generated = metrics["gptoss_generation_tokens_total"]
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 150, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=300) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk
        assert any(json.loads(line[6:])["choices"][0]["delta"].get("content") for line in lines if line)
    # Hung up after the first text: the request is cancelled and its slot freed well before 150 tokens.
    key = 'gptoss_requests_total{"endpoint": "chat", "finish_reason": "cancelled"}'
    wait_for(lambda: server.metrics().get(key, 0) == cancelled + 1, "the stream's cancellation")
    wait_for(lambda: server.metrics()["gptoss_batch_occupied_slots"] == 0, "the slot to be freed")
    assert server.metrics()["gptoss_generation_tokens_total"] - generated < 150

    async def hang_up_while_waiting():  # a non-streamed request: cancelled while it decodes
        async with httpx.AsyncClient(timeout=300) as http:
            request = asyncio.ensure_future(http.post(f"{server.url}/v1/chat/completions", headers=headers,
                                                      json=dict(body, stream=False)))
            while server.metrics()["gptoss_batch_occupied_slots"] == 0:
                assert not request.done()
                await asyncio.sleep(0.05)
            request.cancel()

    asyncio.run(hang_up_while_waiting())
    wait_for(lambda: server.metrics().get(key, 0) == cancelled + 2, "the request's cancellation")
    wait_for(lambda: server.metrics()["gptoss_batch_occupied_slots"] == 0, "the slot to be freed")
    assert ids(chat(client, QUESTION))[1] == expected(QUESTION_PROMPT, 12)


CHAT = "/v1/chat/completions"
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BAD_REQUESTS = {
    "invalid JSON": (CHAT, b'{"model": "tiny", "messages": [', {}, 400, None),
    "not an object": (CHAT, b"[1, 2]", {}, 400, None),
    "wrong type": (CHAT, dict(GOOD, max_tokens="ten"), {}, 400, "max_tokens"),
    "wrong type in a union": (CHAT, dict(GOOD, messages=[{"role": "user", "content": 5}]), {}, 400,
                              "messages[0].content"),
    "unknown field": (CHAT, dict(GOOD, temprature=0), {}, 400, "temprature"),
    "unknown nested field": (CHAT, dict(GOOD, messages=[{"role": "user", "content": "Hi", "mood": "x"}]), {}, 400,
                             "messages[0].mood"),
    "missing field": (CHAT, {"model": "tiny"}, {}, 400, "messages"),
    "unknown model": (CHAT, dict(GOOD, model="gpt-5"), {}, 404, "model"),
    "unsupported setting": (CHAT, dict(GOOD, n=3), {}, 400, "n"),
    "image content": (CHAT, dict(GOOD, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]), {}, 400, "messages[0].content[0]"),
    "answer to no tool call": (CHAT, dict(GOOD, messages=[{"role": "tool", "tool_call_id": "x", "content": "1"}]), {}, 400,
                               "messages[0]"),
    "too many stop strings": (CHAT, dict(GOOD, stop=list("abcde")), {}, 400, "stop"),
    "max_tokens past the context": (CHAT, dict(GOOD, max_tokens=CONTEXT), {}, 400, "max_tokens"),
    "prompt past the context": (CHAT, dict(GOOD, messages=[{"role": "user", "content": "word " * 300}]), {}, 400,
                                "messages"),
    "oversized body": (CHAT, dict(GOOD, messages=[{"role": "user", "content": "x" * 70000}]), {}, 413, None),
    "no API key": (CHAT, GOOD, {"Authorization": None}, 401, None),
    "wrong API key": (CHAT, GOOD, {"Authorization": "Bearer nope"}, 401, None),
    "unknown endpoint": ("/v1/completions", GOOD, {}, 404, None),
    "stored responses": ("/v1/responses", {"model": "tiny", "input": "Hi", "previous_response_id": "resp_1"}, {}, 400,
                         "previous_response_id"),
    "unknown input item": ("/v1/responses", {"model": "tiny", "input": [{"type": "file", "id": "x"}]}, {}, 400, "input[0]"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_get_an_openai_error(server, name):
    path, body, headers, status, param = BAD_REQUESTS[name]
    headers = {k: v for k, v in ({"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"} | headers).items()
               if v is not None}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_an_oversized_body_without_length_is_refused_as_it_arrives(server):
    def body():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 1000
        yield b'"}]}'

    reply = httpx.post(f"{server.url}{CHAT}", content=body(), headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 413 and "larger than 65536 bytes" in reply.json()["error"]["message"]


def test_bad_requests_through_the_official_client(server, client, expected):
    with pytest.raises(openai.NotFoundError, match="gpt-5"):
        client.chat.completions.create(model="gpt-5", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10 * CONTEXT)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    reply = httpx.get(f"{server.url}/v1/chat/completions")
    assert reply.status_code == 405 and reply.json()["error"]["message"]
    assert ids(chat(client, QUESTION))[1] == expected(QUESTION_PROMPT, 12)  # still serving


def test_a_full_queue_answers_429(server, client):
    scheduler = server.app.state.scheduler
    scheduler.max_queue = 0
    try:
        with pytest.raises(openai.RateLimitError) as error:
            client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)
    finally:
        scheduler.max_queue = 256
    assert error.value.response.headers["retry-after"] == "1"
    assert error.value.body["code"] == "queue_full"
    assert server.metrics()['gptoss_rejected_requests_total{"status": "429"}'] >= 1


@pytest.mark.parametrize("args, message", [
    (["--slots", "0"], "--slots must be >= 1"),
    (["--current-date", "tomorrow"], "--current-date"),
    (["--max-context", "1"], "--max-context must be >= 2"),
    (["--num-processes", "2"], "one process"),
])
def test_cli_bad_arguments(capsys, args, message):
    from gptoss_jax.serve import main

    assert main([*args, "--port", "0", "--no-compilation-cache"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_cli_port_in_use(capsys):
    from gptoss_jax.serve import main

    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert main(["--port", str(taken.getsockname()[1]), "--no-compilation-cache"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:"), lines  # before loading


def test_app_settings_are_checked(model):
    with pytest.raises(ValueError, match="max_context"):
        create_app(model, max_context=10**7)
    with pytest.raises(ValueError, match="slots"):
        create_app(model, slots=0)


def test_cli_serves_the_built_in_model():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.Popen([sys.executable, "-m", "gptoss_jax.serve", "--port", "0", "--slots", "2",
                                "--max-context", "256", "--log-level", "warning"], stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        lines = []
        while not lines or "serving" not in lines[-1]:
            line = process.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert "using the built-in model: trained on a small synthetic task" in "".join(lines)
        url = lines[-1].split(" on ")[1].strip()
        assert url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["builtin"]
        reply = client.chat.completions.create(model="builtin", messages=[{"role": "user", "content": "What is 23 + 19?"}],
                                               max_tokens=64, temperature=0)
        assert reply.choices[0].message.content == "23 + 19 = 42"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
