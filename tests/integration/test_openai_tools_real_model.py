"""Function calling, structured output and agents as models, through the official `openai`
client, with the real bundled model (SmolLM2-135M) on a real node process.

The coordinator is this process's Dispatcher and the HTTP app that Ray Serve wraps, served by
uvicorn on 127.0.0.1 port 0 in a thread of its own (one for the module), so that the tests use
the synchronous client as an agent framework would.
"""

from __future__ import annotations

import asyncio
import json
import threading

import openai
import pytest

from tests.coordinator_app import coordinator_app
from tests.mesh_processes import running_nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city's name"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class CoordinatorThread:
    """Registry, Dispatcher and the OpenAI app on uvicorn, in an event loop of their own."""

    def __init__(self, node_addresses: list[str]) -> None:
        self.addresses = node_addresses
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="coordinator", daemon=True)
        self.base_url = ""
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as error:  # noqa: BLE001 - reported to the test that waits
            self.error = error
            self.ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with coordinator_app(self.addresses) as app:
            self.base_url = f"{app.base}/v1"
            self.ready.set()
            await self._stop.wait()

    def __enter__(self) -> CoordinatorThread:
        self.thread.start()
        assert self.ready.wait(90), "the coordinator did not start"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nodes")
    with (
        running_nodes(directory, ["node-a"], timeout_s=180) as nodes,
        CoordinatorThread([n.address for n in nodes]) as coordinator,
    ):
        yield coordinator.base_url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def chat(client, **options):
    options.setdefault("model", "smollm2")
    options.setdefault("temperature", 0)
    options.setdefault("max_tokens", 96)
    return client.chat.completions.create(timeout=120, **options)


def test_required_tool_choice_calls_the_tool_with_arguments_from_the_question(client):
    reply = chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content is None


def test_the_tool_result_sent_back_becomes_the_answer(client):
    first = chat(client, messages=ASK, tools=[WEATHER], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    for choice in ("none", "auto"):
        final = chat(client, messages=messages, tools=[WEATHER], tool_choice=choice)
        answer = final.choices[0]
        assert answer.finish_reason == "stop" and not answer.message.tool_calls, (choice, answer)
        assert "21" in answer.message.content or "sunny" in answer.message.content.lower()


def test_a_named_tool_choice_calls_that_function(client):
    reply = chat(
        client,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert set(json.loads(call.function.arguments)) == {"timezone"}


def test_auto_answers_with_a_declared_call_or_text_and_none_never_calls(client):
    auto = chat(client, messages=ASK, tools=[WEATHER], tool_choice="auto").choices[0]
    if auto.message.tool_calls:  # the model chose to call: it must be a valid call
        assert auto.finish_reason == "tool_calls"
        assert auto.message.tool_calls[0].function.name == "get_weather"
        assert "city" in json.loads(auto.message.tool_calls[0].function.arguments)
    else:
        assert auto.finish_reason in ("stop", "length") and auto.message.content
    plain = chat(client, messages=ASK, tools=[WEATHER], tool_choice="none").choices[0]
    assert not plain.message.tool_calls and plain.message.content


def test_a_streamed_tool_call_arrives_as_tool_call_deltas(client):
    stream = chat(client, messages=ASK, tools=[WEATHER], tool_choice="required", stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or ():
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += piece.id or ""
            call["name"] += (piece.function.name or "") if piece.function else ""
            call["arguments"] += (piece.function.arguments or "") if piece.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert calls[0]["id"].startswith("call_")


def test_a_json_schema_answer_validates(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    reply = chat(
        client,
        messages=[
            {
                "role": "user",
                "content": "Paris is the capital of France. Name the city and country.",
            }
        ],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "place", "schema": schema, "strict": True},
        },
    )
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"city", "country"}
    assert all(isinstance(v, str) for v in value.values())
    as_object = chat(
        client,
        messages=[
            {"role": "user", "content": "Reply with a JSON object with Paris's city and country."}
        ],
        response_format={"type": "json_object"},
    )
    # Free-form JSON lets a 135M model ramble inside a string: a short, specific request
    # keeps the answer within max_tokens, where it must parse as an object.
    assert as_object.choices[0].finish_reason == "stop", as_object.choices[0].message.content
    assert isinstance(json.loads(as_object.choices[0].message.content), dict)


def test_bad_tool_requests_get_400_with_what_to_change(client):
    with pytest.raises(openai.BadRequestError, match="not among tools"):
        chat(
            client,
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "launch"}},
        )
    with pytest.raises(openai.BadRequestError, match="an agent has tools of its own"):
        chat(client, model="agent:customer-service", messages=ASK, tools=[WEATHER])
    with pytest.raises(openai.BadRequestError, match="letters, digits"):
        bad = {**WEATHER, "function": {**WEATHER["function"], "name": "get weather!"}}
        chat(client, messages=ASK, tools=[bad])
    assert chat(client, messages=ASK, max_tokens=8).choices[0].message.content  # still serves


