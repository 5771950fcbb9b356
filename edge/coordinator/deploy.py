"""Getting a plan onto its workers: wait until healthy, upload missing shards, wire the chain."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge.coordinator.guard import largest_request_bytes
from edge.coordinator.workers import SERVING, GrpcWorker, Link, StageWorker
from edge.errors import EdgeError
from edge.files import file_sha256
from edge.planning.plan import Plan, Stage
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import Deadlines, Security
from edge.transport.codec import PROTOCOL_VERSION, encode_spec

__all__ = ["DeployError", "REFUSALS", "Link", "WorkerHandle", "connect", "wait_healthy",
           "upload_shard", "configure", "deploy", "let_go", "check_plan_files", "CHUNK_BYTES"]

log = logging.getLogger(__name__)

# The receiving worker holds the chunks that gRPC has read ahead on the heap: uploading a
# 128 MiB shard raised its peak RSS by 11-18 MiB with 1 MiB chunks (4 MiB: 36), 3-6 MiB
# with 256 KiB ones, in the same time over loopback (benchmarks/load_memory.py).
CHUNK_BYTES = 1 << 18

# (stage, bytes sent so far, bytes to send) for a progress bar. Files the worker has cached
# are not sent: they are taken off "to send" (down to 0 when all are cached), never counted
# as sent, so a rate computed from these numbers is a real transfer rate.
Progress = Callable[[Stage, int, int], None]


# Answers by which a worker that is up says it will not take a stage (disk or memory too
# small, a shard it cannot load, another coordinator owning it, a token or protocol it
# refuses). Trying it again at once gets the same answer; any other code (UNAVAILABLE,
# DEADLINE_EXCEEDED, ...) says it is gone or did not answer.
REFUSALS = frozenset({
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INTERNAL})


class DeployError(EdgeError):
    """A worker could not be reached, loaded or configured.

    Attributes:
        code: the grpc.StatusCode of the failure.
        address: the address of the device that failed ("" when no one device did).
        device: that device's name.
        kind: "refused" (the device answered with a refusal, see :data:`REFUSALS`) or
            "gone" (it did not answer, or the connection broke).
        configured: addresses that took their new stage before the failure (their
            previous one is gone).
    """

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 address: str = "", device: str = ""):
        super().__init__(message)
        self.code = code
        self.address = address
        self.device = device
        self.kind = "refused" if code in REFUSALS else "gone"
        self.configured: tuple[str, ...] = ()

    @staticmethod
    def at(w: "Placed", message: str, code: grpc.StatusCode) -> "DeployError":
        """A failure of the worker behind ``w``."""
        return DeployError(message, code, w.stage.device.address, w.stage.device.name)


@dataclass
class WorkerHandle:
    """A stage's device and the stubs to reach its worker."""

    stage: Stage
    channel: grpc.Channel
    stub: pb_grpc.WorkerStub
    health: health_pb2_grpc.HealthStub

    @property
    def label(self) -> str:
        return f"device {self.stage.device.name} ({self.stage.device.address}, stage {self.stage.index})"

    @property
    def client(self) -> GrpcWorker:
        """This worker as a :class:`~edge.coordinator.workers.WorkerClient`."""
        return GrpcWorker(self, self.stage.device.address)

    def close(self) -> None:
        self.channel.close()


# What the functions below deploy onto: a stage with a client (``.stage``, ``.label``,
# ``.client``), over gRPC or not.
Placed = Union[WorkerHandle, StageWorker]


def connect(stage: Stage, security: Security) -> WorkerHandle:
    return Link.open(stage.device.address, security).handle(stage)


def wait_healthy(w: Placed, deadlines: Deadlines) -> None:
    """Poll the standard health service until SERVING, with backoff, up to ``deadlines.ready``.

    Raises:
        DeployError: UNAVAILABLE naming the device, its address and the last error (a TLS
            handshake refused looks like a worker still starting, so it is retried too);
            UNAUTHENTICATED at once if the worker refuses the cluster token.
    """
    end = time.monotonic() + deadlines.ready
    delay, last = 0.05, "no answer"
    while True:
        try:
            status = w.client.health(
                min(deadlines.control, max(0.1, end - time.monotonic()))).result()
            if status == SERVING:
                return
            last = f"health is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:  # waiting will not fix a token
                raise DeployError.at(w, f"{w.label} refused the coordinator: {e.details()}",
                                     e.code()) from None
            last = f"{e.code().name}: {e.details()}"
        if time.monotonic() + delay > end:
            raise DeployError.at(
                w, f"{w.label} is not reachable after {deadlines.ready:.0f} s: {last}. "
                   "Is `edge worker` running there and the address right?",
                grpc.StatusCode.UNAVAILABLE)
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _stage_files(stage: Stage) -> list[tuple[str, str, int]]:
    """(path relative to the plan, sha256, size) of the stage's ``.onnx`` and data files."""
    return [(stage.shard, stage.sha256, stage.shard_bytes)] + [
        (f.path, f.sha256, f.size) for f in stage.data_files]


