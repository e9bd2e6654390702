"""An instant OpenAI-compatible server, the HTTP twin of `bench.fake_node`, for LiteLLM's side.

    python -m bench.fake_openai [--port 0] [--delay-ms 0] [--tokens 8]

Prints `fake-openai serving on 127.0.0.1:PORT` once listening. Every chat completion answers
the first `max_tokens` (at most `--tokens`) words of a fixed reply, after `--delay-ms` per word.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request

REPLY = (
    "Paris is the capital of France and a city of art and light and food and music and "
    "rivers and bridges and parks and long walks by the water."
)


def build_app(delay_s: float, tokens: int) -> FastAPI:
    app = FastAPI()
    words = REPLY.split(" ")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        count = min(tokens, int(body.get("max_tokens") or tokens))
        if delay_s:
            await asyncio.sleep(delay_s * count)
        return {
            "id": f"chatcmpl-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length" if count < len(words) else "stop",
                    "message": {"role": "assistant", "content": " ".join(words[:count])},
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": count, "total_tokens": 8 + count},
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "bench"}],
        }

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="per generated word")
    parser.add_argument("--tokens", type=int, default=8, help="most words in an answer")
    args = parser.parse_args()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(2048)  # connections queue up until uvicorn accepts them
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        build_app(args.delay_ms / 1000, args.tokens),
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    print(f"fake-openai serving on {args.host}:{port}", flush=True)
    server.run(sockets=[listener])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
