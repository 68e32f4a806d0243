"""The compiled contracts (ABI and bytecode) shipped inside the package.

`contracts/build.js` compiles `contracts/*.sol` with the pinned compiler and
writes one JSON file per contract into `ravenp2p/chain/artifacts/`; they are
committed, so installing the package is enough to deploy and talk to the
contracts.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ravenp2p.chain.base import ChainError

CONTRACT_NAMES = ("RavenToken", "StakeRegistry", "JobEscrow", "PriceFeed")


@dataclass(frozen=True)
class Artifact:
    """One compiled contract: what web3 needs to deploy it and to call it."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    deployed_bytecode: str


@functools.cache
def load_artifact(name: str) -> Artifact:
    """The artifact of contract `name` (one of `CONTRACT_NAMES`), read once and cached."""
    if name not in CONTRACT_NAMES:
        raise ValueError(f"unknown contract {name!r}; expected one of {', '.join(CONTRACT_NAMES)}")
    resource = resources.files("ravenp2p.chain").joinpath("artifacts", f"{name}.json")
    try:
        data = json.loads(resource.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChainError(
            f"contract artifact artifacts/{name}.json is missing from the ravenp2p.chain "
            "package; build the contracts with 'make contracts'"
        ) from None
    except (OSError, ValueError) as exc:
        raise ChainError(f"contract artifact artifacts/{name}.json is unreadable: {exc}") from exc
    try:
        abi, bytecode, deployed = data["abi"], data["bytecode"], data["deployedBytecode"]
    except (KeyError, TypeError) as exc:
        raise ChainError(f"contract artifact artifacts/{name}.json lacks {exc}") from None
    if not isinstance(abi, list) or not all(isinstance(b, str) for b in (bytecode, deployed)):
        raise ChainError(f"contract artifact artifacts/{name}.json has malformed abi or bytecode")
    if not bytecode.startswith("0x"):
        bytecode = "0x" + bytecode
    if not deployed.startswith("0x"):
        deployed = "0x" + deployed
    return Artifact(name, abi, bytecode, deployed)
