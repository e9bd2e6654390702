"""`mesh sim` as a user types it: the arguments reach the backend, what it says is printed,
errors are one `error:` line and exit 1, and `compose -o` writes the same file as the shipped one."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from mesh.cli import main
from mesh.sim.backend import SimError, SimNode, SimStatus

pytestmark = pytest.mark.unit

REPO = pathlib.Path(__file__).resolve().parents[2]
TOPOLOGY = REPO / "topologies" / "distributed-edge.yaml"


class RecordingBackend:
    name = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def _status(self, topology: pathlib.Path) -> SimStatus:
        return SimStatus(
            "fake",
            "em-distributed-edge",
            str(topology),
            "127.0.0.1:41000",
            "127.0.0.1:41001",
            (
                SimNode("edge-a", "lab", "127.0.0.1:41002", "running"),
                SimNode("edge-b", "lab", "", "paused", ("paused", "delay 200ms")),
            ),
        )

    def up(self, topology: pathlib.Path, *, progress: Any, timeout_s: float) -> SimStatus:
        self.calls.append(("up", topology, timeout_s))
        progress("starting")
        return self._status(topology)

    def status(self, topology: pathlib.Path) -> SimStatus:
        self.calls.append(("status", topology))
        return self._status(topology)

    def down(self, topology: pathlib.Path, *, progress: Any) -> list[str]:
        self.calls.append(("down", topology))
        return ["removed container em-distributed-edge_edge-a_1"]

    def fault(self, topology: pathlib.Path, target: str, action: str, value: Any = None) -> str:
        self.calls.append(("fault", topology, target, action, value))
        if target == "nope":
            raise SimError("no node 'nope' in em-distributed-edge (nodes: edge-a, edge-b)")
        return f"{target}: {action}"


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> RecordingBackend:
    fake = RecordingBackend()
    chosen: list[str] = []

    def backend_for(name: str) -> RecordingBackend:
        chosen.append(name)
        return fake

    monkeypatch.setattr("mesh.sim.backend.backend_for", backend_for)
    fake.chosen = chosen  # type: ignore[attr-defined]
    return fake


def test_up_waits_and_prints_the_addresses(
    backend: RecordingBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "up", str(TOPOLOGY), "--backend", "netns", "--timeout", "30"]) == 0
    out, err = capsys.readouterr()
    assert backend.calls == [("up", TOPOLOGY, 30.0)]
    assert backend.chosen == ["netns"]  # type: ignore[attr-defined]
    assert "starting" in err
    assert "gRPC 127.0.0.1:41000" in out and "http://127.0.0.1:41001/v1" in out
    assert "edge-b  paused" in out and "[paused, delay 200ms]" in out


def test_fault_passes_target_action_and_value(
    backend: RecordingBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "fault", str(TOPOLOGY), "site:lab", "delay", "200"]) == 0
    assert backend.calls == [("fault", TOPOLOGY, "site:lab", "delay", 200.0)]
    assert backend.chosen == ["docker"]  # type: ignore[attr-defined]  # the default
    assert capsys.readouterr().out.strip() == "site:lab: delay"


def test_a_backend_error_is_one_line_and_exit_1(
    backend: RecordingBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "fault", str(TOPOLOGY), "nope", "kill"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no node 'nope'") and "Traceback" not in err


def test_an_unknown_action_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sim", "fault", str(TOPOLOGY), "edge-a", "explode"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'explode'" in capsys.readouterr().err


def test_status_json_and_down(
    backend: RecordingBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    assert main(["sim", "status", str(TOPOLOGY), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["coordinator_grpc"] == "127.0.0.1:41000"
    assert [n["name"] for n in status["nodes"]] == ["edge-a", "edge-b"]
    assert main(["sim", "down", str(TOPOLOGY)]) == 0
    assert "removed container" in capsys.readouterr().out


def test_compose_writes_a_file_that_mounts_the_topology_from_where_it_is(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    output = tmp_path / "sim" / "edge.yml"
    output.parent.mkdir()
    assert main(["sim", "compose", str(TOPOLOGY), "-o", str(output)]) == 0
    assert "wrote" in capsys.readouterr().err
    written = yaml.safe_load(output.read_text())
    shipped = yaml.safe_load((REPO / "deploy" / "compose" / "distributed-edge.yml").read_text())
    assert written["services"].keys() == shipped["services"].keys()
    for service in written["services"].values():
        mount = next(v for v in service["volumes"] if v["target"] == "/etc/edgemesh/topology.yaml")
        assert (output.parent / mount["source"]).resolve() == TOPOLOGY.resolve()
    # Without -o, the same file on stdout (mounted relative to the working directory).
    assert main(["sim", "compose", str(TOPOLOGY)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["services"].keys() == written["services"].keys()


def test_compose_of_a_missing_topology_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "compose", "/nonexistent/topology.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "cannot read" in err
