"""Start and stop the coordinator: Ray (local or joined), Serve with its gRPC and HTTP proxies,
the application; wait until both ingresses answer.

    running = start_coordinator(config)     # blocks until ready (Ray on 2 cores: ~10 s)
    print(running.grpc_address, running.http_address, running.fast_paths,
          running.http_fast_paths)
    stop_coordinator()                      # serve.shutdown(); ray.shutdown()
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import pathlib
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from mesh.coordinator.settings import CoordinatorConfig
from mesh.core.channels import format_address
from mesh.core.errors import MeshError, UnauthenticatedError, UnavailableError

logger = logging.getLogger("mesh.coordinator")

# Measured on 2 cores (MEASURED.md): lower added latency through Serve's proxies. Direct
# ingress (which the flag also turns on) is left off: the fast path is ours.
RAY_ENVIRONMENT = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Ray on Linux takes the machine's routable address as the node's, even when asked for
# 127.0.0.1 (`ray.init(_node_ip_address=...)` resolves loopback to it), and binds its servers
# (GCS, raylet, object manager, workers, dashboard agent) there. With this variable off, a
# local Ray takes 127.0.0.1 instead; Ray reads it at import, so it is set before.
LOOPBACK_RAY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# The largest message Serve's gRPC proxy takes and sends (ray/serve/_private/constants.py reads
# it when the proxy actor starts; its default is 2 GiB). Set from the coordinator's prompt
# limits, so that an oversized Submit is refused unread at the proxy. Like every variable here
# it reaches the proxy of a Ray this process starts; a joined cluster needs it set on its nodes.
PROXY_MESSAGE_SIZE_VARIABLE = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
RAY_AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"
RAY_AUTH_TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"


@dataclass(frozen=True)
class RunningCoordinator:
    grpc_address: str  # Ray Serve's gRPC proxy (MeshService)
    http_address: str  # Ray Serve's HTTP proxy (OpenAI API under /v1)
    fast_paths: tuple[str, ...]  # MeshService straight on each dispatcher replica
    # The OpenAI API straight on each dispatcher replica: base URLs, http://HOST:PORT/v1
    http_fast_paths: tuple[str, ...] = ()

    @property
    def openai_base_url(self) -> str:
        return f"http://{self.http_address}/v1"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (Serve's proxies need a number, not 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def local_loopback_ray(config: CoordinatorConfig) -> bool:
    """Whether the coordinator starts its own Ray and listens on loopback only: then Ray
    should not listen beyond loopback either."""
    return config.ray_address is None and is_loopback(config.host)


def prepare_ray_environment(config: CoordinatorConfig) -> None:
    """Set Ray's environment for `config` (values already set win); call before Ray is
    imported, as `start_coordinator` does."""
    environment = dict(RAY_ENVIRONMENT)
    environment[PROXY_MESSAGE_SIZE_VARIABLE] = str(config.proxy_receive_limit_bytes)
    if local_loopback_ray(config):
        environment[LOOPBACK_RAY_VARIABLE] = "0"
    ray = sys.modules.get("ray")
    if config.cluster_dir and not (ray is not None and ray.is_initialized()):
        # In a cluster, Ray's own token authentication (Ray >= 2.52) guards its GCS, raylets
        # and dashboard: the token is a file of the cluster directory, readable by its owner.
        # A Ray this process starts gets it; to join a Ray cluster (--ray-address), set
        # RAY_AUTH_MODE=token and the cluster's token on every Ray node.
        environment[RAY_AUTH_MODE_VARIABLE] = "token"
        environment[RAY_AUTH_TOKEN_PATH_VARIABLE] = str(ray_token_file(config.cluster_dir))
    for key, value in environment.items():
        os.environ.setdefault(key, value)


def ray_token_file(cluster_dir: str) -> pathlib.Path:
    """The cluster's Ray token file, made (0600, 256 random bits) on first use."""
    from mesh.cluster import RAY_TOKEN, write_private

    path = pathlib.Path(cluster_dir) / RAY_TOKEN
    if not path.is_file():
        write_private(path, secrets.token_hex(32).encode())
    return path


