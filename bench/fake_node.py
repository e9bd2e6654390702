"""A real node daemon with an instant fake model, to measure the router rather than the model.

    python -m bench.fake_node --name fake-1 [--port 0] [--max-concurrent 64] [--max-queued 1000]

Prints `node NAME (ID) serving fake on 127.0.0.1:PORT` once serving, like `mesh node start`.
Every answer is the words of `--reply`, one per token, generated instantly (or `--delay-ms`
apart), so what is measured is gRPC, routing and Ray, not inference. With `--busy-marker TEXT`,
a prompt containing TEXT is refused as if the node were full (RESOURCE_EXHAUSTED): a failure
that is no node's fault, which a coordinator retries elsewhere without cooling a node down.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
from collections.abc import AsyncGenerator

from mesh.core.errors import OverloadedError
from nodes.backends import Completion, GenerationInput, ModelDescriptor, ModelStatus, Piece
from nodes.config import ModelConfig, NodeConfig
from nodes.daemon import NodeDaemon, run_daemon

DEFAULT_REPLY = "Paris is the capital of France."


class InstantBackend:
    """A Backend whose answer is `reply`, one word per token, continuing from `continuation`."""

    def __init__(
        self,
        model_id: str,
        reply: str = DEFAULT_REPLY,
        delay_s: float = 0.0,
        busy_marker: str = "",
    ) -> None:
        self.descriptor = ModelDescriptor(
            model_id=model_id,
            backend="fake",
            source="memory",
            context_length=2048,
            family="Instant",
        )
        self.status = ModelStatus.UNLOADED
        self.error = ""
        self.reply = reply
        self.delay_s = delay_s
        self.busy_marker = busy_marker

    async def load(self) -> None:
        self.status = ModelStatus.READY

    async def stream(self, request: GenerationInput) -> AsyncGenerator[Piece, None]:
        if self.busy_marker and any(
            self.busy_marker in text
            for text in (request.prompt, *(m.content for m in request.messages))
        ):
            raise OverloadedError(f"fake node: busy for prompts with {self.busy_marker!r}")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(self.reply.split(" "))]
        done = ""
        while (
            pieces
            and request.continuation.startswith(done + pieces[0])
            and len(done) < len(request.continuation)
        ):
            done += pieces.pop(0)
        produced = 0
        for piece in pieces[: request.max_tokens]:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            produced += 1
            yield Piece(piece)
        finish = "stop" if produced == len(pieces) else "length"
        yield Piece(
            "",
            Completion(
                finish_reason=finish, prompt_tokens=8, completion_tokens=produced, decode_s=0.0
            ),
        )

    async def close(self) -> None:
        self.status = ModelStatus.UNLOADED


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="fake")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="smollm2", help="the model alias it claims to serve")
    parser.add_argument("--max-concurrent", type=int, default=64)
    parser.add_argument("--max-queued", type=int, default=1000)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="between tokens")
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    parser.add_argument("--busy-marker", default="", help="refuse prompts containing it as busy")
    parser.add_argument("--join-file", help="join a cluster with the token in this file (mTLS)")
    parser.add_argument("--coordinator", action="append", default=[], help="its join port")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fake-node-") as state_dir:  # removed at exit
        return _serve(args, state_dir)


def _serve(args: argparse.Namespace, state_dir: str) -> int:
    config = NodeConfig(
        name=args.name,
        host=args.host,
        port=args.port,
        advertise=False,
        state_dir=state_dir,
        max_concurrent=args.max_concurrent,
        max_queued=args.max_queued,
        grace_s=0.5,
        models=(ModelConfig(id=args.model, source="memory", n_threads=1),),
        router=None,  # a fake node serves only its fake model
        join_token_file=args.join_file,
        coordinator=tuple(args.coordinator),
    )
    backend = InstantBackend(args.model, args.reply, args.delay_ms / 1000, args.busy_marker)
    daemon = NodeDaemon(config, backends={args.model: backend}, progress=io.StringIO())
    return asyncio.run(run_daemon(daemon))


if __name__ == "__main__":
    raise SystemExit(main())
