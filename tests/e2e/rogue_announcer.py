"""A hostile neighbour for the e2e tests: advertises broken `_edgemesh._tcp` records.

    python -m tests.e2e.rogue_announcer --interface IP --cluster C --duplicate-id NODE_ID

Prints "rogue announcing N services" once every record is registered, then waits to be killed.
None of these may ever appear as a ready node.
"""

from __future__ import annotations

import argparse
import asyncio
import socket

from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from mesh.core.records import SERVICE_TYPE


def _valid(node_id: str, cluster: str, port: int) -> dict[bytes, bytes]:
    return {
        b"v": b"1",
        b"id": node_id.encode(),
        b"n": b"rogue",
        b"c": cluster.encode(),
        b"p": str(port).encode(),
        b"inc": b"abad1dea",
        b"m": b"smollm2",
    }


def rogue_records(cluster: str, duplicate_id: str, dead_port: int) -> dict[str, dict[bytes, bytes]]:
    """Service instance label -> TXT properties; every one is wrong in its own way."""
    base = _valid("rogue0000001", cluster, dead_port)
    return {
        "rogue-version": base | {b"v": b"99", b"id": b"rogue0000002"},
        "rogue-missing": {b"v": b"1", b"id": b"rogue0000003"},
        "rogue-binary": base | {b"id": b"\xff\xfe\xfd"},
        "rogue-oversize": base
        | {b"id": b"rogue0000004"}
        | {b"x%d" % i: b"z" * 240 for i in range(5)},
        "rogue-badport": base | {b"id": b"rogue0000005", b"p": b"1"},
        # str.isdigit() accepts "²" but int() does not: must be malformed, not a traceback.
        "rogue-superscript": base | {b"id": b"rogue0000008", b"cpu": "²".encode()},
        "rogue-deadaddr": base | {b"id": b"rogue0000006"},
        "rogue-cluster": base | {b"id": b"rogue0000007", b"c": b"someone-else"},
        "rogue-duplicate": _valid(duplicate_id, cluster, dead_port),
    }


def _free_port(ip: str) -> int:
    """A port on `ip` where nothing listens (bound then released)."""
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--interface", required=True)
    parser.add_argument("--cluster", default="default")
    parser.add_argument("--duplicate-id", default="rogue0000009")
    args = parser.parse_args()
    dead_port = _free_port(args.interface)
    zeroconf = AsyncZeroconf(interfaces=[args.interface])
    infos = [
        AsyncServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=dead_port,
            properties=properties,
            server=f"{label}.local.",
            parsed_addresses=[args.interface],
        )
        for label, properties in rogue_records(args.cluster, args.duplicate_id, dead_port).items()
    ]
    tasks = [await zeroconf.async_register_service(info) for info in infos]
    await asyncio.gather(*tasks)
    print(f"rogue announcing {len(infos)} services", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
