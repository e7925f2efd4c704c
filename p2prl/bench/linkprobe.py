"""What the links of a star (`p2prl.bench.netns.Star`) achieve: TCP throughput from each host to the
next in each direction, and the round trip of a one-byte message, each test bounded in time.

`measure(star)` runs, for every host i, a sender on i and a sink on host i + 1 (mod H): every host's
uplink and downlink are each measured once (with 2 hosts: both directions of the pair). The sink
counts bytes from the first to the last it receives, so the rate is what arrives. Then one echo round
trip between hosts 0 and 1 (TCP_NODELAY; Python on both ends, so it includes their wake-ups): the
only latency measured here. The peers' own processes:

    python -m p2prl.bench.linkprobe sink ADDR            # prints its port, then {"bytes", "seconds"}
    python -m p2prl.bench.linkprobe send ADDR PORT SECONDS
    python -m p2prl.bench.linkprobe echo ADDR            # prints its port, echoes until the peer closes
    python -m p2prl.bench.linkprobe ping ADDR PORT COUNT # prints {"rtt_s": median round trip}
"""
from __future__ import annotations

import json
import select
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

CHUNK = 1 << 16
CONNECT_S = 20.0  # how long a client retries while the server starts
IDLE_S = 30.0  # a socket that moves nothing this long ends the test


def _listen(addr: str) -> socket.socket:
    s = socket.create_server((addr, 0))
    s.settimeout(CONNECT_S + IDLE_S)
    print(s.getsockname()[1], flush=True)
    return s


def _connect(addr: str, port: int) -> socket.socket:
    deadline = time.monotonic() + CONNECT_S
    while True:
        try:
            c = socket.create_connection((addr, port), timeout=IDLE_S)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return c
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # the server is still starting: retry until the deadline


def sink(addr: str) -> dict[str, float]:
    conn, _ = _listen(addr).accept()
    conn.settimeout(IDLE_S)
    total, first, last = 0, None, None
    while data := conn.recv(CHUNK):
        last = time.perf_counter()
        first = first or last
        total += len(data)
    return {"bytes": total, "seconds": (last - first) if first else 0.0}


def send(addr: str, port: int, seconds: float) -> None:
    payload = bytes(CHUNK)
    with _connect(addr, port) as c:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)  # the sink closes once it has read everything


def echo(addr: str) -> None:
    conn, _ = _listen(addr).accept()
    conn.settimeout(IDLE_S)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(64):
        conn.sendall(data)


def ping(addr: str, port: int, count: int) -> dict[str, float]:
    rtts = []
    with _connect(addr, port) as c:
        for _ in range(count):
            start = time.perf_counter()
            c.sendall(b"x")
            c.recv(64)
            rtts.append(time.perf_counter() - start)
    return {"rtt_s": statistics.median(rtts)}


# -- the driver, in the root namespace --------------------------------------------------------------
def _server(star, host: int, mode: str, env: dict[str, str], timeout: float) -> tuple[subprocess.Popen, str]:
    proc = star.popen(host, [sys.executable, "-m", "p2prl.bench.linkprobe", mode, star.hosts[host].addr],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)  # bounded: a server that never listens
    port = proc.stdout.readline().strip() if ready else ""
    if not port:
        raise RuntimeError(f"link probe: the {mode} server on host {host} did not start: "
                           f"{proc.stderr.read() if proc.poll() is not None else 'no port within the time'}")
    return proc, port


def _client(star, host: int, argv: list[str], env: dict[str, str], timeout: float) -> str:
    out = star.run(host, [sys.executable, "-m", "p2prl.bench.linkprobe", *argv], timeout=timeout,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"link probe on host {host}: {out.stderr.strip()[-500:]}")
    return out.stdout


def measure(star, env: dict[str, str], seconds: float = 1.5, pings: int = 200) -> dict[str, Any]:
    """{"pairs": [{"src", "dst", "bits_per_s"}], "rtt_s"}; every wait bounded."""
    bound = seconds + CONNECT_S + IDLE_S
    pairs = []
    hosts = len(star.hosts)
    for src in range(hosts):
        dst = (src + 1) % hosts
        server, port = _server(star, dst, "sink", env, bound)
        _client(star, src, ["send", star.hosts[dst].addr, port, str(seconds)], env, bound)
        got = json.loads(server.communicate(timeout=bound)[0])
        pairs.append({"src": src, "dst": dst, "bits_per_s": 8 * got["bytes"] / max(got["seconds"], 1e-9)})
    server, port = _server(star, 1 % hosts, "echo", env, bound)
    rtt = json.loads(_client(star, 0, ["ping", star.hosts[1 % hosts].addr, port, str(pings)], env, bound))
    server.communicate(timeout=bound)
    return {"pairs": pairs, "rtt_s": rtt["rtt_s"], "seconds": seconds}


def main(argv: list[str]) -> None:
    mode, addr, *rest = argv
    if mode == "sink":
        print(json.dumps(sink(addr)), flush=True)
    elif mode == "send":
        send(addr, int(rest[0]), float(rest[1]))
    elif mode == "echo":
        echo(addr)
    elif mode == "ping":
        print(json.dumps(ping(addr, int(rest[0]), int(rest[1]))), flush=True)
    else:
        raise SystemExit(f"linkprobe: unknown mode {mode!r}; allowed: sink, send, echo, ping")


if __name__ == "__main__":
    main(sys.argv[1:])
