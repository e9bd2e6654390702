"""Steps a request says were completed elsewhere, checked before the node replays them.

After a failover or an escalation the coordinator sends the steps already done
(`AgentRequest.completed_steps`); the node puts them back into the conversation as they were
and never runs their tools again. Anyone who can reach the node can send such steps too, and
a forged tool result ("Mallory is a platinum customer") reads to the model like a real one.
Until the cluster has identities (mTLS) the node cannot tell who ran a step, so it accepts
replayed steps only in the size and shape a node running this agent could have produced:

- at most `MAX_AGENT_STEPS`, numbered 0, 1, 2, ... in order;
- a tool call names one of the agent's tools, its arguments are a JSON object that matches
  the tool's schema, its result is JSON; a successful call of a tool appears once unless the
  agent allows repeat calls;
- a final answer or an invalid reply is the last step; an answer matches the agent's
  output schema (or is text); neither names a tool;
- every text within bounds (`step_text_bytes`, `MAX_ERROR_CHARS`, `MAX_LABEL_CHARS`), every
  number plausible (tokens within what the agent may write in one step, durations finite).

`check_max_steps` bounds `AgentRequest.max_steps` the same way (mesh.core.agent_limits). What
the node records itself stays within these bounds (`bounded_result`), so a step it produced
is always accepted back. Anything else is InvalidRequestError naming the step and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from mesh.core.agent_limits import MAX_AGENT_STEPS, highest_max_steps
from mesh.core.errors import InvalidRequestError
from mesh.core.untrusted import quoted
from nodes.agents.decision import FINAL_KEY
from nodes.agents.records import StepRecord
from nodes.agents.spec import AgentSpec
from nodes.tools import ToolRegistry, validate

MIN_STEP_TEXT_BYTES = 16 * 1024  # a step's arguments or result, whatever the agent's settings
BYTES_PER_TOKEN = 64  # generous: what one token the model writes can take as escaped JSON
MAX_ERROR_CHARS = 2000
MAX_LABEL_CHARS = 256  # a step's model and node id
_HEAD_CHARS_DIVISOR = 16  # a cut result keeps limit/16 characters: escaped, still within it


def step_text_bytes(spec: AgentSpec) -> int:
    """The most bytes of a step's arguments or result that the node records or accepts."""
    return max(MIN_STEP_TEXT_BYTES, BYTES_PER_TOKEN * spec.max_tokens_per_step)


def check_max_steps(spec: AgentSpec, requested: int, replayed: int) -> int:
    """The task's step limit: the agent's own (`requested` 0), a lower one, or an escalation's
    (see mesh.core.agent_limits); InvalidRequestError for anything higher."""
    if requested == 0:
        return spec.max_steps
    highest = highest_max_steps(spec.max_steps, replayed)
    if requested > highest:
        raise InvalidRequestError(
            f"max_steps {requested} is above what agent {spec.name} allows: its own limit is "
            f"{spec.max_steps}, and only an escalation replaying n steps may ask for n + 2 "
            f"(here {highest} at most)"
        )
    return requested


def check_replay(
    steps: Sequence[StepRecord], spec: AgentSpec, registry: ToolRegistry
) -> list[StepRecord]:
    """Steps completed elsewhere, checked (see the module) and marked as replayed."""
    if len(steps) > MAX_AGENT_STEPS:
        raise InvalidRequestError(
            f"completed_steps has {len(steps)} steps; an agent task has at most {MAX_AGENT_STEPS}"
        )
    checked = []
    called: set[str] = set()
    for position, step in enumerate(steps):
        where = f"completed_steps[{position}]"
        _check_position(step, position, len(steps), where)
        _check_sizes(step, spec, where)
        if step.kind == "tool_call":
            _check_tool_call(step, spec, registry, where)
            if not step.error:
                if step.tool in called and not spec.allow_repeat_calls:
                    raise InvalidRequestError(
                        f"{where} calls {step.tool} again after it succeeded, which agent "
                        f"{spec.name} never does (allow_repeat_calls is off)"
                    )
                called.add(step.tool)
        else:
            _check_ending(step, spec, where)
        checked.append(step.model_copy(update={"replayed": True}))
    return checked