def test_agents_are_models_and_the_header_still_works(client):
    listed = {m.id for m in client.models.list()}
    assert {"smollm2", "agent:customer-service", "agent:auto"} <= listed
    question = [{"role": "user", "content": "What is the status of order 1042?"}]
    as_model = chat(client, model="agent:customer-service", messages=question)
    assert as_model.model_extra["mesh"]["agent"] == "customer-service"
    steps = as_model.model_extra["mesh"]["steps"]
    assert steps[0]["tool"] == "order_status"
    as_header = chat(client, messages=question, extra_headers={"X-Mesh-Agent": "customer-service"})
    assert as_header.model_extra["mesh"]["agent"] == "customer-service"
    assert as_header.choices[0].message.content == as_model.choices[0].message.content


RESPONSES_WEATHER = {"type": "function", **WEATHER["function"]}
RESULT = '{"sky": "sunny", "celsius": 21}'


def respond(client, **options):
    options.setdefault("model", "smollm2")
    options.setdefault("temperature", 0)
    options.setdefault("max_output_tokens", 96)
    return client.responses.create(timeout=120, **options)


def test_a_responses_round_trip_with_a_function_tool(client):
    first = respond(
        client,
        input="What is the weather in Paris?",
        instructions="You answer questions about the weather.",
        tools=[RESPONSES_WEATHER],
        tool_choice="required",
    )
    assert first.status == "completed" and first.id.startswith("resp_")
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    # The result, continuing the stored response...
    stored = respond(
        client,
        previous_response_id=first.id,
        instructions="You answer questions about the weather.",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": RESULT}],
        tools=[RESPONSES_WEATHER],
    )
    # ... or with the whole conversation sent again (store: false keeps nothing).
    replayed = respond(
        client,
        store=False,
        instructions="You answer questions about the weather.",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": RESULT},
        ],
        tools=[RESPONSES_WEATHER],
    )  # fmt: skip
    for answer in (stored, replayed):
        assert [item.type for item in answer.output] == ["message"]
        assert "21" in answer.output_text or "sunny" in answer.output_text.lower()
    assert stored.output_text == replayed.output_text
    with pytest.raises(openai.NotFoundError, match="previous_response_id"):
        respond(client, previous_response_id=replayed.id, input="And tomorrow?")


def test_a_streamed_response_sends_the_standard_events(client):
    events = list(
        respond(
            client,
            input="What is the weather in Paris?",
            tools=[RESPONSES_WEATHER],
            tool_choice="required",
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Paris"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = list(respond(client, input="What is the capital city of France?", stream=True))
    deltas = "".join(e.delta for e in text if e.type == "response.output_text.delta")
    assert "Paris" in deltas and text[-1].response.output_text == deltas


def test_microsoft_agent_framework_agents_call_a_python_tool_through_the_mesh(base_url):
    from agent_framework import Agent
    from agent_framework.openai import OpenAIChatClient, OpenAIChatCompletionClient

    asked: list[str] = []

    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return "sunny, 21 degrees Celsius"

    for make in (OpenAIChatCompletionClient, OpenAIChatClient):  # chat completions, Responses
        asked.clear()
        agent = Agent(
            make(model="smollm2", base_url=base_url, api_key="unused"),
            instructions="You answer questions about the weather.",
            tools=[get_weather],
        )
        reply = asyncio.run(asyncio.wait_for(agent.run("What is the weather in Paris?"), 180))
        assert asked == ["Paris"], (make.__name__, asked, reply.text)
        assert "21" in reply.text or "sunny" in reply.text.lower(), (make.__name__, reply.text)
