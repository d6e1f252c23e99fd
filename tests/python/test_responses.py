"""OpenAI's Responses API on the gateway (`POST /v1/responses`), with the official `openai` SDK
unchanged (`responses.create`, `.stream`, `.parse`) and the Agents SDK's Responses model,
against the built-in `sim` model, whose rules (docs/CONTRACT.md) make every answer exact.
"""

from __future__ import annotations

import json
import uuid

import openai
import pydantic
import pytest

TIMEOUT_S = 10.0

BASH = {
    "type": "function",
    "name": "Bash",
    "description": "Runs a shell command",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
}
INPUT = {"command": "echo hi"}


def client(mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{mesh['gateway']}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def unique(label: str) -> str:
    return f"responses {label} {uuid.uuid4().hex[:12]}"


def test_a_text_response(mesh):
    response = client(mesh).responses.create(model="sim", input=unique("text"), instructions="Be brief.")
    assert response.status == "completed"
    assert response.output_text, response
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0


def test_a_function_call_and_its_output_round_trip(mesh):
    sdk = client(mesh)
    asked = f"{unique('call')} Bash {json.dumps(INPUT)}"
    first = sdk.responses.create(model="sim", input=asked, tools=[BASH])
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("Bash", INPUT)
    # The SDK's own way of continuing: the output items back in, then the call's output.
    history = [{"role": "user", "content": asked}, *[item.model_dump(exclude_none=True) for item in first.output]]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "hi from the shell"})
    answer = sdk.responses.create(model="sim", input=history, tools=[BASH])
    assert f"- {call.call_id}: hi from the shell" in answer.output_text


def test_a_stream_assembles_the_function_call(mesh):
    asked = f"{unique('stream')} Bash {json.dumps(INPUT)}"
    kinds = []
    with client(mesh).responses.stream(model="sim", input=asked, tools=[BASH]) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] == "response.completed", kinds
    assert "response.function_call_arguments.delta" in kinds, kinds
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("Bash", INPUT)


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_structured_output_parses(mesh):
    parsed = client(mesh).responses.parse(model="sim", input=unique("Extract: Alice is 30."), text_format=Person)
    assert isinstance(parsed.output_parsed, Person), parsed


def test_a_conversation_llmesh_would_have_to_keep_is_refused_naming_the_field(mesh):
    with pytest.raises(openai.BadRequestError) as refused:
        client(mesh).responses.create(model="sim", input="hi", previous_response_id="resp_123")
    assert "previous_response_id" in str(refused.value), refused.value


def test_an_agent_on_the_responses_model_runs_its_tool(mesh):
    agents = pytest.importorskip("agents", reason="openai-agents is in tests/python/requirements.txt")
    agents.set_tracing_disabled(True)
    runs = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        runs.append(city)
        return f"sunny and 21 degrees in {city}"

    sdk = openai.AsyncOpenAI(base_url=f"http://{mesh['gateway']}/v1", api_key="unused", max_retries=0, timeout=10)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the tool.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model="sim", openai_client=sdk),
    )
    city = f"Rome-{uuid.uuid4().hex[:8]}"
    output = agents.Runner.run_sync(agent, f'What is the weather? get_weather {{"city": "{city}"}}').final_output
    assert runs == [city], "the SDK ran the tool once, with the model's arguments"
    assert f"sunny and 21 degrees in {city}" in output
