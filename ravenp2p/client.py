"""The requester's Python API: submit a training job, follow it, get the trained model back.

A client drives a ravenp2p node on this machine (the node is the requester on
the network: it cuts the shards, pays the escrow, serves the data and scores
the holdout) through the node's control socket. When no node runs on the
data dir, the client starts one with the given bootstrap peers and chain, and
stops it again on `close()`. Start `ravenp2p node` yourself to keep jobs
followed after your script ends.

Plain Python (scripts, notebooks)::

    from ravenp2p import Client

    with Client(bootstrap=["/ip4/10.0.0.5/tcp/47001/p2p/16Uiu2..."],
                chain="http://127.0.0.1:8545", contracts="deployment.json") as client:
        job = client.submit("examples/jobs/digits.toml")
        job.wait(progress=True)
        model = job.result()            # a torch.nn.Module with the trained weights
        job.save("digits.safetensors")  # and digits.toml beside it

trio code uses `AsyncClient`, whose methods are the same, awaited::

    async with AsyncClient(data_dir) as client:
        job = await client.submit(spec)
        status = await job.wait()
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import trio

from ravenp2p.node.control import (
    HANDLER_TIMEOUT_S,
    ControlError,
    RequestRefused,
    control_request,
    socket_path,
)
from ravenp2p.node.datadir import DEFAULT_DATA_DIR

NODE_START_TIMEOUT_S = 60.0
NODE_STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.5
SUBMIT_TIMEOUT_S = 630.0
"""A little longer than the node gives a submission, so the node's own error arrives first."""

_P = ParamSpec("_P")
_T = TypeVar("_T")


class ClientError(RuntimeError):
    """The client could not do what was asked; the message says why."""


class JobFailed(ClientError):
    """The job ended without a result to hand back (failed, lost, or no weights)."""


@dataclass(frozen=True)
class JobStatus:
    """A job as its requester sees it. Amounts are decimal strings of RAVEN."""

    job_id: str
    created_ms: int
    """When the requester prepared the job (Unix time in milliseconds)."""
    name: str
    model: str
    state: str
    """running, cancelling, done, cancelled, failed, or lost (the node stopped following it)."""
    master: str
    round: int
    """Rounds recorded so far (when ended: the rounds the job ran)."""
    max_rounds: int
    accuracy: float | None
    """Latest holdout accuracy (classification), None before the first evaluation."""
    loss: float | None
    evaluated_round: int | None
    calculations_accepted: int
    results_paid: int
    results_rejected: int | None
    """Known once the job ended."""
    verified_per_s: float
    paid: bool
    spent: str | None
    """RAVEN the accepted work costs so far, margin included (None: unpaid job)."""
    budget: str
    elapsed_s: float
    failovers: int
    reason: str
    """Why it ended (empty while it runs)."""
    settle_tx: str
    model_file: str | None
    """The saved model file on the node's machine, once the job ended."""

    @property
    def ended(self) -> bool:
        return self.state not in ("running", "cancelling")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobStatus:
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class AsyncJob:
    """A submitted job, for trio code: status, wait, result, save, cancel."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self.client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"<Job {self.job_id[:16]}>"

    async def status(self) -> JobStatus:
        """The job's status now."""
        return JobStatus.from_dict(await self.client.request({"op": "job", "job": self.job_id}))

    async def wait(
        self, progress: bool = False, timeout: float | None = None,
        poll_interval: float = POLL_INTERVAL_S,
    ) -> JobStatus:
        """Wait until the job ends (`trio.TooSlowError` after `timeout` seconds, if given).

        With `progress`, a progress bar on stderr shows the round, the holdout
        accuracy or loss, verified calculations per second and RAVEN spent.
        Returns the final status, whatever the outcome: check `state`.
        """
        from ravenp2p.progress import JobProgress

        with trio.fail_after(float("inf") if timeout is None else timeout):
            status = await self.status()
            title = f"{status.name} ({status.model})"
            with JobProgress(title) if progress else nullcontext() as bar:
                while True:
                    if bar is not None:
                        bar.update(status.to_dict())
                    if status.ended:
                        return status
                    await trio.sleep(poll_interval)
                    status = await self.status()

    async def result(self, timeout: float | None = None) -> Any:
        """The trained `torch.nn.Module` (waiting for the end of the job first).

        Its weights are the job's final ones; it takes inputs as the job's
        data holds them (see `ravenp2p.training.model_file`). A cancelled job
        returns the weights it reached. `JobFailed` when there are none.
        """
        from ravenp2p.training.model_file import load_model

        return await trio.to_thread.run_sync(load_model, await self._model_file(timeout))

    async def save(self, path: str | Path, timeout: float | None = None) -> Path:
        """Write the model file (safetensors with its spec) to `path`, the spec as TOML beside it.

        Returns the model file's path; the spec goes to the same name ending in `.toml`.
        """
        from ravenp2p.training.model_file import copy_model

        model_file = await self._model_file(timeout)
        return await trio.to_thread.run_sync(copy_model, model_file, Path(path))

    async def cancel(self, reason: str = "") -> JobStatus:
        """Ask the master to stop after the round in progress.

        A paid job then settles what was accepted so far and the escrow refunds
        the rest of the deposit to you; `wait()` for the end.
        """
        request = {"op": "cancel", "job": self.job_id, "reason": reason}
        return JobStatus.from_dict(await self.client.request(request))

    async def publish(
        self, name: str | None = None, *, license: str = "", price: str = "0",
        description: str = "",
    ) -> dict[str, Any]:
        """Publish the job's trained model in the marketplace (see `AsyncClient.publish`)."""
        return await self.client.publish(self.job_id, name=name, license=license, price=price,
                                         description=description)

    async def _model_file(self, timeout: float | None) -> Path:
        status = await self.wait(timeout=timeout)
        if status.model_file is None:
            raise JobFailed(f"job {self.job_id[:16]} ended {status.state} without weights: "
                            f"{status.reason}")
        return Path(status.model_file)


