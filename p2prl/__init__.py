"""p2prl: decentralized peer-to-peer reinforcement learning with all-reduce.

`p2prl.load(run_dir, checkpoint="latest")` gives a trained run's policy (see p2prl.policy); it is
imported on first use, so `import p2prl` stays cheap.
"""
__version__ = "0.1.0"
__all__ = ["Policy", "__version__", "load"]


def __getattr__(name: str):
    if name in ("load", "Policy"):
        from p2prl import policy
        return getattr(policy, name)
    raise AttributeError(f"module 'p2prl' has no attribute {name!r}")
