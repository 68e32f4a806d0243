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
import shutil
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

DEFAULT_DATA_DIR = Path.home() / ".ravenp2p"
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
        return await trio.to_thread.run_sync(
            save_model_copy, await self._model_file(timeout), Path(path)
        )

    async def cancel(self, reason: str = "") -> JobStatus:
        """Ask the master to stop after the round in progress.

        A paid job then settles what was accepted so far and the escrow refunds
        the rest of the deposit to you; `wait()` for the end.
        """
        request = {"op": "cancel", "job": self.job_id, "reason": reason}
        return JobStatus.from_dict(await self.client.request(request))

    async def _model_file(self, timeout: float | None) -> Path:
        status = await self.wait(timeout=timeout)
        if status.model_file is None:
            raise JobFailed(f"job {self.job_id[:16]} ended {status.state} without weights: "
                            f"{status.reason}")
        return Path(status.model_file)


def save_model_copy(model_file: Path, path: Path) -> Path:
    """Copy a model file to `path` and write its spec as TOML next to it."""
    import tomli_w

    from ravenp2p.training.model_file import read_model

    saved = read_model(model_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, path)
    path.with_suffix(".toml").write_text(tomli_w.dumps(saved.spec.to_dict()), encoding="utf-8")
    return path


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
        """Every job this node submitted (those of earlier runs too), oldest id first."""
        return [JobStatus.from_dict(row) for row in await self.request({"op": "jobs"})]


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
        """Every job this node submitted, oldest id first."""
        return _blocking(self.aio.jobs)()
