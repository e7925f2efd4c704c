"""Hosts that share only a network, on one Linux machine: network namespaces on one switch.

`Star(hosts=H)` builds H "hosts", each a network namespace with one veth link to a bridge, and the
bridge in a "switch" namespace of its own, so no link or address ever lives in the root namespace
(nothing to collide with, nothing to leak into the machine's routing). Each host has its own IPv4
address on `subnet` and, for commands started through `popen`/`run`, its own /dev/shm (a directory
bind-mounted over it in a private mount namespace, as separate machines have), so peers on different
hosts cannot meet in shared memory. `names` adds host names every host resolves (an /etc/hosts of its
own: `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts).

With `rate` (tc's syntax, e.g. "1gbit", or bits per second), every link is shaped by a `tbf` qdisc in
both directions: on the host's end (what the host sends) and on the switch's end (what it receives).
`burst` and `limit` (bytes) default to 1 ms of traffic at the rate (at least ten 1514-byte frames)
and to that plus 50 ms of queue; `shaping` returns what was applied, for printing.

Needs root, iproute2 (`ip`, `tc`) and util-linux's `unshare`. Names carry a per-instance tag, so
several stars coexist. `close()` (the context's exit) kills every process left in the namespaces,
deletes them and their directories, and asserts that nothing of the star is left. Every wait is
bounded by `timeout_s`.
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

_COUNTER = itertools.count()
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
ETC_NETNS = Path("/etc/netns")
# Runs the command with the host's /dev/shm: a private mount namespace, so the bind mount is the host's own.
_SHM = 'mount --bind "$0" /dev/shm && exec "$@"'


def available() -> Optional[str]:
    """None where stars can be built here, else why not (one line)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc", "unshare") if shutil.which(tool) is None]
    return f"network namespaces need {', '.join(missing)} (iproute2, util-linux)" if missing else None


def rate_bits(rate: Union[str, float]) -> float:
    """Bits per second of a rate in tc's units ("100mbit", "1.5gbit", "800kbit") or a number."""
    if isinstance(rate, (int, float)):
        value = float(rate)
    else:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?bit)?", rate.strip().lower())
        if m is None:
            raise ValueError(f"rate {rate!r}: expected a number and bit, kbit, mbit, gbit or tbit")
        value = float(m.group(1)) * _UNITS[m.group(2) or "bit"]
    if value <= 0:
        raise ValueError(f"rate {rate!r}: must be positive")
    return value


@dataclass(frozen=True)
class Host:
    index: int
    netns: str   # the namespace's name (`ip netns exec <netns> ...`)
    dev: str     # its interface to the switch (IFNAME)
    addr: str    # its IPv4 address
    shm: Path    # the directory that is its /dev/shm


