"""The HTTP fast path's plumbing: settings, command-line flags, the ready line and the runner
asking each replica for its address. No sockets: the server itself runs in
tests/integration/test_coordinator_ray.py."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mesh.cli import build_parser
from mesh.cli.coordinator import _config, ready_line
from mesh.coordinator import runner
from mesh.coordinator.settings import CoordinatorConfig
from mesh.core.errors import UnavailableError
from mesh.local_processes import COORDINATOR_READY

pytestmark = pytest.mark.unit


def config_from(*flags: str) -> CoordinatorConfig:
    args = build_parser().parse_args(["coordinator", "start", "--no-mdns", *flags])
    config = _config(args)
    assert isinstance(config, CoordinatorConfig)
    return config


def test_the_http_fast_path_is_on_by_default_on_any_free_port():
    config = config_from()
    assert config.http_fast_path and config.http_fast_port == 0
    assert config.fast_path  # beside the gRPC one, not instead of it


def test_flags_set_the_http_fast_port_or_turn_only_the_http_fast_path_off():
    assert config_from("--http-fast-port", "8123").http_fast_port == 8123
    off = config_from("--no-http-fast-path")
    assert not off.http_fast_path and off.fast_path
    grpc_off = config_from("--no-fast-path")
    assert grpc_off.http_fast_path and not grpc_off.fast_path


def test_an_http_fast_port_out_of_range_is_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["coordinator", "start", "--http-fast-port", "70000"])
    assert exited.value.code == 2
    assert "--http-fast-port: must be 0..65535" in capsys.readouterr().err
    with pytest.raises(ValidationError, match="http_fast_port"):
        CoordinatorConfig(http_fast_port=-1)


def test_the_ready_line_names_the_http_fast_paths_and_still_parses():
    running = runner.RunningCoordinator(
        grpc_address="127.0.0.1:9000",
        http_address="127.0.0.1:8000",
        fast_paths=("127.0.0.1:5001",),
        http_fast_paths=("http://127.0.0.1:5002/v1", "http://127.0.0.1:5003/v1"),
    )
    line = ready_line(running)
    assert line.endswith(
        "(OpenAI API) http fast path http://127.0.0.1:5002/v1, http://127.0.0.1:5003/v1"
    )
    match = COORDINATOR_READY.search(line)
    assert match is not None
    assert match["grpc"] == "127.0.0.1:9000" and match["fast"] == "127.0.0.1:5001"
    assert match["http"] == "http://127.0.0.1:8000/v1"
    both_off = ready_line(runner.RunningCoordinator("127.0.0.1:9000", "127.0.0.1:8000", ()))
    assert both_off.endswith(
        "fast path off http http://127.0.0.1:8000/v1 (OpenAI API) http fast path off"
    )
    match = COORDINATOR_READY.search(both_off)
    assert match is not None and match["fast"] == "off"


class _Reply:
    def __init__(self, info: dict[str, list[str]]) -> None:
        self._body = json.dumps(info).encode()

    def __enter__(self) -> _Reply:
        return self

    def __exit__(self, *_exc: object) -> bool:
        return False

    def read(self, *_args: object) -> bytes:
        return self._body


def test_the_runner_waits_for_every_replicas_http_fast_path(monkeypatch):
    """Replicas report as they start: the runner asks until each of them has, and a client
    reaches one bound on 0.0.0.0 through loopback."""
    answers = [
        {"fast_paths": ["0.0.0.0:5001", "0.0.0.0:5002"], "http_fast_paths": []},
        {
            "fast_paths": ["0.0.0.0:5001", "0.0.0.0:5002"],
            "http_fast_paths": ["http://0.0.0.0:6001/v1"],
        },
        {
            "fast_paths": ["0.0.0.0:5001", "0.0.0.0:5002"],
            "http_fast_paths": ["http://0.0.0.0:6001/v1", "http://0.0.0.0:6002/v1"],
        },
    ]
    asked = []

    def urlopen(url: str, timeout: float) -> _Reply:
        asked.append(url)
        return _Reply(answers[min(len(asked), len(answers)) - 1])

    monkeypatch.setattr(runner.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(runner.time, "sleep", lambda _s: None)
    coordinator = runner.RunningCoordinator("127.0.0.1:9000", "127.0.0.1:8000", ())
    found = runner._fast_paths(coordinator, 2, 5.0, kind="http_fast_paths")
    assert found == ("http://127.0.0.1:6001/v1", "http://127.0.0.1:6002/v1")
    assert asked == ["http://127.0.0.1:8000/v1/mesh/info"] * 3


def test_an_http_fast_path_not_reported_in_time_is_an_error(monkeypatch):
    monkeypatch.setattr(
        runner.urllib.request, "urlopen", lambda url, timeout: _Reply({"fast_paths": ["a:1"]})
    )
    monkeypatch.setattr(runner.time, "sleep", lambda _s: None)
    coordinator = runner.RunningCoordinator("127.0.0.1:9000", "127.0.0.1:8000", ())
    with pytest.raises(
        UnavailableError, match="0 of 1 dispatcher replicas reported their http fast path"
    ):
        runner._fast_paths(coordinator, 1, 0.0, kind="http_fast_paths")