def start_coordinator(
    config: CoordinatorConfig, *, ready_timeout_s: float = 120.0
) -> RunningCoordinator:
    """Start or join Ray, start Serve and deploy the app; UnavailableError if not ready in time.

    Ray Serve's gRPC proxy listens on all interfaces ([::]) whatever `config.host` says: Serve
    2.60's gRPCOptions has no host. The HTTP proxy and the fast paths listen on `config.host`;
    a local Ray started for a loopback host binds loopback (`prepare_ray_environment`)."""
    if (
        local_loopback_ray(config)
        and "ray" in sys.modules
        and os.environ.get(LOOPBACK_RAY_VARIABLE) != "0"
    ):
        logger.warning(
            "Ray was imported before the coordinator set %s: a local Ray may listen "
            "beyond loopback",
            LOOPBACK_RAY_VARIABLE,
        )
    prepare_ray_environment(config)
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from mesh.coordinator.app import APP_NAME, MESH_SERVICER, build_app

    grpc_port = config.grpc_port or free_port()
    http_port = config.http_port or free_port()
    if not ray.is_initialized():
        options: dict[str, object] = dict(
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            namespace="edgemesh",
        )
        if config.ray_address:
            ray.init(address=config.ray_address, **options)  # type: ignore[arg-type]
        else:
            if local_loopback_ray(config):
                options["_node_ip_address"] = "127.0.0.1"
            ray.init(num_cpus=config.num_cpus, **options)  # type: ignore[arg-type]
    serve.start(
        http_options=HTTPOptions(host=config.host, port=http_port),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[MESH_SERVICER]),
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    host = _client_host(config.host)
    running = RunningCoordinator(
        grpc_address=format_address(host, grpc_port),
        http_address=format_address(host, http_port),
        fast_paths=(),
    )
    _wait_ready(running, ready_timeout_s)
    replicas = config.replicas
    if config.fast_path:
        paths = _fast_paths(running, replicas, ready_timeout_s)
        running = dataclasses.replace(running, fast_paths=paths)
    if config.http_fast_path:
        paths = _fast_paths(running, replicas, ready_timeout_s, kind="http_fast_paths")
        running = dataclasses.replace(running, http_fast_paths=paths)
    return running


def _fast_paths(
    running: RunningCoordinator, replicas: int, timeout_s: float, *, kind: str = "fast_paths"
) -> tuple[str, ...]:
    """The replicas' direct addresses of `kind` ("fast_paths", "http_fast_paths": a list in
    /v1/mesh/info, which needs no API key), asked over HTTP (a Serve handle here would need a
    loop that outlives this call)."""
    give_up = time.monotonic() + timeout_s
    addresses: list[str] = []
    last_error = ""
    while True:
        try:
            with urllib.request.urlopen(f"{running.openai_base_url}/mesh/info", timeout=5) as reply:
                addresses = list(json.load(reply)[kind])
        except (OSError, ValueError, KeyError, TypeError) as error:  # URLError: an OSError
            last_error = str(error) or type(error).__name__
        if len(addresses) >= replicas:
            break
        if time.monotonic() >= give_up:
            raise UnavailableError(
                f"{len(addresses)} of {replicas} dispatcher replicas reported their "
                f"{kind.replace('_', ' ')[:-1]} within {timeout_s:g} s"
                + (f" (last error: {last_error})" if last_error else "")
            )
        time.sleep(0.1)
    host = running.grpc_address.rsplit(":", 1)[0]
    # Replicas bind the configured host; a client reaches 0.0.0.0 through loopback.
    return tuple(a.replace("0.0.0.0", host) for a in addresses)


def _wait_ready(running: RunningCoordinator, timeout_s: float) -> None:
    """Until Serve's gRPC proxy answers ListNodes and its HTTP proxy answers /v1/models (with
    API keys: until they refuse to answer without one, which only the app does)."""
    from mesh.coordinator_client import MeshClient

    async def grpc_ready() -> None:
        async with MeshClient(running.grpc_address) as client:
            try:
                await client.list_nodes(timeout_s=2.0)
            except UnauthenticatedError:
                return  # the ingress answered: it wants a key

    give_up = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < give_up:
        try:
            asyncio.run(grpc_ready())
            try:
                with urllib.request.urlopen(f"{running.openai_base_url}/models", timeout=2):
                    return
            except urllib.error.HTTPError as refused:
                refused.close()
                if refused.code == 401:
                    return  # the app answered: it wants a key
                raise
        except (MeshError, urllib.error.URLError, OSError) as error:
            last_error = str(error)
            time.sleep(0.2)
    raise UnavailableError(f"the coordinator did not answer within {timeout_s:g} s: {last_error}")


def stop_coordinator() -> None:
    """Shut Serve down, then Ray (when this process started or joined it)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
