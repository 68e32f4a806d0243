"""ravenp2p: decentralized deep-learning training on contributors' spare compute."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["AsyncClient", "Client", "Job", "JobStatus", "load_model"]


def __getattr__(name: str) -> object:
    # The client pulls in trio and torch: only when asked for.
    if name in ("AsyncClient", "Client", "Job", "JobStatus"):
        from ravenp2p import client

        return getattr(client, name)
    if name == "load_model":
        from ravenp2p.training.model_file import load_model

        return load_model
    raise AttributeError(f"module 'ravenp2p' has no attribute {name!r}")
