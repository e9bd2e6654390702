"""Warm prefixes with the real bundled model: a prompt that shares a long prefix with an earlier
one (not the last) starts from its kept KV state, and answers exactly as without it."""

from __future__ import annotations

import asyncio

import pytest

from nodes.backends import GenerationInput, Message
from nodes.backends.llama import LlamaBackend

pytestmark = pytest.mark.integration

SHOP = "You are the customer service agent of a shop. Be short and polite. " * 12
CLINIC = "You are the scheduling assistant of a clinic. Offer free slots only. " * 12


def ask(system: str, question: str) -> GenerationInput:
    return GenerationInput(
        messages=[Message("system", system), Message("user", question)],
        max_tokens=16,
        temperature=0.0,
    )


async def answers(backend: LlamaBackend, requests: list[GenerationInput]) -> list[str]:
    texts = []
    for request in requests:
        texts.append("".join([p.text async for p in backend.stream(request)]))
    return texts


def test_a_prompt_resumes_from_the_kept_state_of_its_prefix_and_answers_the_same():
    requests = [
        ask(SHOP, "Where is my order 1042?"),
        ask(CLINIC, "Is there a free slot on friday?"),  # the context now holds the clinic
        ask(SHOP, "Can I return a broken kettle?"),  # shop prefix: from its kept state
        ask(CLINIC, "Can I book monday at 10?"),  # and back
    ]

    async def scenario():
        warm = LlamaBackend("smollm2", "bundled:smollm2", n_threads=2, prefix_cache_mb=64)
        cold = LlamaBackend("smollm2", "bundled:smollm2", n_threads=2, prefix_cache_mb=0)
        await warm.load()
        await cold.load()
        try:
            with_states = await answers(warm, requests)
            without = await answers(cold, requests)
            prefixes = warm._instances[0].prefixes
            return with_states, without, prefixes.restored, len(prefixes), prefixes.bytes
        finally:
            await warm.close()
            await cold.close()

    with_states, without, restored, kept, size = asyncio.run(asyncio.wait_for(scenario(), 240))
    assert with_states == without  # the same tokens: the kept state is the evaluated prompt
    assert restored == 2  # the third and the fourth prompt
    assert 0 < kept <= 4 and 0 < size <= 64 * 1024 * 1024