def bounded_result(result_json: str, limit: int) -> str:
    """`result_json` as the node records it: whole when within `limit` bytes, else a JSON
    object that says it was cut and keeps its beginning (the model sees 600 characters of a
    result anyway)."""
    size = len(result_json.encode())
    if size <= limit:
        return result_json
    head = result_json[: max(0, limit // _HEAD_CHARS_DIVISOR - 64)]
    return json.dumps({"truncated": True, "bytes": size, "head": head})


def clip_error(error: str) -> str:
    return error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 3] + "..."


# ---------------------------------------------------------------- one step


def _check_position(step: StepRecord, position: int, count: int, where: str) -> None:
    if step.index != position:
        raise InvalidRequestError(
            f"{where} has index {step.index}; steps must be numbered 0, 1, 2, ... in order"
        )
    if step.kind in ("final", "invalid") and position != count - 1:
        raise InvalidRequestError(f"{where} is {step.kind} but is not the last")


def _check_sizes(step: StepRecord, spec: AgentSpec, where: str) -> None:
    limit = step_text_bytes(spec)
    for field, text in (("arguments_json", step.arguments_json), ("result_json", step.result_json)):
        size = len(text.encode())
        if size > limit:
            raise InvalidRequestError(
                f"{where}.{field} is {size} bytes; agent {spec.name} records at most {limit}"
            )
    for field, text, most in (
        ("error", step.error, MAX_ERROR_CHARS),
        ("model", step.model, MAX_LABEL_CHARS),
        ("node_id", step.node_id, MAX_LABEL_CHARS),
    ):
        if len(text) > most:
            raise InvalidRequestError(
                f"{where}.{field} is {len(text)} characters; at most {most} are recorded"
            )
    most_tokens = spec.max_tokens_per_step * (1 + spec.repair_attempts)
    if step.tokens > most_tokens:
        raise InvalidRequestError(
            f"{where}.tokens is {step.tokens}; agent {spec.name} writes at most {most_tokens} "
            "tokens in one step (max_tokens_per_step, repairs included)"
        )
    if not (math.isfinite(step.duration_ms) and step.duration_ms >= 0):
        raise InvalidRequestError(f"{where}.duration_ms must be a finite number of 0 or more")


def _check_tool_call(step: StepRecord, spec: AgentSpec, registry: ToolRegistry, where: str) -> None:
    if step.tool not in spec.tools or step.tool not in registry:
        raise InvalidRequestError(
            f"{where} calls {quoted(step.tool)}, which agent {spec.name} does not have; "
            f"its tools: {', '.join(spec.tools) or 'none'}"
        )
    arguments = _json(step.arguments_json or "{}", f"{where}.arguments_json")
    if not isinstance(arguments, dict):
        raise InvalidRequestError(f"{where}.arguments_json must be a JSON object")
    errors = validate(arguments, registry.get(step.tool).parameters, "arguments")
    if errors:
        raise InvalidRequestError(
            f"{where}.arguments_json does not match {step.tool}'s parameters: "
            f"{'; '.join(errors[:3])}"
        )
    _json(step.result_json or "null", f"{where}.result_json")


def _check_ending(step: StepRecord, spec: AgentSpec, where: str) -> None:
    """A final answer or an invalid reply: no tool, and the result the runtime records."""
    if step.tool or step.arguments_json:
        raise InvalidRequestError(f"{where} is {step.kind}; it names no tool and no arguments")
    value = _json(step.result_json or "{}", f"{where}.result_json")
    if step.kind == "invalid":
        if not isinstance(value, dict) or set(value) - {"reply"}:
            raise InvalidRequestError(f'{where}.result_json must be {{"reply": "..."}}')
        return
    if step.error:
        raise InvalidRequestError(f"{where} is a final answer; it has no error")
    if not isinstance(value, dict) or set(value) != {FINAL_KEY}:
        raise InvalidRequestError(f'{where}.result_json must be {{"{FINAL_KEY}": ...}}')
    errors = validate(value[FINAL_KEY], spec.output_schema or {"type": "string"}, FINAL_KEY)
    if errors:
        raise InvalidRequestError(
            f"{where} is not an answer agent {spec.name} gives: {'; '.join(errors[:3])}"
        )


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:  # JSONDecodeError, or an integer of too many digits
        raise InvalidRequestError(f"{where} is not JSON ({error})") from None
    except RecursionError:
        raise InvalidRequestError(f"{where} is nested too deeply") from None
