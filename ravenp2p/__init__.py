"""ravenp2p: decentralized deep-learning training on contributors' spare compute."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
