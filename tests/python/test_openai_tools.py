"""Tools, tool results, structured output and images through the gateway's OpenAI Chat Completions
route, with the official `openai` SDK unchanged, against the built-in `sim` model (whose tool rules,
docs/CONTRACT.md, make every answer exact), unary and streamed, and again from the cache.
"""

from __future__ import annotations

import base64
import json
import uuid

import openai
import pydantic
import pytest

TIMEOUT_S = 10.0

BASH = {
    "type": "function",
    "function": {
        "name": "Bash",
        "description": "Runs a shell command",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
    },
}
# Spaces and a float kept as written: the sim calls with the JSON object that follows the tool's
# name, byte for byte, and the route must carry it back the same way.
ARGUMENTS = '{"command": "echo hi",  "timeout": 1.50}'


def client(mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{mesh['gateway']}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def unique(label: str) -> str:
    return f"openai tools {label} {uuid.uuid4().hex[:12]}"


def test_a_tool_call_comes_back_with_its_arguments_byte_for_byte(mesh):
    prompt = f"{unique('unary')} Bash {ARGUMENTS}"
    completion = client(mesh).chat.completions.create(
        model="sim", messages=[{"role": "user", "content": prompt}], tools=[BASH], temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", completion
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == ("function", "Bash", ARGUMENTS)
    assert call.id.startswith("call_")
    assert choice.message.content is None


def test_the_same_tool_call_is_served_from_the_cache_identically(mesh):
    prompt = f"{unique('cached')} Bash {ARGUMENTS}"
    ask = lambda: client(mesh).chat.completions.with_raw_response.create(  # noqa: E731
        model="sim", messages=[{"role": "user", "content": prompt}], tools=[BASH], temperature=0
    )
    first = ask()
    assert first.headers["x-llmesh-cached"] == "false"
    for _ in range(60):  # the gateway stores in the background
        second = ask()
        if second.headers["x-llmesh-cached"] == "true":
            break
    assert second.headers["x-llmesh-cached"] == "true"
    one, two = first.parse().choices[0].message, second.parse().choices[0].message
    assert one.tool_calls == two.tool_calls


def test_a_tool_result_round_trip(mesh):
    prompt = f"{unique('result')} Bash {ARGUMENTS}"
    sdk = client(mesh)
    messages = [{"role": "user", "content": prompt}]
    call = sdk.chat.completions.create(model="sim", messages=messages, tools=[BASH]).choices[0].message.tool_calls[0]
    messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": "Bash", "arguments": call.function.arguments}}
            ],
        }
    )
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "hi from the shell"})
    answer = sdk.chat.completions.create(model="sim", messages=messages, tools=[BASH]).choices[0]
    assert answer.finish_reason == "stop"
    assert f"- {call.id}: hi from the shell" in answer.message.content


def test_streamed_tool_calls_assemble_into_the_same_call(mesh):
    prompt = f"{unique('stream')} Bash {ARGUMENTS} and Bash {{\"command\": \"ls\"}}"
    stream = client(mesh).chat.completions.create(
        model="sim", messages=[{"role": "user", "content": prompt}], tools=[BASH], stream=True
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function:
                    call["name"] = delta.function.name or call["name"]
                    call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        ("Bash", ARGUMENTS),
        ("Bash", '{"command": "ls"}'),
    ]
    assert all(c["id"] for c in calls.values())


def test_the_sdks_stream_helper_gets_the_final_tool_call(mesh):
    sdk = client(mesh)
    stream_helper = getattr(sdk.chat.completions, "stream", None) or sdk.beta.chat.completions.stream
    prompt = f"{unique('helper')} Bash {ARGUMENTS}"
    with stream_helper(model="sim", messages=[{"role": "user", "content": prompt}], tools=[BASH]) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("Bash", ARGUMENTS)


class Weather(pydantic.BaseModel):
    city: str
    days: int


def test_parse_with_a_pydantic_model(mesh):
    sdk = client(mesh)
    parse = getattr(sdk.chat.completions, "parse", None) or sdk.beta.chat.completions.parse
    completion = parse(
        model="sim", messages=[{"role": "user", "content": unique("weather in Paris")}], response_format=Weather
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Weather)
    assert parsed.days == 1


def test_an_inline_image_counts_toward_the_prompt(mesh):
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()
    text = unique("image")
    sdk = client(mesh)
    plain = sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": text}])
    with_image = sdk.chat.completions.create(
        model="sim",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}", "detail": "low"}},
                ],
            }
        ],
    )
    assert with_image.usage.prompt_tokens == plain.usage.prompt_tokens + 85


@pytest.mark.parametrize(
    "tools, param",
    [
        ([{"type": "web_search"}], "tools[0].type"),
        ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
    ],
)
def test_bad_tools_are_400s_naming_the_field(mesh, tools, param):
    with pytest.raises(openai.BadRequestError) as error:
        client(mesh).chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}], tools=tools)
    assert error.value.body["param"] == param, error.value.body
    json.dumps(error.value.body)  # a plain JSON error, in OpenAI's shape
