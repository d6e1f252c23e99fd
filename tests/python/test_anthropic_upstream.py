"""A native Anthropic upstream, end to end with the official SDKs.

A second mesh serves the model `claude` with generation's `anthropic` provider, pointed at the
first mesh's gateway: its `/v1/messages` route speaks Anthropic's Messages API (held to the
official SDK by test_anthropic_tools.py) in front of the `sim` model, whose tool rules
(docs/CONTRACT.md) make every answer exact. A call goes

    SDK → second gateway → generation's anthropic provider → HTTP, Anthropic's wire format →
    first gateway → sim

and back, so that both directions of the provider's translation meet a real implementation of the
format: tool use and tool results, streamed tool input, structured output, and the fields only an
Anthropic upstream takes.
"""

from __future__ import annotations

import json
import uuid

import anthropic
import openai
import pytest

import mesh_process
from conftest import BIN_DIR

TIMEOUT_S = 20.0

BASH = {
    "name": "Bash",
    "description": "Runs a shell command",
    "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
}
INPUT = {"command": "echo hi"}


@pytest.fixture(scope="module")
def relay(mesh, tmp_path_factory):
    """The second mesh's addresses: its model `claude` is the first mesh's `sim`, over Anthropic's API."""
    env = {
        "LLMESH_GENERATION_MODELS__CLAUDE__PROVIDER": "anthropic",
        "LLMESH_GENERATION_MODELS__CLAUDE__BASE_URL": f"http://{mesh['gateway']}",
        "LLMESH_GENERATION_MODELS__CLAUDE__UPSTREAM_MODEL": "sim",
        "LLMESH_GENERATION_MODELS__CLAUDE__API_KEY_ENV": "LLMESH_TEST_ANTHROPIC_KEY",
        "LLMESH_TEST_ANTHROPIC_KEY": "sk-ant-test-key",
    }
    try:
        with mesh_process.running(BIN_DIR / "llmesh", tmp_path_factory.mktemp("relay"), env=env) as addresses:
            yield addresses
    except mesh_process.MeshError as error:
        pytest.fail(str(error))


def claude(relay) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"http://{relay['gateway']}", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def ask(label: str) -> list[dict]:
    return [{"role": "user", "content": f"anthropic upstream {label} {uuid.uuid4().hex[:12]} Bash {json.dumps(INPUT)}"}]


def test_a_tool_use_comes_back_from_the_anthropic_upstream(relay):
    raw = claude(relay).messages.with_raw_response.create(
        model="claude", max_tokens=256, messages=ask("unary"), tools=[BASH]
    )
    assert raw.headers["x-llmesh-provider"] == "anthropic"
    message = raw.parse()
    assert message.stop_reason == "tool_use", message
    (use,) = [block for block in message.content if block.type == "tool_use"]
    assert (use.name, use.input) == ("Bash", INPUT)
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_streamed_tool_input_arrives_whole(relay):
    with claude(relay).messages.stream(model="claude", max_tokens=256, messages=ask("stream"), tools=[BASH]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (use,) = [block for block in final.content if block.type == "tool_use"]
    assert (use.name, use.input) == ("Bash", INPUT)


def test_a_tool_result_goes_upstream_as_a_tool_result_block(relay):
    sdk = claude(relay)
    messages = ask("result")
    first = sdk.messages.create(model="claude", max_tokens=256, messages=messages, tools=[BASH])
    use = next(block for block in first.content if block.type == "tool_use")
    messages.append({"role": "assistant", "content": [block.model_dump() for block in first.content]})
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "hi from the shell"},
            ],
        }
    )
    answer = sdk.messages.create(model="claude", max_tokens=256, messages=messages, tools=[BASH])
    assert answer.stop_reason == "end_turn"
    # The sim's rule for tool results: one line per result, by the id the upstream saw.
    assert f"- {use.id}: hi from the shell" in answer.content[0].text


def test_fields_only_an_anthropic_upstream_takes_are_not_named_dropped(relay):
    """`cache_control` reaches an Anthropic upstream; the sim (another dialect) drops it, and says so."""
    content = [{"type": "text", "text": f"cache me {uuid.uuid4().hex[:12]}", "cache_control": {"type": "ephemeral"}}]
    sdk = claude(relay)
    native = sdk.messages.with_raw_response.create(
        model="claude", max_tokens=64, messages=[{"role": "user", "content": content}]
    )
    assert "x-llmesh-unmapped-fields" not in native.headers, native.headers
    other = sdk.messages.with_raw_response.create(model="sim", max_tokens=64, messages=[{"role": "user", "content": content}])
    assert other.headers["x-llmesh-unmapped-fields"] == "cache_control"


def test_an_openai_client_gets_structured_output_from_the_anthropic_upstream(relay):
    sdk = openai.OpenAI(base_url=f"http://{relay['gateway']}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    completion = sdk.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": f"Extract {uuid.uuid4().hex[:12]}: Alice is 30."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )
    person = json.loads(completion.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int), person

    # JSON mode without a schema has no Anthropic form: refused, naming the field, before any call.
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(
            model="claude",
            messages=[{"role": "user", "content": "json please"}],
            response_format={"type": "json_object"},
        )
    assert "response_format" in str(refused.value), refused.value
