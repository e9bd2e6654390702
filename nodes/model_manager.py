"""Models on demand: which of a node's models are resident, under its caps.

A node may list more models than it holds at once. `max_loaded_models` and
`max_model_memory_mb` cap what is resident; a request for a model that is not loads it,
first unloading the least recently used models that are neither pinned nor in use until it
fits; `idle_unload_s` unloads models nobody asked for that long (`pinned: true` keeps one
resident whatever happens). At start the pinned models load first, then the others in the
config's order while they fit; a model that alone is larger than the memory cap is refused at
start, with the numbers.

Only generative GGUF models are managed: ONNX models (the intent router among them) and
OpenAI-compatible upstreams (`unmanaged`) load at start, stay, and count against no cap.

Sizes are the models' files (`Backend.expected_bytes`), known before loading: what llama.cpp
maps. The KV cache and scratch buffers come on top and are not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from mesh.core.errors import ConfigError, NotFoundError, NotReadyError, OverloadedError
from mesh.core.untrusted import quoted
from nodes.backends import Backend, ModelStatus
from nodes.capability import Capability

logger = logging.getLogger(__name__)

_MB = 1024 * 1024


def _mb(size_bytes: int) -> str:
    return f"{size_bytes / _MB:.0f} MB"


class ModelManager:
    """Loads, keeps and unloads a node's models; `use(model_id)` hands out a ready one."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        *,
        pinned: frozenset[str] = frozenset(),
        unmanaged: frozenset[str] = frozenset(),
        max_loaded_models: int | None = None,
        max_model_memory_mb: int | None = None,
        idle_unload_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] = logger.info,
        measured: Callable[[str, Backend], Awaitable[Capability | None]] | None = None,
    ) -> None:
        self.backends = backends
        self.pinned = pinned
        self.unmanaged = unmanaged
        self.max_loaded = max_loaded_models
        self.max_bytes = max_model_memory_mb * _MB if max_model_memory_mb else None
        self.idle_unload_s = idle_unload_s
        self._clock = clock
        self._say = say
        self._last_used: dict[str, float] = {}
        self._in_use: dict[str, int] = {}
        self._lock = asyncio.Lock()  # one load or unload at a time: the caps stay true
        # What each model does on this hardware (nodes/capability.py), after its first load.
        self._measured = measured
        self.capability: dict[str, Capability] = {}

    # ------------------------------------------------------------------ sizes and state

    def size_of(self, model_id: str) -> int:
        """The model's size: its file's, known before it loads (0 where it has none)."""
        backend = self.backends[model_id]
        return backend.descriptor.size_bytes or backend.expected_bytes()

    def loaded(self) -> list[str]:
        """The managed models resident now."""
        return [
            m
            for m, b in self.backends.items()
            if b.status is ModelStatus.READY and m not in self.unmanaged
        ]

    def resident_bytes(self) -> int:
        return sum(self.size_of(m) for m in self.loaded())

    def _size_if_capped(self, model_id: str) -> int:
        return self.size_of(model_id) if self.max_bytes is not None else 0

    def on_demand(self, model_id: str) -> bool:
        """Whether a request for `model_id` may load it (it is not loaded, and did not fail)."""
        backend = self.backends.get(model_id)
        return backend is not None and backend.status is ModelStatus.UNLOADED

    def _fits(self, extra_models: int, extra_bytes: int) -> bool:
        if self.max_loaded is not None and len(self.loaded()) + extra_models > self.max_loaded:
            return False
        return self.max_bytes is None or self.resident_bytes() + extra_bytes <= self.max_bytes

    def _caps(self) -> str:
        caps = []
        if self.max_loaded is not None:
            caps.append(f"at most {self.max_loaded} models")
        if self.max_bytes is not None:
            caps.append(f"at most {_mb(self.max_bytes)}")
        return " and ".join(caps) or "no cap"

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Refuse a model that alone is over the memory cap (ConfigError); load the pinned
        models, then the others in order while they fit (the rest load when asked for)."""
        cap = self.max_bytes
        managed = [m for m in self.backends if m not in self.unmanaged]
        for model_id in managed if cap is not None else ():
            size = self.size_of(model_id)
            if cap is not None and size > cap:
                raise ConfigError(
                    f"model {model_id} is {_mb(size)}, over max_model_memory_mb "
                    f"({_mb(cap)}): raise the cap or drop the model"
                )
        order = [m for m in self.backends if m in self.unmanaged or m in self.pinned]
        order += [m for m in managed if m not in self.pinned]
        for model_id in order:
            always = model_id in self.unmanaged or model_id in self.pinned
            if always or self._fits(1, self._size_if_capped(model_id)):
                await self._load(model_id)
            else:
                self._say(f"model {model_id} available on demand (the caps hold {self._caps()})")

    async def _load(self, model_id: str) -> None:
        backend = self.backends[model_id]
        began = time.perf_counter()
        self._say(f"loading model {model_id} from {backend.descriptor.source} ...")
        await backend.load()
        self._last_used[model_id] = self._clock()
        if self._measured is not None and model_id not in self.unmanaged:
            capability = await self._measured(model_id, backend)
            if capability is not None:
                self.capability[model_id] = capability
        self._say(
            f"model {model_id} ready ({backend.descriptor.size_bytes / 1e6:.1f} MB, "
            f"{backend.descriptor.family or 'unknown family'}) "
            f"in {time.perf_counter() - began:.2f} s"
        )

    async def _unload(self, model_id: str, why: str) -> None:
        self._say(f"unloading model {model_id} ({why})")
        await self.backends[model_id].close()

    # ------------------------------------------------------------------ requests

    @contextlib.asynccontextmanager
    async def use(self, model_id: str) -> AsyncIterator[Backend]:
        """The model, loaded (and room made for it) if it was not; never unloaded while
        inside. OverloadedError when no room can be made (the models it would have to unload
        are pinned or in use): another node may take the request."""
        backend = self.backends.get(model_id)
        if backend is None:
            raise NotFoundError(f"model {quoted(model_id)} is not served by this node")
        self._in_use[model_id] = self._in_use.get(model_id, 0) + 1
        try:
            if backend.status is not ModelStatus.READY:
                await self._ensure_loaded(model_id)
            self._last_used[model_id] = self._clock()
            yield backend
        finally:
            self._in_use[model_id] -= 1
            self._last_used[model_id] = self._clock()

    async def _ensure_loaded(self, model_id: str) -> None:
        async with self._lock:
            backend = self.backends[model_id]
            if backend.status is ModelStatus.READY:
                return  # loaded while this request waited for the lock
            if backend.status is ModelStatus.FAILED:
                raise NotReadyError(f"model {model_id} failed to load: {backend.error}")
            size = self._size_if_capped(model_id)
            while not self._fits(1, size):
                victim = self._least_recently_used(exclude=model_id)
                if victim is None:
                    busy = [m for m in self.loaded() if self._in_use.get(m) or m in self.pinned]
                    raise OverloadedError(
                        f"no room to load model {model_id} ({_mb(self.size_of(model_id))}): the node holds "
                        f"{self._caps()}, and {', '.join(busy) or 'nothing'} is pinned or in use"
                    )
                await self._unload(victim, f"least recently used, to make room for {model_id}")
            await self._load(model_id)

    def _least_recently_used(self, *, exclude: str) -> str | None:
        idle = [
            m
            for m in self.loaded()
            if m != exclude and m not in self.pinned and not self._in_use.get(m)
        ]
        return min(idle, key=lambda m: self._last_used.get(m, 0.0), default=None)

    # ------------------------------------------------------------------ idle models

    async def unload_idle(self) -> list[str]:
        """Unload the models nobody used for `idle_unload_s` (pinned ones and models in use
        stay); the ones unloaded."""
        if self.idle_unload_s is None:
            return []
        now, unloaded = self._clock(), []
        async with self._lock:
            for model_id in self.loaded():
                if model_id in self.pinned or self._in_use.get(model_id):
                    continue
                idle_s = now - self._last_used.get(model_id, now)
                if idle_s >= self.idle_unload_s:
                    await self._unload(model_id, f"idle for {idle_s:.0f} s")
                    unloaded.append(model_id)
        return unloaded

    async def run_idle_unloader(self) -> None:
        """Check for idle models every quarter of `idle_unload_s` (at most every 30 s), forever."""
        if self.idle_unload_s is None:
            return
        every_s = min(30.0, max(0.05, self.idle_unload_s / 4))
        while True:
            await asyncio.sleep(every_s)
            await self.unload_idle()