class AsyncClient:
    """The requester's API for trio code; see the module docs. Use `async with`."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        bootstrap: Sequence[str] = (),
        chain: str | None = None,
        contracts: str | Path | None = None,
        listen: Sequence[str] = (),
        start_node: bool = True,
        node_start_timeout: float = NODE_START_TIMEOUT_S,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser() if data_dir else DEFAULT_DATA_DIR
        self.bootstrap = tuple(bootstrap)
        self.chain = chain
        self.contracts = Path(contracts) if contracts is not None else None
        self.listen = tuple(listen)
        self.start_node = start_node
        self.node_start_timeout = node_start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        """The node this client started (None: it uses one that was running)."""

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def log_path(self) -> Path:
        """Where a node this client starts writes its log."""
        return self.data_dir / "node.log"

    async def connect(self) -> dict[str, Any]:
        """Make sure a node runs on the data dir (starting one if allowed); its status."""
        try:
            return await self.node_status()
        except ControlError:
            if not self.start_node or self.process is not None:
                raise
        self._spawn_node()
        with trio.move_on_after(self.node_start_timeout):
            while True:
                await trio.sleep(0.2)
                if self.process is not None and self.process.poll() is not None:
                    raise ClientError(f"the node exited with status {self.process.returncode}: "
                                      f"{self._log_tail()}")
                if socket_path(self.data_dir).exists():
                    try:
                        return await self.node_status()
                    except ControlError:
                        continue
        await self.close()
        raise ClientError(f"the node did not start within {self.node_start_timeout:.0f} s: "
                          f"{self._log_tail()}")

    def _spawn_node(self) -> None:
        command = [sys.executable, "-m", "ravenp2p.cli", "node", "--data-dir", str(self.data_dir)]
        for addr in self.bootstrap:
            command += ["--bootstrap", addr]
        for addr in self.listen:
            command += ["--listen", addr]
        if self.chain is not None:
            command += ["--chain", self.chain]
        if self.contracts is not None:
            command += ["--contracts", str(self.contracts)]
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in a notebook is not meant for the node
            )

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(tail) or "(empty log)"

    async def close(self) -> None:
        """Stop the node this client started, if it did (SIGTERM, then SIGKILL)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        if not await _exited(process, NODE_STOP_TIMEOUT_S):
            process.kill()
            await _exited(process, NODE_STOP_TIMEOUT_S)

    async def request(
        self, request: dict[str, Any], timeout: float = HANDLER_TIMEOUT_S + 5.0
    ) -> Any:
        """One control request to the node; `ClientError` with the node's reason if refused."""
        try:
            return await control_request(self.data_dir, request, timeout)
        except RequestRefused as exc:
            error = ValueError if exc.kind == "invalid" else ClientError
            raise error(str(exc)) from None

    async def node_status(self) -> dict[str, Any]:
        """The node's peer id, address, listen addresses, peers and chain."""
        status: dict[str, Any] = await self.request({"op": "status"})
        return status

    async def submit(self, spec: Any, *, master: str | None = None) -> AsyncJob:
        """Submit a job: a `JobSpec` or the path of a job spec TOML file.

        Returns once the master accepted it (shards cut and published, a paid
        job's budget deposited). `ValueError` names an invalid spec field;
        `ClientError` says why the network or the chain refused.
        """
        from ravenp2p.training.spec import JobSpec, load_job_spec

        if isinstance(spec, str | Path | os.PathLike):
            spec = await trio.to_thread.run_sync(load_job_spec, Path(spec))
        if not isinstance(spec, JobSpec):
            raise TypeError(f"spec must be a JobSpec or a path, not {type(spec).__name__}")
        request = {"op": "submit", "spec": spec.to_dict(), "master": master}
        status = await self.request(request, timeout=SUBMIT_TIMEOUT_S)
        return AsyncJob(self, status["job_id"])

    async def job(self, job_id: str) -> AsyncJob:
        """A job this node submitted, by its id or a unique prefix of it."""
        status = await self.request({"op": "job", "job": job_id})
        return AsyncJob(self, status["job_id"])

    async def jobs(self) -> list[JobStatus]:
        """Every job this node submitted (those of earlier runs too), oldest first."""
        return [JobStatus.from_dict(row) for row in await self.request({"op": "jobs"})]

    # --- the model marketplace -------------------------------------------------------------
    async def models(self, name: str | None = None) -> list[dict[str, Any]]:
        """The models this node has heard of (optionally those whose name holds `name`).

        Each row has the model's name, publisher, digest, task and input shape,
        holdout metrics, license and price per call (RAVEN), among others.
        """
        request: dict[str, Any] = {"op": "models"}
        if name is not None:
            request["name"] = name
        rows: list[dict[str, Any]] = await self.request(request)
        return rows

    async def publish(
        self, job_or_file: str | Path, *, name: str | None = None, license: str = "",
        price: str = "0", description: str = "",
    ) -> dict[str, Any]:
        """Publish a finished job's model (its id) or a model file (a `Path`) to the network.

        This node then serves it: others fetch it, and call it at `price` RAVEN
        per call (a decimal string; "0" is free). Returns the published row.
        """
        from ravenp2p.market.role import PUBLISH_TIMEOUT_S

        request: dict[str, Any] = {"op": "model_publish", "license": license, "price": price,
                                   "description": description}
        if isinstance(job_or_file, Path):
            request["file"] = _absolute(job_or_file)
        else:
            request["job"] = job_or_file
        if name is not None:
            request["name"] = name
        row: dict[str, Any] = await self.request(request, timeout=PUBLISH_TIMEOUT_S + 5.0)
        return row

    async def fetch_model(self, model: str, path: str | Path | None = None) -> Path:
        """Fetch a published model (NAME, NAME@PEER or its digest), verified by its digest.

        With `path`, a copy (and its spec as TOML) is written there; returns
        the model file's path, which `ravenp2p.load_model` opens.
        """
        from ravenp2p.market.role import GET_TIMEOUT_S

        request: dict[str, Any] = {"op": "model_get", "model": model}
        if path is not None:
            request["out"] = _absolute(path)
        got = await self.request(request, timeout=GET_TIMEOUT_S + 30.0)
        return Path(got["out"] or got["file"])

    async def infer(
        self, model: str, inputs: Any, *, local: bool = False, max_price: str = "0",
    ) -> dict[str, Any]:
        """Run a published model on `inputs`: on the peer that serves it, or here (`local`).

        `inputs` is an array (or tensor) of samples shaped as the model takes
        them, or a text prompt for a text model. A priced model is paid per call
        from this node's wallet, only up to `max_price` RAVEN (default: refuse to
        pay). Returns `predictions` (per sample), `outputs` (an array), `paid`
        and `payment_tx`, among others.
        """
        import base64

        import numpy as np

        from ravenp2p.market.role import INFER_TIMEOUT_S
        from ravenp2p.training.tensors import decode_tensors, encode_tensors

        request: dict[str, Any] = {"op": "infer", "model": model, "local": local,
                                   "max_price": max_price}
        if isinstance(inputs, str):
            request["text"] = inputs
        else:
            array = np.asarray(inputs.detach().cpu().numpy() if hasattr(inputs, "detach")
                               else inputs)
            request["inputs"] = base64.b64encode(encode_tensors({"input": array})).decode()
        result: dict[str, Any] = await self.request(request, timeout=INFER_TIMEOUT_S + 30.0)
        result["outputs"] = decode_tensors(base64.b64decode(result["outputs"]))["output"]
        return result


