"""The worker: a gRPC server on a device that runs one stage and passes its activations
straight to the next worker.

Inside, a request moves through two threads so that a stage computes request n+1 while it
still sends request n:

    Forward (gRPC thread) -> check, queue -> compute thread -> send thread -> next worker
                                                                          \\-> Subscribe (last stage)

Imports onnxruntime, grpc, numpy and psutil; never torch.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import edge
from edge.errors import SecurityError, TensorError
from edge.spec import MODES
from edge.profiling.memory import device_facts, memory_breakdown, release_free_heap, rss_bytes
from edge.profiling.sampler import Sampler
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import (MAX_MESSAGE_BYTES, Deadlines, Security, create_channel,
                                     create_server, serialized_unary, wait_for_signal)
from edge.transport.codec import (PROTOCOL_VERSION, decode_specs, decode_tensors,
                                  encode_activation)
from edge.transport.services import add_service
from edge.worker.cache import ShardCache, UploadError, default_cache_dir, file_sha256
from edge.worker.stage import ShardMismatch, StageRunner, StageSpec, describe_ort_error

__all__ = ["WorkerConfig", "WorkerServicer", "serve", "start_worker", "message_limit_bytes",
           "MAX_SUBSCRIBERS", "MAX_CALIBRATE_SECONDS", "MAX_CHUNK_BYTES", "OWNER_GRACE_S"]

log = logging.getLogger(__name__)

SERVICE_NAME = "edge.v1.Worker"
_FORWARD = pb.DESCRIPTOR.services_by_name["Worker"].methods_by_name["Forward"]

# Each Subscribe stream holds one of the server's handler threads for as long as it is
# open: past this many, more are refused so that the other calls still find a thread.
MAX_SUBSCRIBERS = 8  # besides the owning coordinator's own stream, always accepted
# How long a coordinator that configured this worker and has not subscribed yet still owns
# it: a deploy configures every stage (loading each shard) before it subscribes.
OWNER_GRACE_S = 30.0
MAX_CALIBRATE_SECONDS = 60.0
MAX_REQUEST_ID = 256  # characters
MiB = 1 << 20
# Without --max-message-mb, the receive limit is this share of the memory budget, between
# the floor and channels' MAX_MESSAGE_BYTES (see message_limit_bytes).
MESSAGE_SHARE = 8
MESSAGE_FLOOR_MB = 16
# An UploadShard message: a chunk of up to 1 MiB (the coordinator sends 256 KiB) and its
# framing. Larger ones are refused before they are parsed.
MAX_CHUNK_BYTES = (1 << 20) + 1024
# What a receiving worker accepts as its next hop's address.
_ADDRESS_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)$")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything ``edge worker`` takes.

    Attributes:
        listen: ``host:port`` to serve on (port 0: any free port).
        device: the device profile's name, reported in status.
        cache_dir: where shards are kept between restarts.
        memory_budget_mb: memory this worker may use (0: unknown).
        threads: onnxruntime intra-op threads (None: all cores).
        max_queue: requests waiting for compute before Forward answers RESOURCE_EXHAUSTED.
        sample_interval_s: seconds between the memory samples `edge profile` reads.
        sample_window_s: seconds of samples kept (older ones are dropped).
        max_message_mb: the largest request message the server takes, in MiB (0: from the
            memory budget, see :func:`message_limit_bytes`); a longer one is refused with
            RESOURCE_EXHAUSTED before it is buffered, token or not.
        deadlines: per-call deadlines for calls this worker makes.
        security: how the server and the channel to the next worker are secured
            (``Security.from_dir(bundle)``: mutual TLS and the token; default plaintext,
            loopback only).
    """

    listen: str = "127.0.0.1:50051"
    device: str = "unknown"
    cache_dir: Path = field(default_factory=default_cache_dir)
    memory_budget_mb: float = 0.0
    threads: int | None = None
    max_queue: int = 64
    sample_interval_s: float = 0.1
    # The sampler's default of 36,000 samples (an hour at 0.1 s) is ~14 MiB of Python
    # objects that a long-running worker accumulates on top of its peak: 10 minutes, 2 MiB.
    sample_window_s: float = 600.0
    max_message_mb: float = 0.0
    deadlines: Deadlines = Deadlines()
    security: Security = Security()


