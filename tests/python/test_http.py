"""The gateway's HTTP routes with the official SDKs as clients, unchanged: `openai` against
`/v1` and `anthropic` against `/v1/messages`, on the gateway's own port.

Most tests use the session's mesh (auth off, as `llmesh up` runs it). The ones about keys start a
second mesh of their own with two keys: one unlimited, one allowed a single request a minute.
Every prompt is unique to its test (see `unique`), so the shared cache couples nothing.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid

import anthropic
import openai
import pytest

import mesh_process
from conftest import BIN_DIR

# Every call is bounded: a hung gateway fails a test instead of the run.
TIMEOUT_S = 15.0
# The gateway stores answers in the background; an equal request is a hit within this long.
CACHE_WAIT_S = 3.0


def unique(label: str) -> str:
    return f"python http {label} {uuid.uuid4().hex[:12]}"


def openai_client(gateway: str, key: str = "unused") -> openai.OpenAI:
    # No retries: a 429 or 5xx is what a test looks at, not something to wait out.
    return openai.OpenAI(base_url=f"http://{gateway}/v1", api_key=key, timeout=TIMEOUT_S, max_retries=0)


def anthropic_client(gateway: str, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"http://{gateway}", api_key=key, timeout=TIMEOUT_S, max_retries=0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- OpenAI ---------------------------------------------------------------------------------------


def test_openai_unary_completion(mesh):
    client = openai_client(mesh["gateway"])
    raw = client.chat.completions.with_raw_response.create(
        model="sim", messages=user(unique("unary")), max_tokens=16, temperature=0, seed=7, user="tester"
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "sim"
    assert completion.created > 0
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # the sim says more than 16 tokens
    assert completion.usage.completion_tokens == 16
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 16
    # The mesh's own facts, in headers.
    assert raw.headers["x-llmesh-cached"] == "false"
    assert raw.headers["x-llmesh-provider"] == "sim"


def test_openai_streaming_with_usage(mesh):
    client = openai_client(mesh["gateway"])
    stream = client.chat.completions.create(
        model="sim", messages=user(unique("stream")), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens > 0 and last.usage.total_tokens >= last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_openai_models_list(mesh):
    models = [m.id for m in openai_client(mesh["gateway"]).models.list()]
    assert "sim" in models and "sim-slow" in models


def test_openai_bad_parameters_are_400s_naming_them(mesh):
    client = openai_client(mesh["gateway"])
    for params, param in [
        ({"temperature": 5}, "temperature"),
        ({"n": 2}, "n"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"max_tokens": 1_000_000}, "max_tokens"),
    ]:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="sim", messages=user("bad"), **params)
        assert error.value.status_code == 400
        assert error.value.body["param"] == param, error.value.body
        assert error.value.body["message"].startswith(param), error.value.body


def test_openai_unknown_model_is_not_found(mesh):
    with pytest.raises(openai.NotFoundError) as error:
        openai_client(mesh["gateway"]).chat.completions.create(model="no-such-model", messages=user("x"))
    assert error.value.body["code"] == "model_not_found"


def test_a_grpc_call_after_an_equal_http_call_is_a_cache_hit(mesh, pb, gateway):
    prompt = unique("cache")
    answer = openai_client(mesh["gateway"]).chat.completions.create(model="sim", messages=user(prompt), max_tokens=16)
    request = pb.gateway_pb2.GenerateRequest(
        model="sim", messages=[pb.common_pb2.ChatMessage(role="user", content=prompt)], max_tokens=16
    )
    deadline = time.monotonic() + CACHE_WAIT_S
    while True:
        response = gateway.Generate(request, timeout=TIMEOUT_S)
        if response.cached or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    assert response.cached, "the gRPC call missed the entry the HTTP call stored"
    assert response.text == answer.choices[0].message.content


# --- Anthropic ------------------------------------------------------------------------------------


def test_anthropic_unary_message(mesh):
    message = anthropic_client(mesh["gateway"]).messages.create(
        model="sim", max_tokens=16, system="be brief", messages=user(unique("anthropic")), metadata={"user_id": "u1"}
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 16 and message.usage.input_tokens > 0


def test_anthropic_streaming_message(mesh):
    client = anthropic_client(mesh["gateway"])
    with client.messages.stream(model="sim", max_tokens=64, messages=user(unique("anthropic stream"))) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0


def test_anthropic_errors(mesh):
    client = anthropic_client(mesh["gateway"])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=8, messages=user("x"))
    with pytest.raises(anthropic.BadRequestError) as error:
        client.messages.create(model="sim", max_tokens=0, messages=user("x"))
    assert error.value.body["error"]["type"] == "invalid_request_error"
    assert error.value.body["error"]["message"].startswith("max_tokens"), error.value.body


def test_fields_llmesh_does_not_act_on_are_carried_and_named(mesh):
    """A field a provider adds next month must not break clients: carried as the request's
    extensions (to an upstream of the same dialect; into the cache key) and named in a header."""
    raw = anthropic_client(mesh["gateway"]).messages.with_raw_response.create(
        model="sim",
        max_tokens=8,
        messages=user("carried"),
        extra_body={"top_k": 5, "output_config": {"effort": "high"}},
    )
    assert raw.headers["x-llmesh-unmapped-fields"] == "output_config, top_k"
    assert raw.parse().content[0].type == "text"
    raw = openai_client(mesh["gateway"]).chat.completions.with_raw_response.create(
        model="sim", messages=user("carried"), extra_body={"verbosity": "low"}
    )
    assert raw.headers["x-llmesh-unmapped-fields"] == "verbosity"


def test_parsed_fields_no_upstream_takes_are_named(mesh):
    """Fields llmesh parses but that neither the sim nor an OpenAI-compatible upstream takes
    (docs/CONTRACT.md, "Across dialects") are named in the same header, after the unmapped ones,
    so that a client can tell they were dropped."""
    raw = anthropic_client(mesh["gateway"]).messages.with_raw_response.create(
        model="sim",
        max_tokens=2048,
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        messages=user("named"),
        thinking={"type": "enabled", "budget_tokens": 1024},
        extra_body={"top_k": 5},
    )
    assert raw.headers["x-llmesh-unmapped-fields"] == "top_k, cache_control, thinking.budget_tokens"
    assert raw.parse().content[-1].type == "text"


# --- keys and limits ------------------------------------------------------------------------------


def make_key(key_id: str, **limits: int) -> tuple[str, str]:
    """A key in the gateway's format and its `[[keys]]` entry as an inline TOML table."""
    key = f"lk_{secrets.token_hex(4)}_{secrets.token_urlsafe(32).replace('-', 'a').replace('_', 'b')}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    extra = "".join(f",{name}={value}" for name, value in limits.items())
    return key, f'{{id="{key_id}",prefix="{key[:11]}",sha256="{digest}"{extra}}}'


