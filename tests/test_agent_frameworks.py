"""Agent frameworks play whole tool loops against the built-in model, offline.

Each test records the requests the framework sends, so that the arguments its tool received
are checked against the very schema the framework offered; each asserts the final answer
quotes the tool's result. openai-agents cannot share the test environment (its MCP
dependency needs a jsonschema newer than the server's), so its test makes a venv of its own,
once per machine, and runs the agent there against a server process.
"""
import json
import subprocess
from typing import Literal

import httpx
import jsonschema
import openai
import pytest

import ozwell
from conftest import API_KEY

MODEL = ozwell.OFFLINE_MODEL
QUESTION = "What is the weather in Lisbon, in fahrenheit?"
RESULT = "Foggy, 61 F in Lisbon"


def recording_http_client(bodies: list) -> httpx.AsyncClient:
    async def record(request: httpx.Request) -> None:
        bodies.append(json.loads(request.content))
    return httpx.AsyncClient(event_hooks={"request": [record]})


def offered_schema(bodies: list, name: str) -> dict:
    """The parameters schema the framework sent for the tool `name` (chat or Responses form)."""
    for tool in bodies[0]["tools"]:
        function = tool.get("function", tool)
        if function["name"] == name:
            return function["parameters"]
    raise AssertionError(f"{name} was not offered")


def assert_valid(schema: dict, arguments: dict) -> None:
    assert [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(arguments)] == []


@pytest.mark.parametrize("api", ["responses", "chat"])
@pytest.mark.gen_test(timeout=60)
async def test_a_pydantic_ai_agent_runs_its_tool_and_quotes_it(base_url, http_server, api):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    bodies: list = []
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0,
                                http_client=recording_http_client(bodies))
    model_class = OpenAIResponsesModel if api == "responses" else OpenAIChatModel
    agent = Agent(model_class(MODEL, provider=OpenAIProvider(openai_client=client)),
                  instructions="Answer questions about the weather.")
    received = []

    @agent.tool_plain
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Get the current weather in a city."""
        received.append({"city": city, "unit": unit})
        return RESULT

    result = await agent.run(QUESTION)
    assert received == [{"city": "Lisbon", "unit": "fahrenheit"}]
    assert_valid(offered_schema(bodies, "get_weather"), received[0])
    assert f'get_weather returned "{RESULT}"' in result.output
    await client.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_langchain_bind_tools_loop_ends_with_an_answer_quoting_the_tool(base_url, http_server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    received = []

    @tool
    def get_weather(city: str, days: int = 1) -> str:
        """Get the weather forecast for a city."""
        received.append({"city": city, "days": days})
        return RESULT

    bodies: list = []
    http_client = recording_http_client(bodies)
    llm = ChatOpenAI(model=MODEL, base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0,
                     http_async_client=http_client).bind_tools([get_weather])
    messages = [HumanMessage("What is the weather forecast in Lisbon for 4 days?")]
    for _ in range(5):  # a loop that never ends fails here instead of hanging
        reply = await llm.ainvoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            assert_valid(offered_schema(bodies, call["name"]), call["args"])
            messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    assert [m.type for m in messages] == ["human", "ai", "tool", "ai"]
    assert received == [{"city": "Lisbon", "days": 4}]
    assert f'get_weather returned "{RESULT}"' in messages[-1].content
    await http_client.aclose()


OPENAI_AGENTS_SCRIPT = r"""
import asyncio, json, sys
from typing import Literal
from openai import AsyncOpenAI, DefaultAsyncHttpxClient
from pydantic import BaseModel
from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

set_tracing_disabled(True)
base_url, api_key, model, question, result_text = sys.argv[1:6]
bodies, received = [], []

async def record(request):
    bodies.append(json.loads(request.content))

@function_tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    '''Get the current weather in a city.'''
    received.append({"city": city, "unit": unit})
    return result_text

class Report(BaseModel):
    city: str
    summary: str

async def main():
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                         http_client=DefaultAsyncHttpxClient(event_hooks={"request": [record]}))
    agent = Agent(name="weather", instructions="Answer questions about the weather.",
                  tools=[get_weather], output_type=Report,
                  model=OpenAIResponsesModel(model=model, openai_client=client))
    run = await Runner.run(agent, question, max_turns=4)
    print(json.dumps({"received": received, "output": run.final_output.model_dump(),
                      "offered": bodies[0]["tools"], "format": bodies[-1]["text"]["format"]}))

asyncio.run(main())
"""


def test_an_openai_agents_runner_calls_its_tool_and_returns_its_output_type(
        server_process, openai_agents_python):
    server = server_process()
    done = subprocess.run(
        [str(openai_agents_python), "-c", OPENAI_AGENTS_SCRIPT, f"{server.url}/v1", API_KEY, MODEL,
         QUESTION, RESULT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["received"] == [{"city": "Lisbon", "unit": "fahrenheit"}]
    assert_valid(offered_schema([{"tools": run["offered"]}], "get_weather"), run["received"][0])
    assert run["format"]["type"] == "json_schema"
    assert_valid(run["format"]["schema"], run["output"])
    assert run["output"]["city"] == "Lisbon" and run["output"]["summary"] == RESULT
