"""Measured capability: what a model really does on this node's hardware, and power state.

On a model's first load the node runs one short, fixed generation (a prompt of about a hundred
tokens, 16 tokens out, temperature 0) and keeps its prompt and decode speeds in tokens per
second, in `<state_dir>/capabilities.json`, keyed by the model file's SHA-256, the CPU, the
cores and the threads: a restart, or the same file under another id, reads them back at no
cost. Describe advertises them (`ModelInfo.prompt_tokens_per_s`, `decode_tokens_per_s`), the
coordinator's latency-aware policy starts from them instead of exploring, and `mesh nodes`
shows them.

A device on battery (psutil) advertises half its execution slots (at least one).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from nodes.backends import Backend, GenerationInput, Message

logger = logging.getLogger(__name__)

FILE_NAME = "capabilities.json"
_PROMPT = (
    "Summarise in one sentence: the shop opens at nine, closes at six, is closed on Sundays, "
    "offers free returns within thirty days with a receipt, repairs kettles and toasters in "
    "the back room, sells spare parts for most brands, and answers the phone in three "
    "languages. Orders over fifty euros ship for free; smaller ones cost four euros to ship."
)
_TOKENS_OUT = 16


@dataclass(frozen=True)
class Capability:
    prompt_tokens_per_s: float
    decode_tokens_per_s: float


async def measure(
    backend: Backend, *, clock: Callable[[], float] = time.perf_counter
) -> Capability:
    """One fixed generation on `backend` (loaded): its prompt and decode speeds."""
    # A number first, new each time, so that no cached prefix of an earlier run is reused.
    prompt = f"Case {time.time_ns() % 1_000_003}. {_PROMPT}"
    request = GenerationInput(
        messages=[Message("system", prompt)], max_tokens=_TOKENS_OUT, temperature=0.0
    )
    began = clock()
    first_at = 0.0
    prompt_tokens = decoded = 0
    decode_s = 0.0
    async for piece in backend.stream(request):
        if piece.text and not first_at:
            first_at = clock()
        if piece.completion is not None:
            prompt_tokens = piece.completion.prompt_tokens
            decoded = piece.completion.completion_tokens
            decode_s = piece.completion.decode_s
    to_first_s = (first_at or clock()) - began
    return Capability(
        prompt_tokens_per_s=round(prompt_tokens / to_first_s, 1) if to_first_s > 0 else 0.0,
        decode_tokens_per_s=round((decoded - 1) / decode_s, 1) if decoded > 1 and decode_s else 0.0,
    )


class Capabilities:
    """Measured capabilities by key, kept in a JSON file of the node's state dir."""

    def __init__(self, state_dir: pathlib.Path | None) -> None:
        self._path = state_dir / FILE_NAME if state_dir is not None else None
        self._known: dict[str, Capability] = {}
        if self._path is not None and self._path.exists():
            try:
                raw = json.loads(self._path.read_text(encoding="utf-8"))
                self._known = {key: Capability(**value) for key, value in raw.items()}
            except (OSError, ValueError, TypeError) as error:  # a torn or foreign file
                logger.warning(
                    "ignoring %s (%s): capabilities are measured again", self._path, error
                )

    def get(self, key: str) -> Capability | None:
        return self._known.get(key)

    def put(self, key: str, capability: Capability) -> None:
        self._known[key] = capability
        if self._path is None:
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._path.with_suffix(".tmp")
            temporary.write_text(
                json.dumps({k: asdict(v) for k, v in self._known.items()}, indent=1),
                encoding="utf-8",
            )
            temporary.replace(self._path)
        except OSError as error:  # a read-only state dir: measured again next start
            logger.warning("cannot keep capabilities in %s: %s", self._path, error)


def hardware_key(threads: int) -> str:
    """What a measurement depends on besides the model file: CPU, cores, threads."""
    model = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux: platform.processor() it is
        pass
    return f"{platform.machine()}|{model}|{os.cpu_count()}|{threads}"


def on_battery() -> bool:
    """Whether the device runs on battery now (False where psutil cannot tell)."""
    try:
        import psutil

        battery = psutil.sensors_battery()
    except (ImportError, AttributeError, OSError, RuntimeError):
        return False
    return battery is not None and battery.power_plugged is False


def battery_slots(max_concurrent: int, on_battery_now: bool) -> int:
    """The execution slots to advertise: half (at least one) on battery."""
    return max(1, max_concurrent // 2) if on_battery_now else max_concurrent
