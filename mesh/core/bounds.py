"""What one request may cost: the limits nodes and the coordinator share, and their checks.

A request's size and shape are checked before any work that grows with them (rendering a chat
template, tokenizing, a ledger entry), and every gRPC server refuses messages well above them at
the wire (`receive_limit_bytes`), before they are parsed. Each check raises InvalidRequestError
naming the limit, so the caller knows what to change; such a request is never retried.
"""

from __future__ import annotations

from mesh.core.errors import InvalidRequestError

MAX_TASK_ID_CHARS = 128  # a caller-chosen task id (the generated ones have 21)
MAX_IDEMPOTENCY_KEY_CHARS = 255  # a caller-chosen idempotency key (a UUID has 36)
DEFAULT_MAX_PROMPT_BYTES = 64 * 1024  # a prompt's text: its messages' contents and continuation
DEFAULT_MAX_MESSAGES = 256  # messages in one request (a chat's history)
# What one message adds beyond its content: its role and framing on the wire, its markers in a
# rendered chat template ("<|im_start|>user\n...<|im_end|>\n" is 27 bytes).
MESSAGE_OVERHEAD_BYTES = 64
# Beyond the prompt: a chat template's own text and a system prompt.
TEMPLATE_ALLOWANCE_BYTES = 4 * 1024
# The rest of a request on the wire: sampling, task context, labels, ids, an agent's tool calls.
FIELDS_ALLOWANCE_BYTES = 64 * 1024


def receive_limit_bytes(max_prompt_bytes: int, max_messages: int) -> int:
    """The largest gRPC message a server takes for these prompt limits: the prompt twice (an
    agent's input and history, plus the steps it replays, which go back into its prompt), each
    message's overhead, and the other fields. Anything larger is refused unread."""
    return 2 * max_prompt_bytes + max_messages * MESSAGE_OVERHEAD_BYTES + FIELDS_ALLOWANCE_BYTES


def json_body_limit_bytes(max_prompt_bytes: int, max_messages: int) -> int:
    """The largest JSON request body (the OpenAI API) for these prompt limits: JSON may escape
    each byte of text as 6 ("\\u0001"), and a message's keys and punctuation take up to 256."""
    return 6 * max_prompt_bytes + max_messages * 256 + FIELDS_ALLOWANCE_BYTES


def rendered_limit_bytes(max_prompt_bytes: int, max_messages: int, system_prompt: str = "") -> int:
    """The longest prompt a chat template may render from a request within the limits: what is
    checked after rendering and before tokenizing."""
    return (
        max_prompt_bytes
        + max_messages * MESSAGE_OVERHEAD_BYTES
        + TEMPLATE_ALLOWANCE_BYTES
        + len(system_prompt.encode())
    )


def check_caller_id(name: str, value: str, limit: int) -> None:
    """InvalidRequestError when a caller-chosen id (`name` says which) is over `limit` chars."""
    if len(value) > limit:
        raise InvalidRequestError(
            f"{name} is {len(value)} characters, over the limit of {limit}; use a shorter one "
            "(a UUID fits)"
        )


def check_message_count(messages: int, max_messages: int, whose: str = "the") -> None:
    """InvalidRequestError when a request has more than `max_messages` messages (`whose` limit:
    e.g. "this node's"). Checked first: it costs nothing, whatever the request holds."""
    if messages > max_messages:
        raise InvalidRequestError(
            f"the request has {messages} messages, over {whose} limit of {max_messages}; "
            "send fewer (e.g. drop or summarise the oldest turns)"
        )


def check_prompt_bytes(size: int, max_prompt_bytes: int, whose: str = "the") -> None:
    """InvalidRequestError when a prompt's text is over `max_prompt_bytes`."""
    if size > max_prompt_bytes:
        raise InvalidRequestError(
            f"the prompt is {size} bytes, over {whose} limit of {max_prompt_bytes}; shorten it"
        )