# Digests already checked, by (path, size, mtime): a failover deploys the same files again.
_checked: dict[tuple[str, int, int], str] = {}
_checked_lock = threading.Lock()


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _checked_lock:
        if key in _checked:
            return _checked[key]
    digest = file_sha256(path)
    with _checked_lock:
        _checked[key] = digest
    return _checked[key]


def check_plan_files(stages: list[Stage], plan_dir: Path) -> None:
    """Check every file of ``stages`` against the plan before anything is uploaded: a
    missing or changed last shard would otherwise be found after the others were sent.

    Args:
        stages: the stages about to be deployed.
        plan_dir: the plan's folder (file paths in the plan are relative to it).

    Raises:
        DeployError: FAILED_PRECONDITION, naming every file that is missing, of the wrong
            size or of the wrong sha256, with what the plan expects and what is there.
    """
    problems = []
    for stage in stages:
        for rel, sha, size in _stage_files(stage):
            path = plan_dir / rel
            if not path.is_file():
                problems.append(f"stage {stage.index}: {path}: no such file (the plan expects "
                                f"{size} bytes, sha256 {sha})")
                continue
            got_size = path.stat().st_size
            if got_size != size:
                problems.append(f"stage {stage.index}: {path}: expected {size} bytes, got "
                                f"{got_size}")
                continue
            got = _file_sha256(path)
            if got != sha:
                problems.append(f"stage {stage.index}: {path}: expected sha256 {sha}, got "
                                f"{got}")
    if problems:
        raise DeployError("the plan's files do not match it; nothing was uploaded (re-run "
                          "`edge plan`, or copy the plan's folder again): "
                          + "; ".join(problems), grpc.StatusCode.FAILED_PRECONDITION)


def _chunks(sha256: str, path: Path, sent: list[int],
            progress: Callable[[int], None] | None) -> Iterator[pb.ShardChunk]:
    size = path.stat().st_size
    yield pb.ShardChunk(header=pb.ShardHeader(sha256=sha256, size=size, name=path.name))
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            sent[0] += len(block)
            yield pb.ShardChunk(data=block)
            if progress:
                progress(sent[0])


def upload_shard(w: Placed, plan_dir: Path, deadlines: Deadlines,
                 progress: Progress | None = None) -> int:
    """Upload the stage's ``.onnx`` and data files that the worker's cache lacks.

    Returns:
        Bytes sent (0 if the cache had everything).
    """
    stage = w.stage
    to_send, sent = stage.total_bytes, [0]
    for rel, sha, size in _stage_files(stage):
        try:
            present = w.client.has_shard(sha, deadlines.control)
        except grpc.RpcError as e:
            raise DeployError.at(w, f"{w.label}: cannot query its shard cache: "
                                    f"{e.code().name}: {e.details()}", e.code())
        if present:
            log.info("%s already has %s", w.label, rel)
            to_send -= size
            if progress:
                progress(stage, sent[0], to_send)
            continue
        path = plan_dir / rel
        if not path.is_file():
            raise DeployError(f"plan names {path} for stage {stage.index}, but there is no "
                              "such file", grpc.StatusCode.FAILED_PRECONDITION)
        report = (lambda n: progress(stage, n, to_send)) if progress else None
        try:
            w.client.upload(_chunks(sha, path, sent, report), deadlines.upload)
        except grpc.RpcError as e:
            raise DeployError.at(w, f"{w.label}: upload of {path.name} failed: "
                                    f"{e.code().name}: {e.details()}", e.code())
    return sent[0]


