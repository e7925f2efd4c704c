"""p2prl: decentralized peer-to-peer reinforcement learning with all-reduce."""
__version__ = "0.1.0"