@dataclass
class _Job:
    request_id: str
    epoch: int
    arrays: dict[str, np.ndarray]
    timings: list[pb.StageTiming]
    received: float  # perf_counter
    runner: StageRunner
    received_ns: int = 0  # time.time_ns(), reported in StageTiming
    compute_ms: float = 0.0
    queue_ms: float = 0.0
    outputs: dict[str, np.ndarray] | None = None


class _Refused(Exception):
    """A Subscribe or Configure the ownership rule refuses: ``code`` and the message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


_END = object()  # put in a stream's queue to end it with the stream's ``ended`` status


@dataclass(eq=False)
class _Stream:
    coordinator_id: str
    queue: queue.Queue = field(default_factory=queue.Queue)
    ended: tuple[grpc.StatusCode, str] | None = None

    def end(self, code: grpc.StatusCode, message: str) -> None:
        self.ended = (code, message)
        self.queue.put(_END)


class _EventBus:
    """Who owns this worker, and the fan-out of its results and failures to the owner's
    Subscribe stream.

    A worker belongs to the coordinator that configured it (by ``coordinator_id``) while
    that coordinator is alive: it holds a Subscribe stream here, or it configured the
    worker less than :data:`OWNER_GRACE_S` ago and has not subscribed since (a deploy
    configures every stage before it subscribes). Another coordinator's Configure is then
    refused unless it says ``take_over``; a restarted coordinator (its old process is gone,
    and so is its stream) is accepted. An empty id (a tool, a test) owns nothing: anyone
    may replace it.

    Only the owner's streams get events, and the owner's stream is always accepted (a new
    one replaces its older ones), so that streams opened by anyone else, which are limited,
    cannot lock the coordinator out. Events produced while the owner has no stream are
    kept (bounded), so a coordinator that reconnects still gets them.
    """

    def __init__(self, backlog: int = 4096):
        self._lock = threading.Lock()
        self._streams: list[_Stream] = []
        self._backlog: collections.deque = collections.deque(maxlen=backlog)
        self.owner: str | None = None      # None: never configured
        self._configured_at = 0.0          # monotonic time of the owner's last Configure
        self._owner_subscribed = False     # the owner held a stream since that Configure
        # Coordinators that were taken over, and by whom: their Subscribe is refused with
        # ABORTED so that they learn it even if their stream was down at the time.
        self._former: collections.OrderedDict[str, str] = collections.OrderedDict()

    def _is_owner(self, coordinator_id: str) -> bool:
        return self.owner is not None and coordinator_id == self.owner

    def publish(self, event: pb.Event) -> None:
        with self._lock:
            targets = [s for s in self._streams if self._is_owner(s.coordinator_id)]
            if not targets:
                self._backlog.append(event)
            for s in targets:
                s.queue.put(event)

    def subscribe(self, coordinator_id: str, limit: int) -> _Stream:
        """A stream of events from now on (and the backlog, for the owner's first stream).

        Raises:
            _Refused: ABORTED for a coordinator that was taken over; RESOURCE_EXHAUSTED
                when ``limit`` streams of others than the owner are open already.
        """
        with self._lock:
            if coordinator_id and coordinator_id in self._former:
                raise _Refused(grpc.StatusCode.ABORTED, self._former[coordinator_id])
            stream = _Stream(coordinator_id)
            if coordinator_id and self._is_owner(coordinator_id):
                # Its older stream is one it gave up on (a reconnect after a network blip).
                for old in [s for s in self._streams if s.coordinator_id == coordinator_id]:
                    old.end(grpc.StatusCode.CANCELLED,
                            "replaced by a newer stream of the same coordinator")
                    self._streams.remove(old)
                self._owner_subscribed = True
            else:
                others = [s for s in self._streams
                          if not (s.coordinator_id and self._is_owner(s.coordinator_id))]
                if len(others) >= limit:
                    raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{limit} subscribers are listening already; expected one "
                                   "per coordinator: close a stale one and retry")
            if self._is_owner(coordinator_id):
                while self._backlog:
                    stream.queue.put(self._backlog.popleft())
            self._streams.append(stream)
        return stream

    def unsubscribe(self, stream: _Stream) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)

    def refusal(self, coordinator_id: str, take_over: bool, serving: str) -> str | None:
        """Why ``coordinator_id`` may not configure this worker now, or None if it may.

        Args:
            serving: what the worker serves now, for the message ("plan P, epoch E").
        """
        with self._lock:
            owner = self.owner
            if not owner or owner == coordinator_id or take_over:
                return None
            if any(s.coordinator_id == owner for s in self._streams):
                alive = "it holds this worker's event stream"
            else:
                ago = time.monotonic() - self._configured_at
                if self._owner_subscribed or ago >= OWNER_GRACE_S:
                    return None  # gone (a restarted coordinator is the common case)
                alive = (f"it configured this worker {ago:.1f} s ago and has not subscribed "
                         f"yet (its claim lapses in {OWNER_GRACE_S - ago:.0f} s)")
        said = coordinator_id or "a coordinator that gave no id"
        return (f"this worker belongs to coordinator {owner} ({serving}), which is alive: "
                f"{alive}; expected a Configure from it, got one from {said}. Two "
                "coordinators on one cluster would take each other's workers: stop the other "
                "coordinator, or start this one with `edge coordinator --take-over` to replace "
                "it")

    def claim(self, coordinator_id: str, serving: str) -> None:
        """Make ``coordinator_id`` the owner; a previous owner's streams end with ABORTED."""
        with self._lock:
            previous = self.owner
            if previous != coordinator_id:
                self._backlog.clear()  # the previous owner's results are not the new one's
                if previous:
                    why = (f"this worker was taken over by coordinator "
                           f"{coordinator_id or '(no id)'} ({serving}); coordinator {previous} "
                           "no longer owns it")
                    self._former[previous] = why
                    while len(self._former) > 16:
                        self._former.popitem(last=False)
                    for s in [s for s in self._streams if s.coordinator_id == previous]:
                        s.end(grpc.StatusCode.ABORTED, why)
                        self._streams.remove(s)
                    log.warning("%s", why)
            self._former.pop(coordinator_id, None)
            self.owner = coordinator_id
            self._configured_at = time.monotonic()
            self._owner_subscribed = bool(coordinator_id) and any(
                s.coordinator_id == coordinator_id for s in self._streams)
            if self._owner_subscribed:
                stream = next(s for s in self._streams if s.coordinator_id == coordinator_id)
                while self._backlog:
                    stream.queue.put(self._backlog.popleft())


class WorkerServicer(pb_grpc.WorkerServicer):
    """Serves one stage. See the module docstring for the flow."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.cache = ShardCache(config.cache_dir)
        self._runner: StageRunner | None = None
        self._configure_lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue(maxsize=config.max_queue)
        self._outbox: queue.Queue = queue.Queue(maxsize=config.max_queue)
        self._events = _EventBus()
        self._next_channel: grpc.Channel | None = None
        self._next_forward: grpc.UnaryUnaryMultiCallable | None = None  # takes bytes
        self._stats_lock = threading.Lock()
        self._done = 0
        self._failed = 0
        self._compute_ms_total = 0.0
        self._stopping = threading.Event()
        self._loaded: tuple[int, float] = (0, 0.0)  # RSS right after the last load, load ms
        # Before any shard: what this device pays for a worker at all (its runtime floor).
        self.startup_rss = rss_bytes()
        keep = max(1, round(config.sample_window_s / config.sample_interval_s))
        self.sampler = Sampler(config.sample_interval_s, keep=keep, counters=self._counters,
                               budget_mb=config.memory_budget_mb).start()
        self._threads = [
            threading.Thread(target=self._compute_loop, name="edge-compute", daemon=True),
            threading.Thread(target=self._send_loop, name="edge-send", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ shards

    def HasShard(self, request: pb.ShardRef, context) -> pb.ShardPresence:
        try:
            path = self.cache.path(request.sha256)
        except UploadError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if path.is_file():
            return pb.ShardPresence(present=True, size=path.stat().st_size)
        return pb.ShardPresence(present=False)

    def UploadShard(self, request_iterator: Iterator[pb.ShardChunk], context) -> pb.UploadReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "an upload must start with a ShardHeader, got "
                          f"{'nothing' if first is None else 'data'}")
        header = first.header

        def data() -> Iterator[bytes]:
            for chunk in request_iterator:
                part = chunk.WhichOneof("part")
                if part != "data":
                    raise UploadError("invalid", "expected data chunks after the header, got "
                                      + ("a second header" if part else
                                         "a chunk with neither header nor data"))
                yield chunk.data

        try:
            self.cache.receive(header.sha256, header.size, data())
        except UploadError as e:
            code = _UPLOAD_CODES[e.kind]
            log.warning("refused upload of %s: %s", header.name or header.sha256[:12], e)
            context.abort(code, str(e))
        finally:
            # The chunks passed through gRPC's and protobuf's buffers; without a trim that
            # free heap (a BERT-base stage: 11-15 MiB with one malloc arena, 19-33 MiB with
            # one per thread) stayed resident under the load that follows.
            release_free_heap()
        return pb.UploadReply(sha256=header.sha256, size=header.size)

    def Configure(self, request: pb.StageConfig, context) -> pb.ConfigureReply:
        if request.protocol != PROTOCOL_VERSION:
            said = (f"protocol {request.protocol}" if request.protocol
                    else "no protocol (an edge from before protocol versions)")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the coordinator's StageConfig states {said}; this worker (edge "
                          f"{edge.__version__}) speaks protocol {PROTOCOL_VERSION}: run the "
                          "same edge version on the coordinator and its workers")
        problem = _config_problem(request)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        refusal = self._events.refusal(request.coordinator_id, request.take_over, self._serving())
        if refusal:  # before loading anything: refused at once
            log.warning("refused a Configure: %s", refusal)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        try:
            inputs = decode_specs(request.inputs, "inputs")
            outputs = decode_specs(request.outputs, "outputs")
        except TensorError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"StageConfig: {e}")
        spec = StageSpec(
            stage=request.stage, num_stages=request.num_stages,
            shard_sha256=request.shard_sha256, inputs=inputs, outputs=outputs,
            next_address=request.next_address, epoch=request.epoch,
            plan_id=request.plan_id, predicted_memory_mb=request.predicted_memory_mb,
            data_files=tuple((f.name, f.sha256, f.random_access) for f in request.data_files),
            mode=request.mode or "fp32",
            max_request_bytes=request.max_request_bytes,
        )
        budget = self.config.memory_budget_mb
        if budget and spec.predicted_memory_mb > budget:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{spec.where} needs {spec.predicted_memory_mb:.0f} MiB (predicted by "
                          f"the plan), this worker's budget is {budget:.0f} MiB; re-plan with "
                          f"this device's memory")
        try:
            path = self.cache.stage_dir(spec.shard_sha256,
                                        [(name, sha) for name, sha, _ in spec.data_files])
        except UploadError as e:
            context.abort(_UPLOAD_CODES[e.kind], str(e))
        # The cache could have been tampered with on disk since the upload: a shard is only
        # loaded if its bytes still match the plan's digests.
        for name, sha in [(path.name, spec.shard_sha256)] + [
                (name, sha) for name, sha, _ in spec.data_files]:
            try:
                digest = file_sha256(path.parent / name)
            except OSError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"cannot read cached {name}: {e.strerror}; check the worker's "
                              "--cache-dir")
            if digest != sha:
                self.cache.path(sha).unlink(missing_ok=True)
                context.abort(grpc.StatusCode.DATA_LOSS,
                              f"cached {name} does not match the plan: expected sha256 {sha}, "
                              f"file has {digest}; upload it again")
        with self._configure_lock:
            try:
                current = self._runner
                runner = ((current.rewired(spec) if current is not None else None)
                          or StageRunner(spec, path, self.config.threads))
            except ShardMismatch as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except Exception as e:  # onnxruntime cannot load it
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"cannot load shard {spec.shard_sha256[:12]}: "
                              f"{describe_ort_error(e)[1]}")
            # Checked again where it is decided: two coordinators may configure at once.
            refusal = self._events.refusal(request.coordinator_id, request.take_over,
                                           self._serving())
            if refusal:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
            old_channel = self._next_channel
            if spec.next_address:
                try:
                    self._next_channel = create_channel(spec.next_address,
                                                        security=self.config.security)
                except SecurityError as e:  # plaintext to a LAN address without --insecure
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"{spec.where} cannot forward to {spec.next_address}: {e}")
                self._next_forward = serialized_unary(self._next_channel, _FORWARD, pb.Ack)
            else:
                self._next_channel = self._next_forward = None
            self._runner = runner
            self._events.claim(request.coordinator_id,
                               f"plan {spec.plan_id or '?'}, epoch {spec.epoch}")
            if old_channel is not None:
                old_channel.close()
        release_free_heap()
        self._loaded = (rss_bytes(), runner.load_ms)
        log.info("serving %s of %d (shard %s, epoch %d), loaded in %.0f ms; next hop: %s",
                 spec.where, spec.num_stages, spec.shard_sha256[:12], spec.epoch,
                 runner.load_ms, spec.next_address or "coordinator")
        return pb.ConfigureReply(load_ms=runner.load_ms, rss_bytes=rss_bytes())

    # ------------------------------------------------------------------ requests

    def Forward(self, request: pb.Activation, context) -> pb.Ack:
        received = time.perf_counter()
        received_ns = time.time_ns()
        runner = self._runner
        if runner is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this worker has no stage yet: the coordinator must configure it")
        if not 0 < len(request.request_id) <= MAX_REQUEST_ID:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"expected a request id of 1-{MAX_REQUEST_ID} characters, got "
                          f"{len(request.request_id)}")
        if request.epoch != runner.spec.epoch:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"request {request.request_id} belongs to pipeline epoch "
                          f"{request.epoch}, this worker serves epoch {runner.spec.epoch}")
        try:
            arrays = decode_tensors(request.tensors)
            runner.check(arrays)
        except TensorError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # Copies of the timings, not references into the request: a reference keeps the
        # whole request message, tensor bytes included, alive until the job is sent.
        timings = [pb.StageTiming.FromString(t.SerializeToString()) for t in request.timings]
        job = _Job(request.request_id, request.epoch, arrays, timings, received, runner,
                   received_ns=received_ns)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{runner.spec.where} has {self.config.max_queue} requests queued; "
                          "retry later")
        return pb.Ack()

    def Subscribe(self, request: pb.SubscribeRequest, context) -> Iterator[pb.Event]:
        try:
            stream = self._events.subscribe(request.coordinator_id, MAX_SUBSCRIBERS)
        except _Refused as e:
            log.warning("refused a Subscribe from %s: %s",
                        request.coordinator_id or "a caller without a coordinator id", e)
            context.abort(e.code, str(e))
        # Gone from the table as soon as the call ends, not at the next poll: whether the
        # owner holds a stream decides whether another coordinator may configure us.
        context.add_callback(lambda: self._events.unsubscribe(stream))
        try:
            while context.is_active() and not self._stopping.is_set():
                try:
                    item = stream.queue.get(timeout=0.25)
                except queue.Empty:
                    continue
                if item is _END:
                    assert stream.ended is not None
                    context.abort(*stream.ended)
                yield item
        finally:
            self._events.unsubscribe(stream)

    def GetProfile(self, request: pb.ProfileRequest, context) -> pb.WorkerProfile:
        if not (math.isfinite(request.since) and request.since >= 0):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"since: expected a unix time in seconds >= 0 (0: all samples), "
                          f"got {request.since}")
        samples = [pb.MemorySample(**vars(s)) for s in self.sampler.since(request.since)]
        return pb.WorkerProfile(samples=samples, interval_s=self.sampler.interval_s,
                                memory_budget_mb=self.config.memory_budget_mb,
                                rss_at_load_bytes=self._loaded[0], load_ms=self._loaded[1])

    def Calibrate(self, request: pb.CalibrateRequest, context) -> pb.CalibrateReply:
        seconds = request.seconds
        if not (math.isfinite(seconds) and 0 <= seconds <= MAX_CALIBRATE_SECONDS):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"seconds: expected 0-{MAX_CALIBRATE_SECONDS:g} (0: no benchmark), "
                          f"got {seconds}")
        reply = pb.CalibrateReply(startup_rss_bytes=self.startup_rss,
                                  threads=self.config.threads or 0,
                                  facts=pb.DeviceFacts(**device_facts()))
        if request.seconds > 0:
            if self._jobs.qsize() or self._outbox.qsize():
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              "this worker is serving requests; calibrate an idle worker")
            from edge.profiling.calibrate import measure_gflops

            reply.gflops, reply.runs = measure_gflops(seconds, self.config.threads)
        return reply

    def GetStatus(self, request: pb.StatusRequest, context) -> pb.WorkerStatus:
        runner = self._runner
        with self._stats_lock:
            done, failed, total = self._done, self._failed, self._compute_ms_total
        mem = memory_breakdown()
        status = pb.WorkerStatus(
            device=self.config.device, version=edge.__version__,
            configured=runner is not None,
            rss_bytes=mem["rss"], peak_rss_bytes=mem["peak_rss"],
            rss_anon_bytes=mem["rss_anon"], rss_file_bytes=mem["rss_file"],
            memory_warning=self.sampler.warning,
            memory_budget_mb=self.config.memory_budget_mb,
            requests_done=done, requests_failed=failed,
            mean_compute_ms=total / done if done else 0.0,
            queue_depth=self._jobs.qsize(),
            facts=pb.DeviceFacts(**device_facts()),
        )
        if runner is not None:
            s = runner.spec
            status.stage, status.shard_sha256 = s.stage, s.shard_sha256
            status.plan_id, status.epoch = s.plan_id, s.epoch
            status.mode = s.mode
        status.coordinator_id = self._events.owner or ""
        return status

    # ------------------------------------------------------------------ internals

    def message_limits(self) -> dict:
        """Per method, the bound on one request message (see ``add_service``): a Forward
        up to the plan's largest for this stage, upload chunks of about 1 MiB."""
        def forward() -> tuple[int, str]:
            runner = self._runner
            if runner is None or not runner.spec.max_request_bytes:
                return 0, ""
            return (runner.spec.max_request_bytes,
                    f"the largest the plan allows {runner.spec.where}")

        return {"Forward": forward,
                "UploadShard": lambda: (MAX_CHUNK_BYTES, "upload chunks of up to 1 MiB")}

    def _serving(self) -> str:
        """What this worker serves, for messages: "plan P, epoch E" or "no stage"."""
        runner = self._runner
        if runner is None:
            return "no stage"
        return f"plan {runner.spec.plan_id or '?'}, epoch {runner.spec.epoch}"

    def _stale(self, job: _Job) -> bool:
        """True if the worker was re-configured (a new epoch) since ``job`` came."""
        runner = self._runner
        return runner is None or job.epoch != runner.spec.epoch

    def _counters(self) -> tuple[int, int]:
        return self._done, self._jobs.qsize()

    def _fail(self, job: _Job, code: grpc.StatusCode, message: str) -> None:
        with self._stats_lock:
            self._failed += 1
        log.warning("request %s failed: %s", job.request_id, message)
        self._events.publish(pb.Event(failure=pb.Failure(
            request_id=job.request_id, stage=job.runner.spec.stage, code=code.value[0],
            message=message, epoch=job.epoch)))

    def _compute_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self._jobs.get(timeout=0.25)
            except queue.Empty:
                continue
            if self._stale(job):
                continue  # re-configured since it was queued: the coordinator resends it
            start = time.perf_counter()
            job.queue_ms = (start - job.received) * 1e3
            try:
                job.outputs = job.runner.run(job.arrays)
            except Exception as e:
                kind, msg = describe_ort_error(e)
                code = {"invalid": grpc.StatusCode.INVALID_ARGUMENT,
                        "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
                        }.get(kind, grpc.StatusCode.INTERNAL)
                self._fail(job, code, f"{job.runner.spec.where} could not run request "
                                      f"{job.request_id}: {msg}")
                continue
            job.compute_ms = (time.perf_counter() - start) * 1e3
            job.arrays = {}  # free the inputs before the outputs are sent
            with self._stats_lock:
                self._done += 1
                self._compute_ms_total += job.compute_ms
            self._outbox.put(job)

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self._outbox.get(timeout=0.25)
            except queue.Empty:
                continue
            if self._stale(job):
                continue  # re-configured since: the coordinator resends it
            start = time.perf_counter()
            spec = job.runner.spec
            timing = pb.StageTiming(stage=spec.stage, queue_ms=job.queue_ms,
                                    compute_ms=job.compute_ms,
                                    received_unix_ns=job.received_ns)

            def timings() -> list[pb.StageTiming]:
                timing.send_ms = (time.perf_counter() - start) * 1e3  # the encoding
                return job.timings + [timing]

            # Straight to wire bytes: one copy of the outputs instead of three.
            try:
                data = encode_activation(job.request_id, job.epoch, job.outputs, timings)
            except TensorError as e:
                self._fail(job, grpc.StatusCode.INTERNAL, f"{spec.where} cannot send the "
                                                          f"outputs of {job.request_id}: {e}")
                continue
            finally:
                job.outputs = None
            if spec.is_last:
                event = pb.Event()
                event.result.MergeFromString(data)
                del data
                self._events.publish(event)
                continue
            forward = self._next_forward
            try:
                call = forward.future(data, timeout=self.config.deadlines.forward)
                # A next hop that hangs (unplugged, stopped) must not hold this loop for a
                # whole deadline once the coordinator has moved the pipeline elsewhere.
                while not self._stopping.is_set():
                    try:
                        call.result(timeout=0.25)
                        break
                    except grpc.FutureTimeoutError:
                        if self._stale(job):
                            call.cancel()
                            break
                if call.cancelled():
                    continue
            except grpc.RpcError as e:
                if self._stale(job):
                    continue  # the hop was re-wired meanwhile: the coordinator resends it
                code = e.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    code = grpc.StatusCode.UNAVAILABLE
                self._fail(job, code, f"{spec.where} could not hand request {job.request_id} "
                                      f"to stage {spec.stage + 1} at {spec.next_address}: "
                                      f"{e.code().name}: {e.details()}")
            finally:
                del data  # not kept while the loop waits for and encodes the next one

    def stop(self) -> None:
        self._stopping.set()
        self.sampler.stop()
        if self._next_channel is not None:
            self._next_channel.close()


_UPLOAD_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "corrupt": grpc.StatusCode.DATA_LOSS,
    "missing": grpc.StatusCode.FAILED_PRECONDITION,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unwritable": grpc.StatusCode.FAILED_PRECONDITION,
}


