"""A real agent loop through the mesh: the OpenAI Agents SDK (`openai-agents`, unchanged) with a
function tool, on the gateway's Chat Completions route, against the built-in `sim` model. The sim
calls the tool the prompt names with the JSON object that follows it (docs/CONTRACT.md), the SDK
runs the tool and sends its result back, and the sim's final answer quotes that result.
"""

from __future__ import annotations

import uuid

import pytest

agents = pytest.importorskip("agents", reason="openai-agents is in tests/python/requirements.txt")
from openai import AsyncOpenAI  # noqa: E402

# The SDK's own tracing exports to OpenAI's servers, which a test never reaches.
agents.set_tracing_disabled(True)

RUNS: list[str] = []


@agents.function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    RUNS.append(city)
    return f"sunny and 21 degrees in {city}"


def run(mesh, prompt: str) -> str:
    client = AsyncOpenAI(base_url=f"http://{mesh['gateway']}/v1", api_key="unused", max_retries=0, timeout=10)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the tool.",
        tools=[get_weather],
        model=agents.OpenAIChatCompletionsModel(model="sim", openai_client=client),
    )
    return agents.Runner.run_sync(agent, prompt).final_output


def test_the_tool_runs_and_the_final_output_quotes_its_result(mesh):
    city = f"Paris-{uuid.uuid4().hex[:8]}"
    prompt = f'What is the weather? get_weather {{"city": "{city}"}}'
    before = len(RUNS)
    first = run(mesh, prompt)
    assert RUNS[before:] == [city], "the SDK ran the tool once, with the model's arguments"
    assert f"sunny and 21 degrees in {city}" in first
    # The same run again: the sim's answers are deterministic, so both turns come from the cache,
    # and the agent's whole loop (the tool included) gives the same output.
    assert run(mesh, prompt) == first
