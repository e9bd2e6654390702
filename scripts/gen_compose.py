"""Generate deploy/compose/<stem>.yml for every shipped topology (topologies/*.yaml).

Each file is what `mesh sim compose topologies/<stem>.yaml -o deploy/compose/<stem>.yml`
writes (mesh/sim/compose.py); they are kept in the tree so that a reader, or Compose on a
machine without this project, can use them as they are.

`--check` regenerates in memory and fails, naming each file, where the checked-in files differ,
are missing, or have no topology left; it never writes to the tree. The unit test
tests/unit/test_sim_compose.py runs the same comparison.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: import this checkout's mesh

from mesh.core.errors import MeshError  # noqa: E402
from mesh.sim.compose import SHIPPED_COMPOSE_DIR, render_compose, shipped_compose_path  # noqa: E402

TOPOLOGY_DIR = ROOT / "topologies"
FIX = "run python scripts/gen_compose.py and commit deploy/compose/"


def shipped_topologies() -> list[pathlib.Path]:
    """The shipped topologies: topologies/*.yaml (scenarios live in a subfolder)."""
    return sorted(TOPOLOGY_DIR.glob("*.yaml"))


def expected_files() -> dict[str, str]:
    """deploy/compose file name -> the text the generator gives for it."""
    return {
        shipped_compose_path(path).name: render_compose(path, SHIPPED_COMPOSE_DIR)
        for path in shipped_topologies()
    }


def checked_in_files() -> dict[str, str]:
    return {
        path.name: path.read_text(encoding="utf-8")
        for path in sorted(SHIPPED_COMPOSE_DIR.glob("*.yml"))
    }


def drift(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """One line per compose file that generating would add, change or find stale."""
    problems = []
    for name in sorted(expected.keys() | actual.keys()):
        if name not in actual:
            problems.append(f"{name}: missing (topologies/ has a topology for it)")
        elif name not in expected:
            problems.append(f"{name}: stale (no topology in topologies/ generates it)")
        elif expected[name] != actual[name]:
            problems.append(f"{name}: differs from what its topology generates")
    return problems


def check() -> int:
    """0 when deploy/compose/ is exactly what the topologies generate, else 1 (files named)."""
    expected = expected_files()
    problems = drift(expected, checked_in_files())
    if problems:
        print("deploy/compose/ is out of date with topologies/:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print(FIX, file=sys.stderr)
        return 1
    print(f"deploy/compose/ matches topologies/ ({len(expected)} files)")
    return 0


def generate() -> int:
    """Write every compose file, and remove those no topology generates any more."""
    SHIPPED_COMPOSE_DIR.mkdir(parents=True, exist_ok=True)
    expected = expected_files()
    for name, text in expected.items():
        path = SHIPPED_COMPOSE_DIR / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    for name in checked_in_files().keys() - expected.keys():
        (SHIPPED_COMPOSE_DIR / name).unlink()
        print(f"removed {(SHIPPED_COMPOSE_DIR / name).relative_to(ROOT)} (no topology)")
    print(f"deploy/compose/ has the compose file of each of {len(expected)} topologies")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate deploy/compose/ from topologies/.")
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate in memory and fail if deploy/compose/ differs",
    )
    args = parser.parse_args(argv)
    try:
        return check() if args.check else generate()
    except MeshError as error:  # a topology that does not load, or cannot be simulated
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
