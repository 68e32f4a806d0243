"""The committed contract artifacts are exactly what the pinned compiler builds from the sources.

The Python side deploys and calls the contracts through `ravenp2p/chain/artifacts/`, so an edit
to a `.sol` file that was not followed by `make contracts` would silently test and ship stale
bytecode. These tests rebuild into a temporary folder and compare byte for byte, and check that
every artifact's recorded source digests match the files on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "ravenp2p" / "chain" / "artifacts"
NODE_MODULES = ROOT / "node_modules"
EXPECTED = {"RavenToken.json", "StakeRegistry.json", "JobEscrow.json"}
REBUILD_HINT = "run `make contracts` and commit ravenp2p/chain/artifacts/"

needs_node_modules = pytest.mark.skipif(
    not (NODE_MODULES / "@openzeppelin" / "contracts" / "package.json").is_file(),
    reason="node_modules/@openzeppelin/contracts is missing (run `npm ci`)",
)


def artifact_files(root: Path) -> list[Path]:
    """Every artifact under `root`, relative to it, in a stable order."""
    return sorted(path.relative_to(root) for path in root.rglob("*.json"))


def sha256_file(path: Path) -> str | None:
    """The file's sha256, or None when it is missing."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def on_disk(source: str) -> Path:
    """Where a source unit name recorded in an artifact lives in this checkout."""
    return ROOT / source if source.startswith("contracts/") else NODE_MODULES / source


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh build of all contracts into a temporary folder."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("`node` is not on PATH: cannot rebuild the contracts")
    if not (NODE_MODULES / "solc" / "package.json").is_file():
        pytest.skip("node_modules/solc is missing (run `npm ci`): cannot rebuild the contracts")
    out = tmp_path_factory.mktemp("artifacts")
    result = subprocess.run(
        [node, str(ROOT / "contracts" / "build.js"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"contracts/build.js failed:\n{result.stderr}")
    return out


def test_committed_artifacts_are_the_ones_a_rebuild_writes(rebuilt: Path) -> None:
    committed = artifact_files(ARTIFACTS)
    fresh = artifact_files(rebuilt)
    assert committed == fresh, f"artifact set differs from a fresh build; {REBUILD_HINT}"
    assert {path.name for path in committed} >= EXPECTED


def test_committed_artifacts_match_a_rebuild_byte_for_byte(rebuilt: Path) -> None:
    stale = [
        str(relative)
        for relative in artifact_files(rebuilt)
        if not (ARTIFACTS / relative).is_file()
        or (ARTIFACTS / relative).read_bytes() != (rebuilt / relative).read_bytes()
    ]
    assert not stale, f"artifacts out of date with their sources: {stale}; {REBUILD_HINT}"


@needs_node_modules
@pytest.mark.parametrize("relative", artifact_files(ARTIFACTS), ids=str)
def test_recorded_source_digests_match_the_sources_on_disk(relative: Path) -> None:
    artifact = json.loads((ARTIFACTS / relative).read_text())
    sources: dict[str, str] = artifact["sources"]
    assert artifact["sourceName"] in sources
    assert any(not name.startswith("contracts/") for name in sources), "no library sources"
    changed = [name for name, digest in sources.items() if sha256_file(on_disk(name)) != digest]
    assert not changed, f"{relative}: sources changed since the build: {changed}; {REBUILD_HINT}"
    listing = "".join(f"{name}:{sources[name]}\n" for name in sorted(sources))
    assert artifact["sourceDigest"] == hashlib.sha256(listing.encode()).hexdigest()


@pytest.mark.parametrize("relative", artifact_files(ARTIFACTS), ids=str)
def test_artifacts_carry_what_deployment_needs(relative: Path) -> None:
    artifact = json.loads((ARTIFACTS / relative).read_text())
    assert artifact["contractName"] == relative.stem
    for field in ("bytecode", "deployedBytecode"):
        code = artifact[field]
        assert code.startswith("0x") and len(code) > 2, f"{relative}: empty {field}"
        bytes.fromhex(code[2:])
    assert any(entry["type"] == "function" for entry in artifact["abi"])
    settings = artifact["compiler"]["settings"]
    assert settings["evmVersion"] == "prague"
    assert settings["optimizer"] == {"enabled": True, "runs": 200}
    assert artifact["compiler"]["version"].startswith("0.8.28+")
