"""A real agent loop through the mesh: the OpenAI Agents SDK (`openai-agents`, unchanged) with a
function tool, on the gateway's Chat Completions route, against the built-in `sim` model. The sim
calls the tool the prompt names with the JSON object that follows it (docs/CONTRACT.md), the SDK
runs the tool and sends its result back, and the sim's final answer quotes that result.
"""

from __future__ import annotations

import uuid

import pytest

agents = pytest.importorskip("agents", reason="openai-agents is in tests/python/requirements.txt")
from openai import AsyncOpenAI, DefaultAsyncHttpxClient  # noqa: E402

# The SDK's own tracing exports to OpenAI's servers, which a test never reaches.
agents.set_tracing_disabled(True)

RUNS: list[str] = []


@agents.function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    RUNS.append(city)
    return f"sunny and 21 degrees in {city}"


def run(mesh, prompt: str, cached: list[str | None] | None = None) -> str:
    """Runs the agent; appends each model call's `x-llmesh-cached` header to `cached`."""

    async def note(response) -> None:
        if cached is not None:
            cached.append(response.headers.get("x-llmesh-cached"))

    http = DefaultAsyncHttpxClient(event_hooks={"response": [note]})
    client = AsyncOpenAI(
        base_url=f"http://{mesh['gateway']}/v1", api_key="unused", max_retries=0, timeout=10, http_client=http
    )
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
    # The same run again, until both turns (the tool call, the final answer) come from the cache
    # (the gateway stores in the background): the whole loop, the tool included, gives the same
    # output.
    for _ in range(20):
        cached: list[str | None] = []
        again = run(mesh, prompt, cached)
        if cached == ["true", "true"]:
            break
    assert cached == ["true", "true"], cached
    assert again == first