def _absolute(path: str | Path) -> str:
    """`path` for the node, which may run in another folder: `~` expanded, made absolute."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


async def _exited(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to `timeout` for `process` to exit (through a pidfd: no polling); reap it."""
    if process.poll() is not None:
        return True
    pidfd = os.pidfd_open(process.pid)
    try:
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return process.poll() is not None


def _blocking(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, _T]:
    """A sync method that runs the async one to completion in its own trio run."""

    @functools.wraps(method)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return trio.run(functools.partial(method, *args, **kwargs))

    return run


class Job:
    """A submitted job, for plain Python: the `AsyncJob` methods, blocking."""

    def __init__(self, job: AsyncJob) -> None:
        self.aio = job
        """The same job for trio code."""
        self.job_id = job.job_id

    def __repr__(self) -> str:
        return f"<Job {self.job_id[:16]}>"

    def status(self) -> JobStatus:
        """The job's status now (see `AsyncJob.status`)."""
        return _blocking(self.aio.status)()

    def wait(self, progress: bool = False, timeout: float | None = None) -> JobStatus:
        """Wait until the job ends, optionally with a progress bar (see `AsyncJob.wait`)."""
        return _blocking(self.aio.wait)(progress, timeout)

    def result(self, timeout: float | None = None) -> Any:
        """The trained torch module (see `AsyncJob.result`)."""
        return _blocking(self.aio.result)(timeout)

    def save(self, path: str | Path, timeout: float | None = None) -> Path:
        """Write the model file and its spec (see `AsyncJob.save`)."""
        return _blocking(self.aio.save)(path, timeout)

    def cancel(self, reason: str = "") -> JobStatus:
        """Ask the master to stop after the round in progress (see `AsyncJob.cancel`)."""
        return _blocking(self.aio.cancel)(reason)

    def publish(
        self, name: str | None = None, *, license: str = "", price: str = "0",
        description: str = "",
    ) -> dict[str, Any]:
        """Publish the job's trained model in the marketplace (see `AsyncClient.publish`)."""
        return _blocking(self.aio.publish)(name, license=license, price=price,
                                           description=description)


