"""OpenAI tools and response formats as the mesh plans and reads them (mesh/coordinator/openai_tools)."""

from __future__ import annotations

import json

import pytest

from mesh.coordinator.openai_tools import (
    NamedChoice,
    ResponseFormat,
    ToolDef,
    answered_calls,
    call_id,
    history,
    plan,
    read_answer,
    with_system,
)
from mesh.core.errors import InvalidRequestError


def tool(name: str, **properties: dict) -> ToolDef:
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    return ToolDef.model_validate(
        {"type": "function", "function": {"name": name, "parameters": parameters}}
    )


WEATHER = tool("get_weather", city={"type": "string"})
TIME = tool("get_time", timezone={"type": "string"})


def branches(schema_text: str) -> list[dict]:
    schema = json.loads(schema_text)
    return schema.get("oneOf", [schema])


def test_auto_offers_every_function_and_the_final_answer():
    tool_plan = plan([WEATHER, TIME], "auto", None, max_tokens=100)
    assert tool_plan is not None and tool_plan.tools == ("get_weather", "get_time")
    found = branches(tool_plan.schema)
    assert [b["properties"].get("tool", {}).get("const") for b in found] == [
        "get_weather",
        "get_time",
        None,
    ]
    assert found[0]["properties"]["arguments"]["properties"] == {"city": {"type": "string"}}
    assert found[2]["properties"]["final"] == {"type": "string", "maxLength": 300}
    assert "get_weather(city: string)" in tool_plan.system


def test_required_named_and_none_narrow_the_branches():
    required = plan([WEATHER, TIME], "required", None, max_tokens=None)
    assert all("tool" in b["properties"] for b in branches(required.schema))
    named = plan(
        [WEATHER, TIME],
        NamedChoice.model_validate({"function": {"name": "get_time"}}),
        None,
        max_tokens=None,
    )
    assert [b["properties"]["tool"]["const"] for b in branches(named.schema)] == ["get_time"]
    none = plan([WEATHER], "none", None, max_tokens=None)
    assert none.tools == () and none.wrapped
    assert [set(b["properties"]) for b in branches(none.schema)] == [{"final"}]
    assert plan(None, None, None, max_tokens=None) is None


def test_auto_stops_offering_a_function_whose_result_this_turn_holds():
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    answered = answered_calls(messages)
    assert answered == {"get_weather"}
    tool_plan = plan([WEATHER, TIME], "auto", None, max_tokens=None, answered=answered)
    assert tool_plan.tools == ("get_time",)
    assert answered_calls([*messages, {"role": "user", "content": "and Rome?"}]) == set()


def test_a_response_format_alone_is_the_answer_itself():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    fmt = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    tool_plan = plan(None, None, fmt, max_tokens=None)
    assert json.loads(tool_plan.schema) == schema and not tool_plan.wrapped
    as_object = plan(None, None, ResponseFormat(type="json_object"), max_tokens=None)
    assert json.loads(as_object.schema) == {"type": "object"}
    with pytest.raises(InvalidRequestError, match="needs json_schema.schema"):
        plan(None, None, ResponseFormat(type="json_schema"), max_tokens=None)


def test_defs_of_a_functions_schema_move_to_the_root():
    nested = ToolDef.model_validate(
        {
            "function": {
                "name": "book",
                "parameters": {
                    "type": "object",
                    "properties": {"slot": {"$ref": "#/$defs/Slot"}},
                    "$defs": {"Slot": {"type": "string"}},
                },
            }
        }
    )
    schema = json.loads(plan([nested], "required", None, max_tokens=None).schema)
    assert schema["$defs"] == {"Slot": {"type": "string"}}
    assert "$defs" not in schema["properties"]["arguments"]


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        ([WEATHER], NamedChoice.model_validate({"function": {"name": "x"}}), "not among tools"),
        ([], "required", "needs at least one tool"),
        ([WEATHER, WEATHER], "auto", "same name"),
        ([tool("bad name")], "auto", "letters, digits"),
        ([WEATHER] * 129, "auto", "at most 128"),
    ],
)
def test_bad_tools_are_refused_with_what_to_change(tools, choice, message):
    with pytest.raises(InvalidRequestError, match=message):
        plan(tools, choice, None, max_tokens=None)


def test_history_writes_calls_and_results_as_the_model_sees_them():
    turns = history(
        [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
                ],
            },
            {"role": "tool", "content": "sunny"},
        ]
    )
    assert turns == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": '{"tool": "get_weather", "arguments": {"city": "Paris"}}'},
        {"role": "user", "content": "Tool result: sunny"},
    ]
    assert with_system(turns, "Rules.")[0] == {"role": "system", "content": "Be brief.\nRules."}
    with pytest.raises(InvalidRequestError, match=r"messages\[0\].tool_calls\[0\]"):
        history(
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]
        )


def test_reading_the_answer_back():
    tool_plan = plan([WEATHER], "auto", None, max_tokens=None)
    call = read_answer(
        '{"tool": "get_weather", "arguments": {"city": "Paris"}}', tool_plan, "t1", "stop"
    )
    assert call.finish_reason == "tool_calls" and call.content is None
    assert call.tool_calls == [
        {
            "id": call_id("t1", 0),
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    assert call_id("t1", 0) == call_id("t1", 0) != call_id("t2", 0)
    final = read_answer('{"final": "Sunny."}', tool_plan, "t1", "stop")
    assert (final.content, final.tool_calls, final.finish_reason) == ("Sunny.", [], "stop")
    cut = read_answer('{"final": "Sun', tool_plan, "t1", "length")
    assert (cut.content, cut.finish_reason) == ('{"final": "Sun', "length")
    undeclared = read_answer('{"tool": "rm_rf", "arguments": {}}', tool_plan, "t1", "stop")
    assert undeclared.tool_calls == []  # never a call of a function the caller did not declare


def test_a_json_answer_that_breaks_mid_way_is_run_again_whole_never_continued():
    import asyncio

    from mesh.coordinator.tasks import AttemptOutcome, TaskResult, build_task
    from mesh.core.errors import UnavailableError
    from tests.coordinator_fakes import ANSWER, Fail, FakeMesh, view
    from tests.unit.test_dispatcher import make

    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("node killed"), after_pieces=3))
        dispatcher = make(mesh, view("a"), view("b"))
        task = build_task("hi", model="m", json_schema='{"type": "object"}')
        items = [item async for item in dispatcher.stream(task)]
        await dispatcher.close()
        return mesh, items

    mesh, items = asyncio.run(asyncio.wait_for(scenario(), 10))
    *texts, result = items
    assert isinstance(result, TaskResult)
    assert texts == [ANSWER]  # one piece: node b's whole answer, nothing of node a's
    assert [a.outcome for a in result.attempts] == [AttemptOutcome.UNAVAILABLE, AttemptOutcome.OK]
    again = mesh.links["b"].requests[0]
    assert again.continuation == "" and not again.continuation_token_ids  # from the start
    assert again.json_schema == '{"type": "object"}'
