"""Turn what web3.py and its backends raise into the `Chain` interface's errors.

A contract refusal reaches Python in different shapes: eth-tester raises its
own `TransactionFailed` whose message holds either the decoded revert string
or the repr of the raw revert bytes, a JSON-RPC node answers with an error that
web3 turns into `ContractLogicError` carrying the revert data as hex. Both are
reduced here to the raw revert data (or the already decoded string) and
decoded against the ABIs of the contracts, so `ContractReverted.reason`
reads the same whichever backend raised it.
"""

from __future__ import annotations

import ast
import functools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import requests
from eth_abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from eth_abi.grammar import ABIType, TupleType, parse
from eth_utils import ValidationError, to_checksum_address
from eth_utils.abi import (
    abi_to_signature,
    function_signature_to_4byte_selector,
    get_abi_input_types,
)
from web3.exceptions import (
    ContractLogicError,
    ProviderConnectionError,
    TimeExhausted,
    Web3Exception,
    Web3RPCError,
)

from ravenp2p.chain.base import ChainError, ContractReverted

ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
PANIC_SELECTOR = bytes.fromhex("4e487b71")  # Panic(uint256)

PANIC_REASONS: Mapping[int, str] = {
    0x00: "generic panic",
    0x01: "assertion failed",
    0x11: "arithmetic overflow",
    0x12: "division by zero",
    0x21: "invalid enum value",
    0x22: "corrupt storage byte array",
    0x31: "pop from an empty array",
    0x32: "array index out of bounds",
    0x41: "out of memory",
    0x51: "call to an uninitialized function",
}

_TESTER_PREFIX = "execution reverted: "


def _format_value(abi_type: ABIType, value: Any) -> str:
    if abi_type.is_array:
        assert abi_type.item_type is not None
        return "[" + ", ".join(_format_value(abi_type.item_type, v) for v in value) + "]"
    if isinstance(abi_type, TupleType):
        parts = (_format_value(t, v) for t, v in zip(abi_type.components, value, strict=True))
        return "(" + ", ".join(parts) + ")"
    if abi_type.base == "address":
        return str(to_checksum_address(value))
    if abi_type.base == "bytes":
        return "0x" + bytes(value).hex()
    if abi_type.base == "bool":
        return "true" if value else "false"
    if abi_type.base == "string":
        return json.dumps(value)
    return str(value)


class RevertDecoder:
    """Decodes revert data by its 4-byte selector against a set of contract ABIs."""

    def __init__(self, abis: Iterable[Sequence[Mapping[str, Any]]]) -> None:
        self._errors: dict[bytes, tuple[str, list[str], list[str]]] = {}
        for abi in abis:
            for entry in abi:
                if entry.get("type") != "error":
                    continue
                signature = abi_to_signature(entry)  # type: ignore[arg-type]
                selector = function_signature_to_4byte_selector(signature)
                inputs = entry.get("inputs", [])
                names = [item.get("name") or f"arg{i}" for i, item in enumerate(inputs)]
                types = list(get_abi_input_types(entry))  # type: ignore[arg-type]
                self._errors[selector] = (str(entry["name"]), names, types)

    def decode(self, data: bytes) -> str:
        """The reason for raw revert data: `Name(arg=value, ...)`, a string, or a panic."""
        if not data:
            return "reverted without a reason"
        selector, body = data[:4], data[4:]
        try:
            if selector == ERROR_STRING_SELECTOR:
                return str(abi_decode(["string"], body)[0])
            if selector == PANIC_SELECTOR:
                code = int(abi_decode(["uint256"], body)[0])
                return f"Panic(0x{code:02x}: {PANIC_REASONS.get(code, 'unknown panic code')})"
            known = self._errors.get(selector)
            if known is not None:
                name, names, types = known
                values = abi_decode(types, body)
                args = ", ".join(
                    f"{n}={_format_value(parse(t), v)}"
                    for n, t, v in zip(names, types, values, strict=True)
                )
                return f"{name}({args})"
        except DecodingError:
            return f"malformed revert data 0x{data.hex()}"
        return f"unknown error 0x{selector.hex()} (data 0x{data.hex()})"


@functools.cache
def default_decoder() -> RevertDecoder:
    """The decoder for the errors of RavenToken, StakeRegistry and JobEscrow together."""
    from ravenp2p.chain.artifacts import CONTRACT_NAMES, load_artifact

    return RevertDecoder(load_artifact(name).abi for name in CONTRACT_NAMES)


def _hex_to_bytes(text: str) -> bytes | None:
    if not text.startswith("0x"):
        return None
    try:
        return bytes.fromhex(text[2:])
    except ValueError:
        return None


def revert_data(exc: BaseException) -> bytes | str | None:
    """The raw revert data (or an already decoded revert string) that `exc` carries.

    None when `exc` is not a contract revert at all.
    """
    if isinstance(exc, ContractLogicError):
        data = exc.data
        if isinstance(data, Mapping):
            data = data.get("data")
        if isinstance(data, str):
            raw = _hex_to_bytes(data)
            if raw is not None:
                return raw
        return exc.message or "reverted without a reason"
    if type(exc).__name__ == "TransactionFailed":  # eth-tester, an optional dependency
        message = exc.args[0] if exc.args else ""
        if isinstance(message, Exception):
            message = message.args[0] if message.args else ""
        if isinstance(message, bytes):
            return message
        text = str(message).removeprefix(_TESTER_PREFIX)
        if text[:2] in ("b'", 'b"'):
            try:
                literal = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
            if isinstance(literal, bytes):
                return literal
        return text
    return None


def revert_reason(exc: BaseException, decoder: RevertDecoder | None = None) -> str | None:
    """The decoded reason of a contract revert, or None when `exc` is something else."""
    data = revert_data(exc)
    if data is None:
        return None
    if isinstance(data, str):
        return data
    return (decoder or default_decoder()).decode(data)


def endpoint_of(w3: Any) -> str:
    """A name for the chain `w3` talks to, for error messages: its URL or 'embedded chain'."""
    uri = getattr(w3.provider, "endpoint_uri", None)
    return str(uri) if uri else "embedded chain"


@contextmanager
def chain_errors(w3: Any, contract: str, function: str) -> Iterator[None]:
    """Re-raise reverts as `ContractReverted`; unreachable nodes and refusals as `ChainError`.

    A refusal is the node (or eth-tester) rejecting a request outright, e.g. a
    transaction the account cannot pay gas for.
    """
    try:
        yield
    except ChainError:
        raise
    except (requests.ConnectionError, requests.Timeout, ProviderConnectionError) as exc:
        raise ChainError(
            f"{contract}.{function}: cannot reach the Ethereum node at {endpoint_of(w3)}: {exc}"
        ) from exc
    except TimeExhausted as exc:
        raise ChainError(
            f"{contract}.{function}: transaction not mined at {endpoint_of(w3)}: {exc}"
        ) from exc
    except Exception as exc:
        reason = revert_reason(exc)
        if reason is not None:
            raise ContractReverted(contract, function, reason) from exc
        if isinstance(exc, Web3RPCError | ValidationError):  # the node or eth-tester said no
            raise ChainError(f"{contract}.{function}: {endpoint_of(w3)} refused: {exc}") from exc
        if isinstance(exc, requests.RequestException | Web3Exception | json.JSONDecodeError):
            # An HTTP error status, a malformed answer, ...: the node failed, not the caller.
            raise ChainError(f"{contract}.{function}: {endpoint_of(w3)} failed: {exc}") from exc
        raise
