"""`mesh submit (--agent NAME | --model NAME) TEXT`: one task through the coordinator."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mesh.cli._common import (
    add_api_key_argument,
    api_key_of,
    message_to_dict,
    print_json,
    run_async,
)
from mesh.cli.coordinator import DEFAULT_ENDPOINT


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("submit", help="run a task on the mesh through the coordinator")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--agent", help="agent name, or 'auto' (the intent router picks one)")
    target.add_argument("--model", help="model alias, e.g. smollm2")
    parser.add_argument("text", help="the request")
    parser.add_argument(
        "--coordinator",
        default=DEFAULT_ENDPOINT,
        metavar="ADDRESS",
        help=f"coordinator gRPC address (default {DEFAULT_ENDPOINT})",
    )
    add_api_key_argument(parser)
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument(
        "--deadline",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds the task may take in all (default: the topology's)",
    )
    parser.add_argument("--max-tokens", type=int, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, help="0 for deterministic output")
    parser.add_argument("--idempotency-key", default="", help="same key: answered once")
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only nodes with this label (repeatable)",
    )
    parser.add_argument(
        "--tier",
        default="",
        help="agent tasks: start on this model tier (from the topology's "
        "escalation tiers) instead of the lowest",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="task id, answering node, attempts and usage (agents: every step, tier) as JSON",
    )
    parser.set_defaults(func=_submit)


def step_summary(step: Any) -> dict[str, Any]:
    """One agent step as `--json` shows it (arguments and result decoded from JSON)."""
    call = step.kind == "tool_call"
    return {
        "index": step.index,
        "kind": step.kind,
        **({"tool": step.call.tool, "arguments": _loads(step.call.arguments_json)} if call else {}),
        "result": _loads(step.result_json),
        **({"error": step.error} if step.error else {}),
        **({"idempotent": step.idempotent} if call else {}),
        "tokens": step.tokens,
        "duration_ms": round(step.duration_ms, 1),
        "model": step.model,
        "node_id": step.node_id,
    }


def _loads(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:  # shown as it came
        return text


def summary(result: Any) -> dict[str, Any]:
    """The fields `--json` shows, from a SubmitResponse."""
    data = message_to_dict(result)
    agent = (
        {
            "steps": [step_summary(step) for step in result.steps],
            "tier": result.tier,
            "escalation_reason": result.escalation_reason,
            "routed_by": result.routed_by,
        }
        if result.agent
        else {}
    )
    return {
        "task_id": data["task_id"],
        "text": data["text"],
        "finish_reason": data["finish_reason"],
        "node": {"id": data["node_id"], "name": data["node_name"]},
        "model": data["model"],
        "agent": data["agent"],
        "failed_over": data["failed_over"],
        "attempts": [
            {
                "node": a["node_name"] or a["node_id"],
                "outcome": a["outcome"].removeprefix("ATTEMPT_OUTCOME_").lower(),
                "duration_ms": round(a["duration_ms"], 2),
                "tokens": a["completion_tokens"],
                **({"detail": a["detail"]} if a["detail"] else {}),
            }
            for a in data["attempts"]
        ],
        "usage": data["usage"],
        "total_ms": round(data["total_ms"], 2),
        "time_to_first_token_ms": round(data["time_to_first_token_ms"], 2),
        **agent,
    }


def _submit(args: argparse.Namespace) -> int:
    from mesh.coordinator_client import MeshClient

    labels = dict(pair.split("=", 1) for pair in args.label if "=" in pair)
    options = dict(
        model=args.model or "",
        agent=args.agent or "",
        deadline_s=args.deadline,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        idempotency_key=args.idempotency_key,
        labels=labels,
        tier=args.tier,
    )

    async def unary() -> int:
        async with MeshClient(args.coordinator, api_key=api_key_of(args)) as client:
            result = await client.submit(args.text, **options)
        if args.json:
            print_json(summary(result))
        else:
            print(result.text)
        return 0

    async def stream() -> int:
        text: list[str] = []
        async with MeshClient(args.coordinator, api_key=api_key_of(args)) as client:
            async for chunk in client.submit_stream(args.text, **options):
                if chunk.HasField("result"):
                    result = chunk.result
                    result.text = "".join(text)
                    if args.json:
                        print(json.dumps(summary(result)))
                    else:
                        tier = f", tier {result.tier}" if result.tier else ""
                        if result.escalation_reason:
                            tier += f" ({result.escalation_reason})"
                        if result.routed_by and result.routed_by != "request":
                            tier += f", routed by {result.routed_by}"
                        print(
                            f"\n[{result.node_name}, {result.usage.completion_tokens} tokens, "
                            f"{len(result.attempts)} attempt(s)"
                            f"{', failed over' if result.failed_over else ''}{tier}]",
                            file=sys.stderr,
                        )
                elif chunk.HasField("step"):
                    if not args.json:
                        print(_step_line(chunk.step), file=sys.stderr)
                else:
                    text.append(chunk.text)
                    if not args.json:
                        print(chunk.text, end="", flush=True)
        return 0

    return int(run_async(stream if args.stream else unary))


def _step_line(step: Any) -> str:
    if step.kind == "tool_call":
        what = f"{step.call.tool} {step.call.arguments_json} -> {step.result_json}"
    else:
        what = step.result_json or step.error
    return f"[step {step.index} {step.kind}] {what[:200]}"
