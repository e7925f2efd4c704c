"""p2prl.bench.netns: stars of network-namespace hosts are built, shaped, reached and removed whole."""
import subprocess
import sys

import pytest

from p2prl.bench import netns
from p2prl.bench.netns import Star

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]

# A one-shot TCP echo: the server prints its port once listening, the client retries until it connects.
SERVER = ("import socket,sys; s=socket.create_server((sys.argv[1], 0)); print(s.getsockname()[1], flush=True); "
          "c,_=s.accept(); c.sendall(c.recv(64)); c.close()")
CLIENT = ("import socket,sys,time\nend=time.monotonic()+20\nwhile True:\n  try:\n"
          "    c=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); break\n"
          "  except OSError:\n    assert time.monotonic()<end; time.sleep(0.05)\n"
          "c.sendall(b'ping'); print(c.recv(64).decode())")


def _qdiscs(ns: str) -> str:
    return subprocess.run(["tc", "-n", ns, "qdisc", "show"], capture_output=True, text=True, timeout=30).stdout


def _echo(star: Star, server: int, client: int, name: str) -> str:
    srv = star.popen(server, [sys.executable, "-c", SERVER, star.hosts[server].addr], stdout=subprocess.PIPE, text=True)
    port = srv.stdout.readline().strip()
    out = star.run(client, [sys.executable, "-c", CLIENT, name, port], stdout=subprocess.PIPE, text=True)
    srv.wait(timeout=30)
    return out.stdout.strip()


def test_a_star_without_shaping_reaches_every_host_and_leaves_nothing():
    with Star(3, names={"head": 0}) as star:
        made = star.leftovers()
        assert sum(x.startswith("namespace") for x in made) == 4 and star.shaping is None
        assert not any(x.startswith("link") for x in made), "a link in the root namespace"
        assert "tbf" not in _qdiscs(star.hosts[0].netns)
        assert _echo(star, 0, 2, "head") == "ping"  # by name, through the switch
        assert _echo(star, 1, 0, star.hosts[1].addr) == "ping"
        # the host's own /dev/shm: a file made there is in its directory, not the machine's /dev/shm
        star.run(1, ["sh", "-c", "touch /dev/shm/p2prl-netns-probe"])
        assert (star.hosts[1].shm / "p2prl-netns-probe").exists() and not (star.hosts[0].shm / "p2prl-netns-probe").exists()
        sleeper = star.popen(2, ["sleep", "600"])
        tag = star.tag
    assert sleeper.poll() is not None, "a process outlived its star"
    assert tag not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert star.leftovers() == []


def test_a_shaped_star_has_tbf_on_both_ends_of_every_link_and_removes_it():
    with Star(2, rate="200mbit") as star:
        s = star.shaping
        assert s == {"rate": "200mbit", "burst": 25000, "limit": 25000 + 1250000}
        for h in star.hosts:
            assert "tbf" in _qdiscs(h.netns) and "rate 200Mbit" in _qdiscs(h.netns)
        assert _qdiscs(star.switch).count("tbf") == 2
        assert _echo(star, 1, 0, star.hosts[1].addr) == "ping"
        star.kill_host(1)
        assert star.pids(1) == []
    assert star.leftovers() == []


def test_rates_in_tc_units():
    assert netns.rate_bits("1gbit") == 1e9 and netns.rate_bits("2.5mbit") == 2.5e6 and netns.rate_bits(800) == 800
    for bad in ("fast", "0mbit", "10mbps"):
        with pytest.raises(ValueError):
            netns.rate_bits(bad)


def test_a_failed_build_removes_what_it_made():
    star = Star(2, rate="1gbit", burst=-5)  # tc refuses the burst once the namespaces exist
    with pytest.raises(RuntimeError, match="burst"):
        with star:
            pass
    assert star.leftovers() == []
