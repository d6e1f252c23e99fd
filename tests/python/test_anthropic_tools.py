"""Tools, tool results, images, thinking and a system turn through the gateway's Anthropic Messages
route, with the official `anthropic` SDK unchanged, against the built-in `sim` model (whose tool
rules, docs/CONTRACT.md, make every answer exact), unary and streamed.
"""

from __future__ import annotations

import base64
import json
import uuid

import anthropic
import pytest

TIMEOUT_S = 10.0

BASH = {
    "name": "Bash",
    "description": "Runs a shell command",
    "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
}
INPUT = {"command": "echo hi"}


def client(mesh) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"http://{mesh['gateway']}", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def unique(label: str) -> str:
    return f"anthropic tools {label} {uuid.uuid4().hex[:12]}"


def ask(label: str) -> list[dict]:
    return [{"role": "user", "content": f"{unique(label)} Bash {json.dumps(INPUT)}"}]


def test_a_tool_use_block_comes_back(mesh):
    message = client(mesh).messages.create(model="sim", max_tokens=256, messages=ask("unary"), tools=[BASH])
    assert message.stop_reason == "tool_use", message
    (use,) = [block for block in message.content if block.type == "tool_use"]
    assert (use.name, use.input) == ("Bash", INPUT)


def test_the_same_tool_use_is_served_from_the_cache_identically(mesh):
    messages = ask("cached")
    create = lambda: client(mesh).messages.with_raw_response.create(  # noqa: E731
        model="sim", max_tokens=256, messages=messages, tools=[BASH]
    )
    first = create()
    assert first.headers["x-llmesh-cached"] == "false"
    for _ in range(60):  # the gateway stores in the background
        second = create()
        if second.headers["x-llmesh-cached"] == "true":
            break
    assert second.headers["x-llmesh-cached"] == "true"
    assert first.parse().content == second.parse().content


def test_a_tool_result_round_trip(mesh):
    sdk = client(mesh)
    messages = ask("result")
    first = sdk.messages.create(model="sim", max_tokens=256, messages=messages, tools=[BASH])
    use = next(block for block in first.content if block.type == "tool_use")
    messages.append({"role": "assistant", "content": [block.model_dump() for block in first.content]})
    messages.append(
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "hi from the shell"}]}
    )
    answer = sdk.messages.create(model="sim", max_tokens=256, messages=messages, tools=[BASH])
    assert answer.stop_reason == "end_turn"
    assert f"- {use.id}: hi from the shell" in answer.content[0].text


def test_messages_stream_assembles_the_tool_use(mesh):
    with client(mesh).messages.stream(model="sim", max_tokens=256, messages=ask("stream"), tools=[BASH]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (use,) = [block for block in final.content if block.type == "tool_use"]
    assert (use.name, use.input) == ("Bash", INPUT)


def test_a_forced_tool_and_a_system_turn(mesh):
    message = client(mesh).messages.create(
        model="sim",
        max_tokens=256,
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "system", "content": "A system turn inside the conversation, as coding agents send."},
            {"role": "user", "content": unique("forced")},
        ],
        tools=[BASH],
        tool_choice={"type": "tool", "name": "Bash"},
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    (use,) = [block for block in message.content if block.type == "tool_use"]
    assert use.name == "Bash" and isinstance(use.input.get("command"), str)


def test_an_image_block_counts_toward_the_prompt(mesh):
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()
    text = unique("image")
    sdk = client(mesh)
    plain = sdk.messages.create(model="sim", max_tokens=16, messages=[{"role": "user", "content": text}])
    with_image = sdk.messages.create(
        model="sim",
        max_tokens=16,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                    {"type": "text", "text": text},
                ],
            }
        ],
    )
    assert with_image.usage.input_tokens == plain.usage.input_tokens + 1024


def test_a_server_tool_is_a_400_naming_it(mesh):
    with pytest.raises(anthropic.BadRequestError) as error:
        client(mesh).messages.create(
            model="sim", max_tokens=8, messages=ask("bad"), tools=[{"type": "web_search_20250305", "name": "web_search"}]
        )
    assert error.value.body["error"]["message"].startswith("tools[0].type"), error.value.body