def _config_problem(c: pb.StageConfig) -> str | None:
    """What is wrong with a StageConfig's plain fields, or None."""
    if c.num_stages < 1 or c.stage >= c.num_stages:
        return (f"StageConfig: stage {c.stage} of {c.num_stages}; expected a stage index "
                "below num_stages (>= 1)")
    mode = c.mode or "fp32"
    if mode not in MODES:
        return f"StageConfig: unknown mode {mode!r}; expected one of {', '.join(MODES)}"
    if not (math.isfinite(c.predicted_memory_mb) and c.predicted_memory_mb >= 0):
        return (f"StageConfig: predicted_memory_mb: expected MiB >= 0, got "
                f"{c.predicted_memory_mb}")
    if c.next_address:
        host, sep, port = c.next_address.rpartition(":")
        if (not sep or not _ADDRESS_HOST.fullmatch(host) or not port.isdigit()
                or not 0 < int(port) < 65536):
            return (f"StageConfig: next_address: expected host:port (port 1-65535) or "
                    f"nothing (the last stage), got {c.next_address!r}")
    return None


def message_limit_bytes(config: WorkerConfig) -> int:
    """The largest request message the worker's server takes.

    ``config.max_message_mb`` if given; else an eighth of the memory budget (or of the
    machine's memory, without one), between 16 and 512 MiB. A received message is held
    up to four times at once (gRPC's buffers, the bytes handed to Python, the parsed
    message, its tensors: a refused 458 MiB Forward peaked 1.8 GiB above the worker's
    RSS, benchmarks/big_calls.py): an eighth keeps any one call within half of the
    budget, so a 1 GB board takes messages up to 128 MiB and survives any call.
    The worker starts before it knows its plan; the plan's own, tighter bound per stage is
    checked in Forward (``StageConfig.max_request_bytes``).
    """
    if config.max_message_mb:
        return int(config.max_message_mb * MiB)
    budget = config.memory_budget_mb or psutil.virtual_memory().total / MiB
    return int(min(max(budget / MESSAGE_SHARE, MESSAGE_FLOOR_MB), MAX_MESSAGE_BYTES / MiB) * MiB)