class Star:
    """H hosts on one switch (see the module docstring); a context manager."""

    def __init__(self, hosts: int, rate: Union[str, float, None] = None, burst: Optional[int] = None,
                 limit: Optional[int] = None, names: Optional[dict[str, int]] = None,
                 subnet: str = "10.77.0.0/24", timeout_s: float = 30.0) -> None:
        net = ipaddress.ip_network(subnet)
        assert 1 <= hosts < net.num_addresses - 2, f"{hosts} hosts do not fit {subnet}"
        self.tag = f"{(os.getpid() * 64 + next(_COUNTER)) % 16 ** 6:06x}"
        self.timeout_s, self.names = timeout_s, dict(names or {})
        self.prefix = net.prefixlen
        self.switch = f"p2prl-{self.tag}-sw"
        self.hosts = [Host(i, f"p2prl-{self.tag}-h{i}", f"p2{self.tag}h{i}", str(net[i + 1]),
                           Path("/dev/shm") / f".p2prl-{self.tag}-h{i}") for i in range(hosts)]
        self.shaping: Optional[dict[str, Any]] = None
        if rate is not None:
            bytes_s = rate_bits(rate) / 8
            burst = burst or max(int(bytes_s / 1000), 10 * 1514)
            self.shaping = {"rate": rate if isinstance(rate, str) else f"{int(rate)}bit",
                            "burst": burst, "limit": limit or burst + int(bytes_s * 0.05)}
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []  # namespaces created, in order
        self.made_etc = False  # whether this star created /etc/netns itself

    # -- building ---------------------------------------------------------------------------------
    def _do(self, *argv: str) -> str:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {(p.stderr or p.stdout).strip()}")
        return p.stdout

    def _netns(self, name: str) -> None:
        self._do("ip", "netns", "add", name)
        self.made.append(name)
        self._do("ip", "-n", name, "link", "set", "lo", "up")

    def __enter__(self) -> "Star":
        try:
            self._build()
        except BaseException:
            self.close(check=False)
            raise
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close(check=kind is None)  # an error in the block matters more than the teardown's check

    def _build(self) -> None:
        bridge = f"p2{self.tag}br"
        self._netns(self.switch)
        self._do("ip", "-n", self.switch, "link", "add", bridge, "type", "bridge")
        self._do("ip", "-n", self.switch, "link", "set", bridge, "up")
        hosts_file = None
        if self.names:
            extra = "".join(f"{self.hosts[i].addr} {name}\n" for name, i in self.names.items())
            hosts_file = Path("/etc/hosts").read_text() + "\n# p2prl.bench.netns\n" + extra
        for h in self.hosts:
            self._netns(h.netns)
            side = f"p2{self.tag}s{h.index}"
            # Both ends are created in their namespaces directly: the root namespace never holds them.
            self._do("ip", "link", "add", h.dev, "netns", h.netns, "type", "veth", "peer", "name", side,
                     "netns", self.switch)
            self._do("ip", "-n", self.switch, "link", "set", side, "master", bridge)
            self._do("ip", "-n", self.switch, "link", "set", side, "up")
            self._do("ip", "-n", h.netns, "addr", "add", f"{h.addr}/{self.prefix}", "dev", h.dev)
            self._do("ip", "-n", h.netns, "link", "set", h.dev, "up")
            if self.shaping is not None:
                for ns, dev in ((h.netns, h.dev), (self.switch, side)):
                    s = self.shaping
                    self._do("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", str(s["rate"]),
                             "burst", str(s["burst"]), "limit", str(s["limit"]))
            h.shm.mkdir()
            h.shm.chmod(0o1777)  # as /dev/shm itself: every user may create segments there
            if hosts_file is not None:
                if not ETC_NETNS.exists():
                    ETC_NETNS.mkdir()
                    self.made_etc = True
                (ETC_NETNS / h.netns).mkdir()
                (ETC_NETNS / h.netns / "hosts").write_text(hosts_file)

    # -- using ------------------------------------------------------------------------------------
    def command(self, host: int, argv: list[str]) -> list[str]:
        """`argv` as run on host `host`: its network, its /dev/shm."""
        h = self.hosts[host]
        return ["ip", "netns", "exec", h.netns, "unshare", "--mount", "--propagation", "private",
                "sh", "-c", _SHM, str(h.shm), *argv]

    def popen(self, host: int, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start `argv` on host `host` in a session of its own (`os.killpg` reaches its children)."""
        proc = subprocess.Popen(self.command(host, argv), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, host: int, argv: list[str], timeout: Optional[float] = None,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """Run `argv` on host `host` to its end (killed after `timeout`, default `timeout_s`)."""
        proc = self.popen(host, argv, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout or self.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def pids(self, host: Optional[int] = None) -> list[int]:
        """The processes in host `host`'s namespace (all of the star's with None)."""
        names = [n for n in ([self.hosts[host].netns] if host is not None else self.made) if n in self.made]
        return [int(x) for ns in names for x in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                                text=True, timeout=self.timeout_s).stdout.split()]

    def kill_host(self, host: int) -> None:
        """SIGKILL every process on host `host`, as if the machine had died; returns once none is left."""
        self._kill([host])

    def _kill(self, hosts: Optional[list[int]]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            pids = [p for h in (hosts if hosts is not None else [None]) for p in self.pids(h)]
            if not pids:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} survived SIGKILL for {self.timeout_s} s")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)  # a stopped process dies too
                except ProcessLookupError:
                    pass
            time.sleep(0.05)  # SIGKILL is asynchronous: poll until the kernel has removed them
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=1)  # reap the `ip netns exec` wrappers of killed commands
                except subprocess.TimeoutExpired:
                    pass

    # -- removing ---------------------------------------------------------------------------------
    def leftovers(self) -> list[str]:
        """What of this star still exists (namespaces, links, directories); [] when all is gone."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=self.timeout_s).stdout
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=self.timeout_s).stdout
        left = [f"namespace {n}" for n in re.findall(r"^(\S+)", listed, re.M) if self.tag in n]
        left += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if f"p2{self.tag}" in line]
        paths = [h.shm for h in self.hosts] + [ETC_NETNS / h.netns for h in self.hosts]
        return left + [f"path {p}" for p in paths if p.exists()]

    def close(self, check: bool = True) -> None:
        """Kill what runs in the star, remove everything it made; with `check`, assert nothing is left."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self._kill(None)
        finally:
            for ns in reversed(self.made):  # deleting a namespace deletes its end of each veth pair
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=self.timeout_s)
            self.made.clear()
            for h in self.hosts:
                shutil.rmtree(h.shm, ignore_errors=True)
                shutil.rmtree(ETC_NETNS / h.netns, ignore_errors=True)
            if self.made_etc:
                try:
                    ETC_NETNS.rmdir()
                except OSError:
                    pass  # another star (or the system) has its files there now
            for proc in self.procs:
                try:
                    proc.wait(timeout=self.timeout_s)
                except subprocess.TimeoutExpired:
                    pass
        if check:
            left = self.leftovers()
            assert not left, f"left behind: {', '.join(left)}"