@pytest.fixture(scope="module")
def keyed_mesh(tmp_path_factory):
    """A mesh of its own with two keys: yields (gateway address, the open key, the key allowed one request a minute)."""
    open_key, open_entry = make_key("sdk")
    one_key, one_entry = make_key("one-a-minute", requests_per_minute=1)
    env = {"LLMESH_GATEWAY_AUTH__KEYS": f"[{open_entry},{one_entry}]"}
    try:
        with mesh_process.running(BIN_DIR / "llmesh", tmp_path_factory.mktemp("keyed"), env=env) as addresses:
            yield addresses["gateway"], open_key, one_key
    except mesh_process.MeshError as error:
        pytest.fail(str(error))


def test_keys_as_bearer_tokens_and_x_api_key(keyed_mesh):
    gateway, key, _ = keyed_mesh
    # The OpenAI SDK sends the key as a bearer token; Anthropic's as x-api-key.
    answer = openai_client(gateway, key).chat.completions.create(model="sim", messages=user(unique("bearer")))
    assert answer.choices[0].message.content
    message = anthropic_client(gateway, key).messages.create(model="sim", max_tokens=8, messages=user(unique("k")))
    assert message.content[0].text
    with pytest.raises(openai.AuthenticationError) as error:
        openai_client(gateway, "lk_00000000_wrong").chat.completions.create(model="sim", messages=user("x"))
    assert error.value.status_code == 401
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client(gateway, "lk_00000000_wrong").messages.create(model="sim", max_tokens=8, messages=user("x"))


def test_rate_limited_keys_get_a_429_with_retry_after(keyed_mesh):
    gateway, _, limited = keyed_mesh
    client = openai_client(gateway, limited)
    client.chat.completions.create(model="sim", messages=user(unique("first")))
    with pytest.raises(openai.RateLimitError) as error:
        client.chat.completions.create(model="sim", messages=user(unique("second")))
    headers = error.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60, dict(headers)
    assert int(headers["retry-after-ms"]) > 0
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert error.value.body["type"] == "rate_limit_error"
    with pytest.raises(anthropic.RateLimitError):
        anthropic_client(gateway, limited).messages.create(model="sim", max_tokens=8, messages=user("x"))
