"""Agreeing on the configuration: every peer must run the same config, or none of them starts."""
from __future__ import annotations

from typing import Any, Optional

from p2prl.checks import ConfigError
from p2prl.comm.base import Communicator
from p2prl.comm.store import gather_before_start
from p2prl.host import torchrun_world

_EXCHANGED: set[str] = set()  # the start-up exchanges this process took part in


def differing_keys(everyone: list[dict[str, Any]]) -> list[str]:
    """Keys whose value is not the same in every peer's flat config."""
    diffs: set[str] = set()
    for other in everyone:
        keys = set(other) | set(everyone[0])
        diffs |= {k for k in keys if other.get(k) != everyone[0].get(k)}
    return sorted(diffs)


def _differs(keys: list[str]) -> ConfigError:
    return ConfigError("config", "differs between peers",
                       f"every peer must compose the same config; differing keys: {', '.join(keys[:8])}")


def agree_on_config(comm: Communicator, flat: dict[str, Any]) -> None:
    """Fail on every peer, naming the keys, if the peers did not compose the same config."""
    keys = differing_keys(comm.all_gather_object(flat))
    if keys:
        raise _differs(keys)


def agree_before_start(error: Optional[str], configs: list[dict[str, Any]], timeout_s: float,
                       tag: str = "command-line") -> Optional[str]:
    """The one error every peer stops with before training, or None: the lowest rank's own validation
    error, else the keys in which the peers' configs (one flat dict per job) differ.

    Runs through the launcher's store, before any process group exists, so every peer exits alike;
    `tag` names the exchange, which happens once per process: asked again (an error after the
    exchange, which every peer meets alike), the peer's own `error` stands.
    """
    rank, _, world_size = torchrun_world()
    if world_size == 1 or tag in _EXCHANGED:
        return error
    _EXCHANGED.add(tag)
    everyone = gather_before_start(rank, world_size, {"error": error, "configs": configs}, timeout_s, tag)
    if everyone is None:
        return error
    for r, peer in enumerate(everyone):
        if peer["error"]:
            return peer["error"] if r == 0 else f"rank {r}: {peer['error']}"
    for job in range(min(len(peer["configs"]) for peer in everyone)):
        keys = differing_keys([peer["configs"][job] for peer in everyone])
        if keys:
            return str(_differs(keys))
    return None
