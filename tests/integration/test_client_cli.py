"""A requester's whole path on a served devnet, as a person takes it: the plain-Python
client from a script, then the command line (`submit`, `status`, `jobs`, `fetch`).

`ravenp2p devnet --serve` runs as its own process (real libp2p nodes, the
embedded chain); the client and the commands reach its requester through the
control socket in its data dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
from integration.trained import QUICK_SPEC, digits_accuracy
from sklearn.datasets import load_digits

from ravenp2p.client import Client
from ravenp2p.training.model_file import load_model, read_model

SERVE_START_TIMEOUT_S = 120


def ravenp2p(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the command line as a user would, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "ravenp2p.cli", *args], capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A served devnet of 3 workers; what it printed once ready (data dir, bootstrap, ...)."""
    data_dir = tmp_path_factory.mktemp("served") / "requester"
    process = subprocess.Popen(
        [sys.executable, "-m", "ravenp2p.cli", "devnet", "--serve", "--nodes", "3", "--json",
         "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), True)
        text = ""
        info = None
        while info is None:
            line = process.stdout.readline()
            if not line:
                pytest.fail(f"the devnet exited before it was ready ({process.wait(10)})")
            text += line
            if line.startswith("}"):
                info = json.loads(text)
        yield info
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_a_script_and_the_command_line_train_and_fetch_a_model(
    devnet: dict[str, Any], tmp_path: Path
) -> None:
    data_dir = devnet["data_dir"]
    with Client(data_dir, start_node=False) as client:
        assert client.node_status()["peer_id"] == devnet["requester"]
        spec = tmp_path / "quick.toml"  # the quick job, stopped at a lower target to save time
        spec.write_text(QUICK_SPEC.read_text().replace("target_accuracy = 0.95",
                                                       "target_accuracy = 0.85"))
        job = client.submit(spec)
        status = job.wait(progress=True, timeout=300)
        assert status.state == "done", status.reason
        model = job.result()
        assert digits_accuracy(model) >= 0.8
        saved = job.save(tmp_path / "digits.safetensors")
        assert saved.with_suffix(".toml").read_text().startswith('name = "digits-quick"')
        assert read_model(saved).job_id == job.job_id
        images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
        assert torch.equal(load_model(saved)(images), model(images))
        assert status.settle_tx.startswith("0x") and status.accuracy >= 0.85

        # The trained model goes to the marketplace, and answers through it.
        published = job.publish("digits-demo", license="MIT")
        assert published["job"] == job.job_id and published["own"]
        assert [row["name"] for row in client.models("digits")] == ["digits-demo"]
        digits = np.asarray(load_digits().images[:6], dtype=np.uint8)[:, None]
        answer = client.infer("digits-demo", digits)
        with torch.no_grad():
            expected = model(torch.from_numpy(digits))
        assert [row["class"] for row in answer["predictions"]] == expected.argmax(1).tolist()
        np.testing.assert_allclose(answer["outputs"], expected.numpy(), atol=1e-5)
        assert answer["paid"] == "0"
        copy = client.fetch_model("digits-demo", tmp_path / "market" / "digits.safetensors")
        assert read_model(copy).job_id == job.job_id

    listed = ravenp2p("jobs", "--json", "--data-dir", data_dir)
    assert listed.returncode == 0, listed.stderr
    assert [row["job_id"] for row in json.loads(listed.stdout)] == [job.job_id]

    shown = ravenp2p("status", job.job_id[:12], "--json", "--data-dir", data_dir)
    assert shown.returncode == 0, shown.stderr
    status_json = json.loads(shown.stdout)
    assert status_json["state"] == "done" and status_json["accuracy"] >= 0.85
    human = ravenp2p("status", job.job_id[:12], "--data-dir", data_dir)
    assert f"job       {job.job_id}" in human.stdout and "state     done" in human.stdout

    out = tmp_path / "fetched" / "model.safetensors"
    fetched = ravenp2p("fetch", job.job_id, "--out", str(out), "--onnx", "--json",
                       "--data-dir", data_dir)
    assert fetched.returncode == 0, fetched.stderr
    written = json.loads(fetched.stdout)
    assert written == {"job_id": job.job_id, "model": str(out),
                       "spec": str(out.with_suffix(".toml")), "onnx": str(out.with_suffix(".onnx"))}
    module = load_model(out)
    images = np.random.default_rng(0).integers(0, 17, size=(5, 1, 8, 8), dtype=np.uint8)
    session = onnxruntime.InferenceSession(str(out.with_suffix(".onnx")))
    (onnx_out,) = session.run(None, {"input": images})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, module(torch.from_numpy(images)).numpy(),
                                   atol=1e-5)

    # A submission the network refuses, and bad input: one line each, exit codes as documented.
    too_dear = tmp_path / "dear.toml"
    too_dear.write_text(QUICK_SPEC.read_text().replace('budget = "0.7"', 'budget = "5000"'))
    refused = ravenp2p("submit", str(too_dear), "--data-dir", data_dir)
    assert refused.returncode == 1
    assert refused.stderr.startswith("ravenp2p: error: the job was not submitted")
    typo = tmp_path / "typo.toml"
    typo.write_text(QUICK_SPEC.read_text().replace("redundancy", "redundnacy"))
    bad = ravenp2p("submit", str(typo), "--data-dir", data_dir)
    assert bad.returncode == 2 and "did you mean 'redundancy'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = ravenp2p("status", "ffff", "--data-dir", data_dir)
    assert missing.returncode == 2 and "no job 'ffff'" in missing.stderr


def test_a_client_starts_its_own_node_and_stops_it(devnet: dict[str, Any], tmp_path: Path) -> None:
    client = Client(tmp_path / "own", bootstrap=[devnet["bootstrap"]])
    try:
        process = client.aio.process
        assert process is not None and process.poll() is None
        status = client.node_status()
        assert status["peer_id"] not in (devnet["requester"], *devnet["workers"])
        assert status["chain_id"] is None
        assert client.jobs() == []
    finally:
        client.close()
    assert process.poll() is not None  # stopped by close(), not left behind
    with pytest.raises(Exception, match="no node is running"):
        Client(tmp_path / "own", start_node=False)
