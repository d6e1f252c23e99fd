"""Tools, tool results, response formats and images over gRPC from Python, through the whole mesh
(gateway, cache, generation's `sim`), unary and streamed, and again from the cache.

The sim's tool rules (docs/CONTRACT.md) make every answer here exact: a tool's name followed by a
JSON object in the last user text is a call of that tool with that object, byte for byte; tool
results come back quoted; a JSON schema gets a document valid against it.
"""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
# The gateway stores answers in the background: `eventually` polls for the hit (test_mesh.py).
from test_mesh import CACHE_WAIT_S, eventually

CALL_TIMEOUT_S = 10.0

BASH_SCHEMA = json.dumps(
    {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}
)
WEATHER_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 2}},
        "required": ["city", "days"],
    }
)
# Spaces and a float kept as written: arguments are carried byte for byte.
ARGUMENTS = '{"command": "echo hi",  "timeout": 1.50}'


def unique(label: str) -> str:
    return f"python tools {label} {uuid.uuid4().hex[:12]}"


def tools(pb):
    return [
        pb.common_pb2.Tool(name="Bash", description="Runs a shell command", parameters=BASH_SCHEMA),
        pb.common_pb2.Tool(name="weather", parameters=WEATHER_SCHEMA, strict=True),
    ]


def user(pb, text: str):
    return pb.common_pb2.ChatMessage(role="user", content=text)


def generate(gateway, pb, **fields):
    fields.setdefault("model", "sim")
    return gateway.Generate(pb.gateway_pb2.GenerateRequest(**fields), timeout=CALL_TIMEOUT_S)


def stream(gateway, pb, **fields):
    fields.setdefault("model", "sim")
    return list(gateway.GenerateStream(pb.gateway_pb2.GenerateStreamRequest(**fields), timeout=CALL_TIMEOUT_S))