def start_worker(config: WorkerConfig) -> tuple[grpc.Server, int, WorkerServicer,
                                                health.HealthServicer]:
    """Build and start a worker server.

    Returns:
        The running server, its port, the servicer and the health servicer.
    """
    # Forward only queues (bounded by max_queue); the rest are control calls and one
    # Subscribe stream per coordinator. Past this many at once: RESOURCE_EXHAUSTED.
    server, port = create_server(config.listen, max_workers=16,
                                 max_concurrent_rpcs=config.max_queue + 64,
                                 security=config.security,
                                 max_receive_bytes=message_limit_bytes(config))
    servicer = WorkerServicer(config)
    add_service(server, servicer, pb, "Worker", limits=servicer.message_limits())
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, servicer, health_servicer


def serve(config: WorkerConfig, on_ready=None, grace: float = 5.0) -> None:
    """Run a worker until SIGTERM or SIGINT, then stop gracefully.

    Args:
        config: the worker's settings.
        on_ready: called with the bound port once the server accepts calls.
        grace: seconds in-flight calls get to finish after the signal.
    """
    server, port, servicer, health_servicer = start_worker(config)
    if on_ready:
        on_ready(port)
    try:
        wait_for_signal()
        log.info("stopping: no new requests, %.0f s for calls in flight", grace)
        health_servicer.enter_graceful_shutdown()
    finally:
        server.stop(grace).wait()
        servicer.stop()
