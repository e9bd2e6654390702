"""Run by tests/e2e/test_sim_netns_backend.py inside a network namespace of its own (`ip netns
exec OUTER python this.py`): there it plays a host that a Docker engine with default flags has
been through — FORWARD policy DROP, bridge-nf-call-iptables 1 — builds a NetnsLab, and reports
on stdout, as one JSON line, what crossed the lab's bridge with the lab's accept rule and
without it. Both settings are per network namespace, so the host's own firewall (and every
other lab, container and helper on this machine) never sees the change; they are restored in a
`finally` all the same.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from mesh.sim.lab import LineReader, NetnsHost, NetnsLab

SYSCTL = pathlib.Path("/proc/sys/net/bridge/bridge-nf-call-iptables")

LISTENER = """
import socket, struct, sys, threading
ip = sys.argv[1]
server = socket.create_server((ip, 7001))
mdns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
mdns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
mdns.bind(("224.0.0.251", 5353))
group = struct.pack("4s4s", socket.inet_aton("224.0.0.251"), socket.inet_aton(ip))
mdns.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
def answer():
    while True:
        connection, _ = server.accept()
        connection.sendall(b"hi")
        connection.close()
threading.Thread(target=answer, daemon=True).start()
print("ready", flush=True)
while True:
    data, _ = mdns.recvfrom(2048)
    print("mdns " + data.decode(), flush=True)
"""

PROBE = """
import socket, sys
ip, peer, label = sys.argv[1:4]
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ip))
sender.sendto(label.encode(), ("224.0.0.251", 5353))
try:
    with socket.create_connection((peer, 7001), timeout=2) as connection:
        print("tcp " + connection.recv(2).decode())
except OSError as error:
    print("tcp failed:", error)
"""


def _iptables(*args: str) -> str:
    return subprocess.run(
        ["iptables", "-w", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


def _policy() -> str:
    return _iptables("-S", "FORWARD").splitlines()[0].split()[2]


def _crossing(a: NetnsHost, b: NetnsHost, reader: LineReader, label: str) -> dict[str, bool]:
    """Does a multicast datagram to the mDNS group, and a TCP connection, get from a to b?"""
    probe = a.run([sys.executable, "-c", PROBE, a.ip, b.ip, label], timeout_s=20)
    try:
        reader.wait_for(lambda line: line == f"mdns {label}", timeout_s=3)
        multicast = True
    except TimeoutError:
        multicast = False
    return {"tcp": probe.stdout.strip() == "tcp hi", "mdns": multicast}


def main() -> dict[str, object]:
    if not SYSCTL.exists():
        return {"skip": "br_netfilter is not loaded (no bridge-nf-call-iptables here)"}
    sysctl_before, policy_before = SYSCTL.read_text().strip(), _policy()
    result: dict[str, object] = {}
    try:
        SYSCTL.write_text("1\n")
        _iptables("-P", "FORWARD", "DROP")
        with NetnsLab.create(2) as lab:
            a, b = lab.hosts
            result["rules"] = list(lab.firewall_rules)
            listener = b.popen([sys.executable, "-c", LISTENER, b.ip])
            assert listener.stdout is not None
            reader = LineReader(listener.stdout, name="listener")
            reader.wait_for(lambda line: line == "ready", timeout_s=20)
            result["with_rule"] = _crossing(a, b, reader, "with-rule")
            lab.firewall.remove(lab.firewall_tag)  # the control: the same lab without its rule
            result["without_rule"] = _crossing(a, b, reader, "without-rule")
            lab.firewall.allow_bridge(lab.bridge, lab.firewall_tag)
            result["rule_back"] = _crossing(a, b, reader, "rule-back")
            kept = lab
        result["leftovers"] = kept.leftovers()
    finally:
        _iptables("-P", "FORWARD", policy_before)
        SYSCTL.write_text(sysctl_before + "\n")
    result["restored"] = _policy() == policy_before and SYSCTL.read_text().strip() == sysctl_before
    result["set"] = {
        "policy": "DROP",
        "bridge_nf_call": "1",
        "before": [policy_before, sysctl_before],
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