class Client:
    """The requester's API for plain Python; see the module docs. Use `with`, or `close()`.

    >>> client = Client("~/.ravenp2p")                      # doctest: +SKIP
    >>> job = client.submit("examples/jobs/digits.toml")    # doctest: +SKIP
    >>> job.wait(progress=True).accuracy                    # doctest: +SKIP
    0.97
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        bootstrap: Sequence[str] = (),
        chain: str | None = None,
        contracts: str | Path | None = None,
        listen: Sequence[str] = (),
        start_node: bool = True,
        node_start_timeout: float = NODE_START_TIMEOUT_S,
    ) -> None:
        self.aio = AsyncClient(
            data_dir, bootstrap=bootstrap, chain=chain, contracts=contracts, listen=listen,
            start_node=start_node, node_start_timeout=node_start_timeout,
        )
        """The same client for trio code."""
        _blocking(self.aio.connect)()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the node this client started, if it did."""
        _blocking(self.aio.close)()

    def node_status(self) -> dict[str, Any]:
        """The node's peer id, address, listen addresses, peers and chain."""
        return _blocking(self.aio.node_status)()

    def submit(self, spec: Any, *, master: str | None = None) -> Job:
        """Submit a job spec (a `JobSpec` or a TOML file's path); see `AsyncClient.submit`."""
        return Job(_blocking(self.aio.submit)(spec, master=master))

    def job(self, job_id: str) -> Job:
        """A job this node submitted, by its id or a unique prefix of it."""
        return Job(_blocking(self.aio.job)(job_id))

    def jobs(self) -> list[JobStatus]:
        """Every job this node submitted, oldest first."""
        return _blocking(self.aio.jobs)()

    def models(self, name: str | None = None) -> list[dict[str, Any]]:
        """The models this node has heard of (see `AsyncClient.models`)."""
        return _blocking(self.aio.models)(name)

    def publish(
        self, job_or_file: str | Path, *, name: str | None = None, license: str = "",
        price: str = "0", description: str = "",
    ) -> dict[str, Any]:
        """Publish a job's model or a model file (see `AsyncClient.publish`)."""
        return _blocking(self.aio.publish)(job_or_file, name=name, license=license,
                                           price=price, description=description)

    def fetch_model(self, model: str, path: str | Path | None = None) -> Path:
        """Fetch a published model, verified (see `AsyncClient.fetch_model`)."""
        return _blocking(self.aio.fetch_model)(model, path)

    def infer(
        self, model: str, inputs: Any, *, local: bool = False, max_price: str = "0",
    ) -> dict[str, Any]:
        """Run a published model, remotely or here (see `AsyncClient.infer`)."""
        return _blocking(self.aio.infer)(model, inputs, local=local, max_price=max_price)