def assembled(chunks):
    """The tool calls of a stream, joined by index: [(id, name, arguments)]."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for delta in chunk.tool_calls:
            call = calls.setdefault(delta.index, ["", "", ""])
            call[0] = call[0] or delta.id
            call[1] = call[1] or delta.name
            call[2] += delta.arguments
    return [tuple(calls[i]) for i in sorted(calls)]


def calls_of(response):
    return [(c.id, c.name, c.arguments) for c in response.tool_calls]


def test_a_tool_call_unary_then_from_the_cache(gateway, pb):
    text = f"{unique('unary')} please run Bash {ARGUMENTS} now"
    request = dict(messages=[user(pb, text)], tools=tools(pb))
    first = generate(gateway, pb, **request)
    assert first.finish_reason == pb.common_pb2.FINISH_REASON_TOOL_CALLS
    assert not first.cached
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("Bash", ARGUMENTS)]
    assert first.tool_calls[0].id.startswith("call_")
    assert first.usage.completion_tokens > 0

    second = eventually(lambda: generate(gateway, pb, **request), lambda r: r.cached)
    assert second.cached, f"the identical request was not served from the cache within {CACHE_WAIT_S} s"
    assert calls_of(second) == calls_of(first)
    assert second.finish_reason == first.finish_reason
    assert second.usage == first.usage
    assert second.text == first.text


def test_parallel_calls_in_order_unless_parallel_is_off(gateway, pb):
    text = f'{unique("parallel")} weather {{"city":"Oslo","days":3}} and Bash {{"command":"ls"}}'
    answer = generate(gateway, pb, messages=[user(pb, text)], tools=tools(pb))
    assert [(c.name, c.arguments) for c in answer.tool_calls] == [
        ("weather", '{"city":"Oslo","days":3}'),
        ("Bash", '{"command":"ls"}'),
    ]
    assert len({c.id for c in answer.tool_calls}) == 2
    one = generate(gateway, pb, messages=[user(pb, text)], tools=tools(pb), parallel_tool_calls=False)
    assert [c.name for c in one.tool_calls] == ["weather"]


def test_a_streamed_tool_call_then_replayed_from_the_cache(gateway, pb):
    text = f"{unique('stream')} run Bash {ARGUMENTS}"
    request = dict(messages=[user(pb, text)], tools=tools(pb))
    first = stream(gateway, pb, **request)
    assert not any(c.cached for c in first)
    finals = [c for c in first if c.finish_reason != pb.common_pb2.FINISH_REASON_UNSPECIFIED]
    assert len(finals) == 1 and finals[0] is first[-1]
    assert first[-1].finish_reason == pb.common_pb2.FINISH_REASON_TOOL_CALLS
    # The sim streams the arguments in fragments: they join by index into the whole.
    assert sum(1 for c in first for d in c.tool_calls if d.arguments) > 1, "the arguments came in one piece"
    streamed = assembled(first)
    assert [(name, arguments) for _, name, arguments in streamed] == [("Bash", ARGUMENTS)]

    unary = generate(gateway, pb, cache=pb.common_pb2.CACHE_POLICY_BYPASS, **request)
    assert calls_of(unary) == streamed, "streamed and unary calls differ"

    replay = eventually(lambda: stream(gateway, pb, **request), lambda chunks: all(c.cached for c in chunks))
    assert all(c.cached for c in replay), f"the stream was not replayed from the cache within {CACHE_WAIT_S} s"
    assert assembled(replay) == streamed
    assert replay[-1].finish_reason == pb.common_pb2.FINISH_REASON_TOOL_CALLS
    assert replay[-1].usage == first[-1].usage


def test_tool_results_are_quoted_verbatim(gateway, pb):
    text = f"{unique('results')} run Bash {ARGUMENTS}"
    call = generate(gateway, pb, messages=[user(pb, text)], tools=tools(pb)).tool_calls[0]
    result = "a.txt  b.txt\n{\"exit\": 0}"
    conversation = [
        user(pb, text),
        pb.common_pb2.ChatMessage(role="assistant", tool_calls=[call]),
        pb.common_pb2.ChatMessage(
            role="tool",
            tool_call_id=call.id,
            parts=[pb.common_pb2.ContentPart(text=result)],
        ),
    ]
    answer = generate(gateway, pb, messages=conversation, tools=tools(pb))
    assert answer.finish_reason == pb.common_pb2.FINISH_REASON_STOP
    assert not answer.tool_calls
    assert answer.text == f"Tool results:\n- {call.id}: {result}"


def test_a_forced_call_makes_up_its_arguments(gateway, pb):
    choice = pb.common_pb2.ToolChoice(mode=pb.common_pb2.TOOL_CHOICE_MODE_TOOL, name="weather")
    text = f"Paris {unique('forced')}"
    answer = generate(gateway, pb, messages=[user(pb, text)], tools=tools(pb), tool_choice=choice)
    assert answer.finish_reason == pb.common_pb2.FINISH_REASON_TOOL_CALLS
    [call] = answer.tool_calls
    assert call.name == "weather"
    assert json.loads(call.arguments) == {"city": "Paris", "days": 2}


def test_a_json_schema_answer_is_valid(gateway, pb):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array"}},
        "required": ["name", "age"],
    }
    response_format = pb.common_pb2.ResponseFormat(
        type=pb.common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="person", schema=json.dumps(schema)
    )
    answer = generate(gateway, pb, prompt=unique("schema"), response_format=response_format)
    document = json.loads(answer.text)
    assert isinstance(document["name"], str) and document["age"] == 1 and document["tags"] == []


def test_an_image_counts_toward_prompt_tokens(gateway, pb):
    text = unique("image")
    words = len(text.split())
    png = pb.common_pb2.Image(data=b"\x89PNG\r\n\x1a\n" + bytes(64), media_type="image/png")
    low = pb.common_pb2.Image(
        data=b"\x89PNG\r\n\x1a\n" + bytes(64), media_type="image/png", detail=pb.common_pb2.IMAGE_DETAIL_LOW
    )
    for image, tokens in [(png, 1024), (low, 85)]:
        message = pb.common_pb2.ChatMessage(
            role="user", parts=[pb.common_pb2.ContentPart(text=text), pb.common_pb2.ContentPart(image=image)]
        )
        answer = generate(gateway, pb, messages=[message])
        assert answer.usage.prompt_tokens == words + tokens


@pytest.mark.parametrize(
    "field, fields",
    [
        ("tools[0].parameters", lambda pb: dict(tools=[pb.common_pb2.Tool(name="f", parameters="[1]")])),
        ("tools[0].name", lambda pb: dict(tools=[pb.common_pb2.Tool(name="no spaces")])),
        (
            "tool_choice.name",
            lambda pb: dict(
                tools=[pb.common_pb2.Tool(name="f")],
                tool_choice=pb.common_pb2.ToolChoice(mode=pb.common_pb2.TOOL_CHOICE_MODE_TOOL, name="g"),
            ),
        ),
        (
            "extensions.json",
            lambda pb: dict(extensions=pb.common_pb2.Extensions(dialect="openai", json="[]")),
        ),
    ],
)
def test_bad_tools_name_the_field(gateway, pb, field, fields):
    with pytest.raises(grpc.RpcError) as caught:
        generate(gateway, pb, prompt=unique("bad"), **fields(pb))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field), caught.value.details()
