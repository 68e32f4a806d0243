"""`ravenp2p models list|get|publish` and `ravenp2p infer` against a real `ravenp2p node` daemon.

The daemon runs as its own process (so the daemon's wiring of the catalog is
what is tested); the commands run through the CLI's `main` in this process,
as in the wallet tests. A model the daemon publishes itself runs there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trio
from cli_run import cli, cli_json, one_line_error
from market_models import job_id_for, make_model

from ravenp2p.cli import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, build_parser, command_parsers, main
from ravenp2p.node.control import ControlError, control_request

CLI = [str(Path(sys.executable).with_name("ravenp2p"))]
COMMANDS = ("models", "models list", "models get", "models publish", "infer")


class Daemon:
    """A `ravenp2p node` process on a data dir; `restart` stops it and starts another."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab")
        self.process = subprocess.Popen([*CLI, "node", "--data-dir", str(self.data_dir)],
                                        stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the node exited"
            try:
                trio.run(control_request, self.data_dir, {"op": "status"})
                return
            except ControlError:
                time.sleep(0.1)
        raise AssertionError("the node did not start within 60 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    node = Daemon(tmp_path_factory.mktemp("cli") / "node")
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_every_marketplace_command_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    parsers = command_parsers(build_parser())
    for name in COMMANDS:
        description = parsers[name].description or ""
        assert description[:1].isupper() and description.endswith("."), name
        with pytest.raises(SystemExit) as done:
            main([*name.split(), "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: ravenp2p {name}")
        assert " ".join(description.split()[:4]) in " ".join(out.split())
    assert "--data-dir" in parsers["infer"].format_help()
    assert "--json" in parsers["models list"].format_help()


def test_without_a_node_each_command_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = ["--data-dir", str(tmp_path)]
    for argv in (["models", "list"], ["models", "get", "x"], ["infer", "x", "y.npy"],
                 ["models", "publish", "abc"]):
        code, out, err = cli(capsys, *argv, *nowhere)
        assert code == EXIT_UNREACHABLE and out == ""
        assert one_line_error(err).startswith(f"no node is running with data dir {tmp_path}")
    for argv in (["models", "publish"], ["models", "publish", "abc", "--file", "m.st"]):
        code, _, err = cli(capsys, *argv, *nowhere)
        assert code == EXIT_USAGE
        assert one_line_error(err) == "publish: give a JOB id or --file FILE (one of them)"


def test_publish_list_get_and_infer_through_the_daemon(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ["--data-dir", str(daemon.data_dir)]
    model = make_model(tmp_path / "model.safetensors", name="cli-job")
    row = cli_json(capsys, "models", "publish", "--file", str(model), "--name", "cli-digits",
                   "--license", "CC-BY-4.0", "--description", "a test model", *at)
    assert isinstance(row, dict)
    assert (row["name"], row["own"], row["fetched"], row["price"], row["license"]) == (
        "cli-digits", True, True, "0", "CC-BY-4.0")
    listed = cli_json(capsys, "models", "list", *at)
    assert isinstance(listed, list)
    assert [(r["name"], r["model"], r["input_dtype"]) for r in listed] == [
        ("cli-digits", row["model"], "uint8")]
    code, out, _ = cli(capsys, "models", "list", *at)
    assert code == EXIT_OK and "cli-digits" in out and "image 1x8x8 uint8" in out
    assert "published" in out and "CC-BY-4.0" in out and "free" in out
    assert cli_json(capsys, "models", "list", "--name", "nothing-like-it", *at) == []

    out_file = tmp_path / "got" / "digits.safetensors"
    got = cli_json(capsys, "models", "get", "cli-digits", "--out", str(out_file), "--onnx", *at)
    assert isinstance(got, dict)
    assert got["model"] == str(out_file) and out_file.read_bytes() == model.read_bytes()
    assert Path(got["spec"]).read_text().startswith('name = "cli-job"')
    assert Path(got["onnx"]).stat().st_size > 1000

    images = np.random.default_rng(5).integers(0, 17, size=(4, 1, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    np.savetxt(tmp_path / "images.csv", images.reshape(4, 64), fmt="%d", delimiter=",")
    from_npy = cli_json(capsys, "infer", "cli-digits", str(tmp_path / "images.npy"), *at)
    from_csv = cli_json(capsys, "infer", row["model"][:10], str(tmp_path / "images.csv"), *at)
    assert isinstance(from_npy, dict) and isinstance(from_csv, dict)
    assert from_npy["where"] == "local" and from_npy["batch"] == 4  # its own model runs there
    assert from_npy["predictions"] == from_csv["predictions"]
    assert len(from_npy["logits"]) == 4 and "outputs" not in from_npy
    assert [p["class"] for p in from_npy["predictions"]] == [
        int(np.argmax(row)) for row in from_npy["logits"]]
    code, out, _ = cli(capsys, "infer", "cli-digits", str(tmp_path / "images.npy"), *at)
    assert code == EXIT_OK and "ran here on 4 samples" in out and "probability" in out

    (tmp_path / "wrong.csv").write_text("1,2,3\n4,5,6\n")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    refusals = [
        (["infer", "cli-digits", "hello there"],
         "inputs: model cli-digits takes image inputs, not a text prompt"),
        (["infer", "cli-digits", str(tmp_path / "wrong.csv")],
         "inputs: model cli-digits takes samples of shape (1, 8, 8)"),
        (["infer", "cli-digits", str(tmp_path / "missing.npy")], "inputs: "),
        (["infer", "nothing", str(tmp_path / "images.npy")], "model: no model 'nothing'"),
        (["models", "get", "nothing"], "model: no model 'nothing'"),
        (["models", "publish", "--file", str(model), "--price", "1"],
         "price: a priced model is paid on-chain"),
        (["models", "publish", "--file", str(model), "--price", "-1"], "price: "),
        (["models", "publish", "--file", str(tmp_path / "junk.safetensors")], "file: "),
        (["models", "publish", "--file", str(model), "--name", "bad/name"], "name: "),
        (["models", "publish", "deadbeef"], "job: this node has no finished job 'deadbeef'"),
    ]
    for argv, reason in refusals:
        code, out, err = cli(capsys, *argv, *at)
        assert code == EXIT_USAGE and out == "", argv
        assert one_line_error(err).startswith(reason), (argv, err)

    # A finished job's model, as the node's requester saved it, is published by its job id.
    job_id = job_id_for("cli-job/0")
    (daemon.data_dir / "results" / job_id).mkdir(parents=True)
    shutil.copyfile(model, daemon.data_dir / "results" / job_id / "model.safetensors")
    by_job = cli_json(capsys, "models", "publish", job_id[:10], *at)
    assert isinstance(by_job, dict)
    assert (by_job["name"], by_job["job"], by_job["model"]) == ("cli-job", job_id, row["model"])

    # The catalog, the published models and their file outlive the daemon.
    daemon.restart()
    again = cli_json(capsys, "models", "list", *at)
    assert isinstance(again, list)
    assert [(r["name"], r["model"], r["own"]) for r in again] == [
        ("cli-digits", row["model"], True), ("cli-job", row["model"], True)]
    after = cli_json(capsys, "infer", "cli-digits", str(tmp_path / "images.npy"), *at)
    assert isinstance(after, dict) and after["predictions"] == from_npy["predictions"]