def configure(w: Placed, plan: Plan, epoch: int, deadlines: Deadlines,
              coordinator_id: str = "", take_over: bool = False) -> pb.ConfigureReply:
    """Load the stage's shard on its worker and wire it to the next stage.

    Args:
        coordinator_id: who configures it (see ``StageConfig.coordinator_id``); "" for
            tools that own nothing.
        take_over: replace the worker's owner even if that coordinator is alive.

    Raises:
        DeployError: naming the device; ``kind`` "refused" if the worker said no.
    """
    stage = w.stage
    last = stage.index == len(plan.stages) - 1
    config = pb.StageConfig(
        stage=stage.index, num_stages=len(plan.stages), shard_sha256=stage.sha256,
        inputs=[encode_spec(s) for s in stage.inputs],
        outputs=[encode_spec(s) for s in stage.outputs],
        next_address="" if last else plan.stages[stage.index + 1].device.address,
        epoch=epoch, plan_id=plan.plan_id,
        predicted_memory_mb=stage.predicted.memory_mb,
        data_files=[pb.ShardFileRef(name=f.name, sha256=f.sha256, random_access=f.random_access)
                    for f in stage.data_files],
        mode=stage.mode, protocol=PROTOCOL_VERSION,
        max_request_bytes=largest_request_bytes(plan, stage.index) or 0,
        coordinator_id=coordinator_id, take_over=take_over,
        state=[pb.StatePair(input=a, output=b) for a, b in stage.state],
        max_sequences=plan.model.generation.sequences if plan.model.generation else 0,
        context=plan.model.generation.context if plan.model.generation else 0,
        prefill_chunk=plan.model.generation.prefill if plan.model.generation else 0,
        kv_dtype=plan.model.generation.kv_dtype if plan.model.generation else "",
    )
    try:
        return w.client.configure(config, deadlines.load)
    except grpc.RpcError as e:
        raise DeployError.at(w, f"{w.label}: cannot load its shard: {e.code().name}: "
                                f"{e.details()}", e.code())


def deploy(plan: Plan, plan_dir: Path, workers: list[Placed], epoch: int,
           deadlines: Deadlines, progress: Progress | None = None, *,
           coordinator_id: str = "", take_over: bool = False,
           serving: frozenset[str] = frozenset(), stop: threading.Event | None = None) -> int:
    """Put every stage of ``plan`` on its worker.

    Stages are configured from the last to the first, so a stage only starts receiving
    once everything downstream of it is ready. Devices that serve the running pipeline
    (``serving``) are configured after the others: a newcomer that refuses its stage then
    fails the deployment before the running pipeline was touched. (A newcomer receives
    nothing until its upstream is re-wired, and that comes later.)

    Args:
        coordinator_id: who deploys (see :func:`configure`).
        take_over: replace the workers' owner even if that coordinator is alive.
        serving: addresses of the devices in the pipeline that runs now.
        stop: set when the coordinator closes: the deployment ends before its next step.

    A deployment that fails (or stops) after configuring some workers lets go of them
    (:func:`let_go`): the next coordinator to start, a restart of this one, is not refused
    by a claim that this one will never take up.

    Returns:
        Shard bytes uploaded (0 when every worker had its shard cached).

    Raises:
        DeployError: a file of the plan is missing or differs from it (before any upload),
            or a worker cannot be reached, sent its shard or configured; it names the
            device that failed, and ``configured`` lists the devices that took their new
            stage before it.
    """
    def check_stop() -> None:
        if stop is not None and stop.is_set():
            raise DeployError("the coordinator is closing: deployment stopped",
                              grpc.StatusCode.CANCELLED)

    check_plan_files([w.stage for w in workers], plan_dir)
    for w in workers:
        check_stop()
        wait_healthy(w, deadlines)
    uploaded = 0
    for w in workers:
        check_stop()
        uploaded += upload_shard(w, plan_dir, deadlines, progress)
    order = list(reversed(workers))
    order = ([w for w in order if w.stage.device.address not in serving]
             + [w for w in order if w.stage.device.address in serving])
    done: list[Placed] = []
    for w in order:
        try:
            check_stop()
            reply = configure(w, plan, epoch, deadlines, coordinator_id, take_over)
        except DeployError as e:
            e.configured = tuple(d.stage.device.address for d in done)
            let_go(done, coordinator_id, deadlines.control)
            raise
        except BaseException:  # interrupted (Ctrl-C): ``w`` may have taken its stage too
            let_go([*done, w], coordinator_id, deadlines.control)
            raise
        done.append(w)
        log.info("%s loaded its shard in %.0f ms (RSS %.0f MiB)", w.label, reply.load_ms,
                 reply.rss_bytes / 2**20)
    return uploaded


def let_go(workers: list[Placed], coordinator_id: str, timeout: float) -> None:
    """Tell ``workers`` that ``coordinator_id`` will not subscribe to them (it stops, or
    gave up a deployment), so that another coordinator may configure them at once instead
    of after the claim of a deployment in progress lapses (``OWNER_GRACE_S`` after the
    Configure). For a worker it holds a stream to, or no longer owns, this changes nothing.
    Best effort, all at once, each bounded by ``timeout`` (at most 2 s): a worker that does
    not answer keeps the claim until it lapses."""
    if not coordinator_id or not workers:
        return

    def one(w: Placed) -> None:
        try:
            w.client.release(coordinator_id, min(timeout, 2.0))
        except grpc.RpcError as e:
            log.info("%s: could not let go of it: %s", w.label, e.code().name)
        except Exception:  # never fail a close or a failed deployment's report over this
            log.exception("%s: could not let go of it", w.label)
    threads = [threading.Thread(target=one, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
