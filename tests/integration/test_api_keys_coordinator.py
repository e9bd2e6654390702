"""API keys at a real coordinator (`mesh coordinator start --cluster-dir`, Ray Serve) over a real
node with the bundled model: the official `openai` client and `mesh submit` get 401 /
UNAUTHENTICATED without a valid key (none, wrong, revoked while it runs), 403 /
PERMISSION_DENIED out of the key's scope, 429 / RESOURCE_EXHAUSTED with Retry-After over its
requests or tokens per minute; and the next good request works. One coordinator for the module;
answers of one token.

A coordinator with a cluster directory also reaches its nodes over mTLS only (mesh/cluster,
mesh/coordinator/trust.py) where that is built in (`CoordinatorConfig.join_port`): the fixture
then makes a real cluster and the node joins it with a token, as an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pathlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from mesh.cli import main
from mesh.coordinator.runner import free_port
from mesh.coordinator.settings import CoordinatorConfig
from mesh.coordinator_client import MeshClient
from mesh.core.errors import PermissionDeniedError, RateLimitedError, UnauthenticatedError
from mesh.local_processes import LocalNode, local_node_command
from tests.mesh_processes import STOP_TIMEOUT_S, running_nodes, start_coordinator_cli

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.timeout(300)]

CHAT = [{"role": "user", "content": "Say hi."}]
KEYS = {
    "full": ["--subject", "ana@example.com"],
    "scoped": ["--agents", "customer-service", "--models", "smollm2"],
    "rpm-http": ["--rpm", "2"],
    "rpm-grpc": ["--rpm", "2"],
    "tpm-http": ["--tpm", "3"],  # one answer's prompt alone is more
    "tpm-grpc": ["--tpm", "3"],
    "temp-http": [],
    "temp-grpc": [],
}


@dataclass
class Coordinator:
    grpc: str
    fast: str  # the dispatcher's own MeshService (no Ray hop)
    http: str  # the OpenAI base URL (Serve's HTTP proxy)
    cluster_dir: str
    secrets: dict[str, str]
    logs: list[str]

    def openai(self, key: str, **options: object) -> openai.OpenAI:
        # No retries: a 429 must reach the test, not be waited out by the client.
        return openai.OpenAI(
            base_url=self.http,
            api_key=key,
            max_retries=0,
            timeout=30,
            **options,  # type: ignore[arg-type]
        )


def _create_keys(cluster_dir: str) -> dict[str, str]:
    secrets = {}
    for name, flags in KEYS.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert main(["keys", "create", name, *flags, "--cluster-dir", cluster_dir]) == 0
        secrets[name] = out.getvalue().strip()
    return secrets


async def _wait_ready(address: str, key: str, timeout_s: float = 60.0) -> None:
    async with MeshClient(address, api_key=key) as client, asyncio.timeout(timeout_s):
        while not any(n.state == "ready" for n in await client.list_nodes()):
            await asyncio.sleep(0.2)


TRUSTED_NODES = "join_port" in CoordinatorConfig.model_fields


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    directory = tmp_path_factory.mktemp("api-keys")
    cluster_dir = str(directory / "cluster")
    with contextlib.ExitStack() as stack:
        if TRUSTED_NODES:  # the node joins the cluster once the coordinator serves its port
            join_port, node_port = free_port(), free_port()
            command = _join_command(directory, cluster_dir, join_port, node_port)
            flags, nodes = ["--join-port", str(join_port)], [f"127.0.0.1:{node_port}"]
        else:
            (node,) = stack.enter_context(running_nodes(directory, ["node-a"]))
            flags, nodes = [], [node.address]
        secrets = _create_keys(cluster_dir)
        process = start_coordinator_cli(
            directory, nodes, "--cluster-dir", cluster_dir, "--no-http-fast-path", *flags
        )
        stack.callback(process.stop)
        if TRUSTED_NODES:
            joined = LocalNode(command, name="node-a", log=directory / "node-a.log")
            stack.callback(joined.stop, timeout_s=STOP_TIMEOUT_S)
            joined.wait_ready(120)
        addresses = process.addresses
        asyncio.run(_wait_ready(addresses["grpc"], secrets["full"]))
        logs = [str(directory / "coordinator.log"), str(directory / "node-a.log")]
        yield Coordinator(
            addresses["grpc"], addresses["fast"], addresses["http"], cluster_dir, secrets, logs
        )


def _join_command(
    directory: pathlib.Path, cluster_dir: str, join_port: int, node_port: int
) -> list[str]:
    """A real cluster in `cluster_dir`, and the command of a node that joins it on
    `node_port` with a one-use token (in a 0600 file: never on a command line)."""
    from mesh.cluster.authority import ClusterAuthority, init_cluster

    init_cluster(pathlib.Path(cluster_dir), "keys-test")
    token = ClusterAuthority(pathlib.Path(cluster_dir)).create_token(ttl_s=600, uses=1)
    token_file = directory / "join.token"
    token_file.write_text(str(token))
    token_file.chmod(0o600)
    return local_node_command(
        directory / "node-a",
        name="node-a",
        n_threads=1,
        extra=[
            *("--port", str(node_port), "--join-file", str(token_file)),
            *("--coordinator", f"127.0.0.1:{join_port}"),
        ],
    )


def _ask(client: openai.OpenAI, model: str = "smollm2") -> str:
    reply = client.chat.completions.create(model=model, messages=CHAT, max_tokens=1)
    return reply.choices[0].message.content or ""


def _submit(coordinator: Coordinator, key: str | None, *flags: str) -> int:
    """`mesh submit` in this process with the key in MESH_API_KEY (None: no key)."""
    previous = os.environ.pop("MESH_API_KEY", None)
    if key is not None:
        os.environ["MESH_API_KEY"] = key
    try:
        target = list(flags) or ["--model", "smollm2"]
        return main(
            ["submit", *target, "--max-tokens", "1", "--coordinator", coordinator.grpc, "Say hi."]
        )
    finally:
        os.environ.pop("MESH_API_KEY", None)
        if previous is not None:
            os.environ["MESH_API_KEY"] = previous


def test_openai_client_gets_each_status_and_then_works(coordinator: Coordinator) -> None:
    secrets = coordinator.secrets
    bare = httpx.post(f"{coordinator.http}/chat/completions", json={"model": "smollm2"})
    assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Bearer")
    # The client insists on a key: it sends none when its header is emptied.
    with pytest.raises(openai.AuthenticationError) as no_key:
        _ask(coordinator.openai("unused", default_headers={"Authorization": ""}))
    assert "API key is required" in no_key.value.message
    with pytest.raises(openai.AuthenticationError):
        _ask(coordinator.openai(secrets["full"][:-4] + "0000"))
    with pytest.raises(openai.PermissionDeniedError):
        _ask(coordinator.openai(secrets["scoped"]), model="agent:billing")

    limited = coordinator.openai(secrets["rpm-http"])
    assert _ask(limited) is not None and _ask(limited) is not None
    with pytest.raises(openai.RateLimitError) as over_rpm:
        _ask(limited)
    assert 1 <= int(over_rpm.value.response.headers["retry-after"]) <= 60

    tokens = coordinator.openai(secrets["tpm-http"])
    _ask(tokens)
    with pytest.raises(openai.RateLimitError) as over_tpm:
        _ask(tokens)
    assert int(over_tpm.value.response.headers["retry-after"]) >= 1
    assert "tokens per minute" in over_tpm.value.message

    assert _ask(coordinator.openai(secrets["full"])) is not None  # the next good one works
    listed = [m.id for m in coordinator.openai(secrets["scoped"]).models.list()]
    assert listed == ["smollm2", "agent:customer-service"]  # not intent-router, nor auto


def test_mesh_submit_gets_each_status_and_then_works(coordinator: Coordinator, capsys) -> None:
    secrets = coordinator.secrets

    def refused(key: str | None, *flags: str) -> str:
        capsys.readouterr()  # what earlier answers printed
        assert _submit(coordinator, key, *flags) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, err  # one line, on stderr
        for secret in secrets.values():
            assert secret not in err
        return err

    assert "API key is required" in refused(None)
    assert "not valid" in refused(secrets["full"][:-4] + "0000")
    assert "may not run agent 'billing'" in refused(secrets["scoped"], "--agent", "billing")
    for _ in range(2):
        assert _submit(coordinator, secrets["rpm-grpc"]) == 0
    assert "2 requests per minute; retry after" in refused(secrets["rpm-grpc"])
    assert _submit(coordinator, secrets["tpm-grpc"]) == 0
    assert "3 tokens per minute; retry after" in refused(secrets["tpm-grpc"])
    capsys.readouterr()
    assert _submit(coordinator, secrets["full"]) == 0  # the next good one works

    async def typed() -> list[type]:
        kinds = []
        for key, agent in ((None, ""), ("x", ""), (secrets["scoped"], "billing")):
            async with MeshClient(coordinator.grpc, api_key=key) as client:
                try:
                    await client.submit("hi", model="" if agent else "smollm2", agent=agent)
                except (UnauthenticatedError, PermissionDeniedError) as error:
                    kinds.append(type(error))
        async with MeshClient(coordinator.grpc, api_key=secrets["rpm-grpc"]) as client:
            try:
                await client.submit("hi", model="smollm2", max_tokens=1)
            except RateLimitedError as error:
                kinds.append(type(error))
                assert 0 < error.retry_after_s <= 60
        return kinds

    assert asyncio.run(asyncio.wait_for(typed(), 60)) == [
        UnauthenticatedError,
        UnauthenticatedError,
        PermissionDeniedError,
        RateLimitedError,
    ]


def test_the_fast_path_checks_keys_too(coordinator: Coordinator) -> None:
    secrets = coordinator.secrets

    async def scenario() -> list[str]:
        seen = []
        for key, options in (
            (None, {"model": "smollm2"}),
            (secrets["scoped"], {"agent": "billing"}),
            (secrets["full"], {"model": "smollm2"}),
        ):
            async with MeshClient(coordinator.fast, api_key=key) as client:
                try:
                    reply = await client.submit("hi", max_tokens=1, **options)
                    seen.append(f"answered by {reply.node_name}")
                except (UnauthenticatedError, PermissionDeniedError) as error:
                    seen.append(type(error).__name__)
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == [
        "UnauthenticatedError",
        "PermissionDeniedError",
        "answered by node-a",
    ]


def test_a_key_revoked_while_the_coordinator_runs_is_refused_within_a_second(
    coordinator: Coordinator, capsys
) -> None:
    secrets = coordinator.secrets
    client = coordinator.openai(secrets["temp-http"])
    _ask(client)
    assert _submit(coordinator, secrets["temp-grpc"]) == 0
    for name in ("temp-http", "temp-grpc"):
        assert main(["keys", "revoke", name, "--cluster-dir", coordinator.cluster_dir]) == 0
    revoked_at = time.monotonic()
    while True:
        try:
            _ask(client)
        except openai.AuthenticationError as error:
            assert "revoked" in error.message
            break
        assert time.monotonic() - revoked_at < 1.5, "the revocation did not hold in time"
        time.sleep(0.1)
    assert time.monotonic() - revoked_at < 1.5
    capsys.readouterr()
    assert _submit(coordinator, secrets["temp-grpc"]) == 1
    assert "'temp-grpc' was revoked" in capsys.readouterr().err
    assert _ask(coordinator.openai(secrets["full"])) is not None


def test_no_secret_in_the_logs(coordinator: Coordinator) -> None:
    """Last in the module: after every key above was sent, right and wrong."""
    for path in coordinator.logs:
        with open(path, encoding="utf-8", errors="replace") as log:
            text = log.read()
        for name, secret in coordinator.secrets.items():
            assert secret not in text, (path, name)
            assert secret.rsplit("_", 1)[1] not in text, (path, name)
