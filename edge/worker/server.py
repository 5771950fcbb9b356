"""The worker: a gRPC server on a device that runs one stage and passes its activations
straight to the next worker.

This module is the gRPC side only: :class:`WorkerServicer` decodes and checks each call,
hands it to the stage engine (``edge.worker.engine``: the queues, the compute and send
threads, the next hop), the configure checks (``edge.worker.configure``) or the event bus
(``edge.worker.events``: results, failures and who owns the worker), and
``edge.worker.errors`` maps the typed errors they raise to status codes, in one table:

    Forward (gRPC thread) -> check, engine.submit -> compute -> send -> next worker
                                                                   \\-> Subscribe (last stage)

Imports onnxruntime, grpc, numpy and psutil; never torch.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import edge
from edge.address import parse_address
from edge.profiling.calibrate import measure_gflops
from edge.profiling.memory import device_facts, memory_breakdown, release_free_heap, rss_bytes
from edge.profiling.sampler import Sampler
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import (MAX_MESSAGE_BYTES, Deadlines, Security, create_server,
                                     catch_stop_signals, wait_for_signal)
from edge.transport import systemd
from edge.transport.codec import decode_tensors
from edge.transport.security import peer_role
from edge.transport.services import add_service
from edge.worker.cache import ShardCache, UploadError, default_cache_dir
from edge.worker.configure import (check_budget, check_protocol, check_stage_config,
                                   stage_spec, verified_stage_path)
from edge.worker.engine import Job, StageEngine
from edge.worker.errors import (BadRequest, Busy, NotAllowed, NotConfigured, OwnedElsewhere,
                                StaleEpoch, TakenOver, TooManySubscribers, grpc_errors,
                                status_code)
from edge.worker.events import END, OWNER_GRACE_S, WAKE, EventBus
from edge.worker.metrics import NO_STAGE, count_failure, count_forward, watch
from edge.worker.sessions import DEFAULT_IDLE_S, check_rows, check_step

__all__ = ["WorkerConfig", "WorkerServicer", "serve", "start_worker", "message_limit_bytes",
           "MAX_SUBSCRIBERS", "MAX_CALIBRATE_SECONDS", "MAX_CHUNK_BYTES", "OWNER_GRACE_S"]

log = logging.getLogger(__name__)

SERVICE_NAME = "edge.v1.Worker"

# Each Subscribe stream holds one of the server's handler threads for as long as it is
# open: past this many, more are refused so that the other calls still find a thread.
MAX_SUBSCRIBERS = 8  # besides the owning coordinator's own stream, always accepted
MAX_CALIBRATE_SECONDS = 60.0
# A Subscribe stream's reader looks up this often at most when no event comes (a call
# that ends, a stop, wake it at once).
SUBSCRIBE_POLL_S = 1.0
MAX_REQUEST_ID = 256  # characters
MiB = 1 << 20
# Without --max-message-mb, the receive limit is this share of the memory budget, between
# the floor and channels' MAX_MESSAGE_BYTES (see message_limit_bytes).
MESSAGE_SHARE = 8
MESSAGE_FLOOR_MB = 16
# An UploadShard message: a chunk of up to 1 MiB (the coordinator sends 256 KiB) and its
# framing. Larger ones are refused before they are parsed.
MAX_CHUNK_BYTES = (1 << 20) + 1024


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
        session_idle_s: seconds after which a generated sequence without a step loses
            its KV caches on this worker.
        announce: announce the worker by mDNS while it serves (``edge worker`` does,
            unless ``--no-announce``; see ``edge.worker.announce``).
        name: the device name it announces (empty: the host name).
        cluster_id: the cluster id it announces (empty: from its CA, or ``default``).
    """

    listen: str = "127.0.0.1:50051"
    device: str = "unknown"
    cache_dir: Path = field(default_factory=default_cache_dir)
    memory_budget_mb: float = 0.0
    threads: int | None = None
    max_queue: int = 64
    # Four samples a second: at ten, sampling took ~2 ms of CPU a second, 2% of an emulated
    # Pi 4's share, paid under load too. The peak between samples is not lost: every
    # sample carries the kernel's high-water mark (VmHWM).
    sample_interval_s: float = 0.25
    # The sampler's default of 36,000 samples (an hour at 0.1 s) is ~14 MiB of Python
    # objects that a long-running worker accumulates on top of its peak: 10 minutes, 1 MiB.
    sample_window_s: float = 600.0
    max_message_mb: float = 0.0
    deadlines: Deadlines = Deadlines()
    security: Security = Security()
    session_idle_s: float = DEFAULT_IDLE_S
    announce: bool = False
    name: str = ""
    cluster_id: str = ""


class WorkerServicer(pb_grpc.WorkerServicer):
    """Serves one stage: each handler decodes and checks its request, calls the engine,
    and lets :func:`grpc_errors` turn a typed error into its status code."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.cache = ShardCache(config.cache_dir)
        self.events = EventBus()
        self.engine = StageEngine(self.events, max_queue=config.max_queue,
                                  threads=config.threads, deadlines=config.deadlines,
                                  security=config.security,
                                  session_idle_s=config.session_idle_s,
                                  device=config.device)
        self._loaded: tuple[int, float] = (0, 0.0)  # RSS right after the last load, load ms
        # Before any shard: what this device pays for a worker at all (its runtime floor).
        self.startup_rss = rss_bytes()
        keep = max(1, round(config.sample_window_s / config.sample_interval_s))
        self.sampler = Sampler(config.sample_interval_s, keep=keep,
                               counters=self.engine.counters,
                               budget_mb=config.memory_budget_mb).start()
        watch(self)  # its queues, caches and memory, read at each scrape

    # ------------------------------------------------------------------ shards

    @grpc_errors
    def HasShard(self, request: pb.ShardRef, context) -> pb.ShardPresence:
        path = self.cache.path(request.sha256)
        if path.is_file():
            return pb.ShardPresence(present=True, size=path.stat().st_size)
        return pb.ShardPresence(present=False)

    @grpc_errors
    def UploadShard(self, request_iterator: Iterator[pb.ShardChunk], context) -> pb.UploadReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise BadRequest("an upload must start with a ShardHeader, got "
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
            log.warning("refused upload of %s: %s", header.name or header.sha256[:12], e)
            raise
        finally:
            # The chunks passed through gRPC's and protobuf's buffers; without a trim that
            # free heap (a BERT-base stage: 11-15 MiB with one malloc arena, 19-33 MiB with
            # one per thread) stayed resident under the load that follows.
            release_free_heap()
        return pb.UploadReply(sha256=header.sha256, size=header.size)

    @grpc_errors
    def Configure(self, request: pb.StageConfig, context) -> pb.ConfigureReply:
        check_protocol(request)
        check_stage_config(request)
        try:  # before loading anything: refused at once
            self.events.check_may_configure(request.coordinator_id, request.take_over,
                                            self.engine.serving())
        except OwnedElsewhere as e:
            log.warning("refused a Configure: %s", e)
            raise
        spec = stage_spec(request)
        check_budget(spec, self.config.memory_budget_mb)
        path = verified_stage_path(self.cache, spec)
        runner = self.engine.install(spec, path, request.coordinator_id, request.take_over)
        release_free_heap()
        self._loaded = (rss_bytes(), runner.load_ms)
        log.info("serving %s of %d (shard %s, epoch %d), loaded in %.0f ms; next hop: %s",
                 spec.where, spec.num_stages, spec.shard_sha256[:12], spec.epoch,
                 runner.load_ms, spec.next_address or "coordinator")
        return pb.ConfigureReply(load_ms=runner.load_ms, rss_bytes=rss_bytes())

    # ------------------------------------------------------------------ requests

    @grpc_errors
    def Forward(self, request: pb.Activation, context) -> pb.Ack:
        runner = self.engine.runner
        stage = runner.spec.stage if runner is not None else NO_STAGE
        count_forward(stage, self.config.device)
        try:
            if peer_role(context) == "client":
                self._check_direct_forward(request)
            return self._forward(request)
        except Exception as e:
            count_failure(stage, self.config.device, status_code(e) or grpc.StatusCode.UNKNOWN,
                          "forward")
            raise

    def _check_direct_forward(self, request: pb.Activation) -> None:
        """A direct client may send requests to the first stage only, each with the id of
        the stream its result goes to."""
        runner = self.engine.runner
        if not request.reply_to:
            raise NotAllowed("a client-role certificate may Forward only as a direct client: "
                             "expected a reply_to (the client's id), got none")
        if request.step.sequence_id or request.rows:
            raise NotAllowed("a direct client sends Infer requests only; generation goes "
                             "through the coordinator's Generate")
        if runner is not None and runner.spec.stage != 0:
            raise NotAllowed(f"a direct client may Forward only to the first stage; this "
                             f"worker serves stage {runner.spec.stage} (ask the coordinator's "
                             "WatchRoute for the first stage's address)")

    def _forward(self, request: pb.Activation) -> pb.Ack:
        received = time.perf_counter()
        received_ns = time.time_ns()
        runner = self.engine.runner
        if runner is None:
            raise NotConfigured("this worker has no stage yet: the coordinator must "
                                "configure it")
        if not 0 < len(request.request_id) <= MAX_REQUEST_ID:
            raise BadRequest(f"expected a request id of 1-{MAX_REQUEST_ID} characters, got "
                             f"{len(request.request_id)}")
        if len(request.reply_to) > MAX_REQUEST_ID:
            raise BadRequest(f"expected a reply_to of at most {MAX_REQUEST_ID} characters, got "
                             f"{len(request.reply_to)}")
        if request.epoch != runner.spec.epoch:
            raise StaleEpoch(f"request {request.request_id} belongs to pipeline epoch "
                             f"{request.epoch}, this worker serves epoch {runner.spec.epoch}")
        step = None
        if request.HasField("step"):
            problem = check_step(request.step)
            if problem:
                raise BadRequest(f"request {request.request_id}: {problem}")
            step = pb.Step()
            step.CopyFrom(request.step)
        rows = [pb.Step.FromString(r.SerializeToString()) for r in request.rows]  # copies
        if rows:
            problem = check_rows(rows) or (
                "a batch's rows come instead of a step; expected no step"
                if step is not None else None)
            if problem:
                raise BadRequest(f"request {request.request_id}: {problem}")
        if step is not None and step.release:
            if request.tensors:
                raise BadRequest(f"request {request.request_id} releases sequence "
                                 f"{step.sequence_id}; expected no tensors, got "
                                 f"{len(request.tensors)}")
            arrays = {}
        else:
            arrays = decode_tensors(request.tensors)
            runner.check(arrays)
        # Copies of the timings, not references into the request: a reference keeps the
        # whole request message, tensor bytes included, alive until the job is sent.
        timings = [pb.StageTiming.FromString(t.SerializeToString()) for t in request.timings]
        self.engine.submit(Job(request.request_id, request.epoch, arrays, timings, received,
                               runner, received_ns=received_ns, step=step, rows=rows,
                               reply_to=request.reply_to))
        return pb.Ack()

    @grpc_errors
    def Subscribe(self, request: pb.SubscribeRequest, context) -> Iterator[pb.Event]:
        if peer_role(context) == "client":
            self._check_direct_subscribe(request)
        if len(request.client_id) > MAX_REQUEST_ID:
            raise BadRequest(f"expected a client_id of at most {MAX_REQUEST_ID} characters, "
                             f"got {len(request.client_id)}")
        if request.release:
            if self.events.release(request.coordinator_id):
                log.info("coordinator %s let go of this worker", request.coordinator_id)
            return
        try:
            stream = self.events.subscribe(request.coordinator_id, MAX_SUBSCRIBERS,
                                           client_id=request.client_id)
        except (TakenOver, TooManySubscribers) as e:
            log.warning("refused a Subscribe from %s: %s",
                        request.coordinator_id or "a caller without a coordinator id", e)
            raise
        # Gone from the table as soon as the call ends, not at the next poll: whether the
        # owner holds a stream decides whether another coordinator may configure us. The
        # wake ends the wait below at once, so that it need not poll often (each wake-up
        # of this thread is CPU the stage's compute needs).
        def ended() -> None:
            self.events.unsubscribe(stream)
            stream.wake()

        context.add_callback(ended)
        try:
            while context.is_active() and not self.engine.stopping.is_set():
                try:
                    item = stream.queue.get(timeout=SUBSCRIBE_POLL_S)
                except queue.Empty:
                    continue
                if item is WAKE:
                    continue
                if item is END:
                    assert stream.ended is not None
                    raise stream.ended
                yield item
        finally:
            self.events.unsubscribe(stream)

    def _check_direct_subscribe(self, request: pb.SubscribeRequest) -> None:
        """A direct client may hear only its own results, at the last stage."""
        runner = self.engine.runner
        if not request.client_id:
            raise NotAllowed("a client-role certificate may Subscribe only as a direct client: "
                             "expected a client_id, got none")
        if request.release:
            raise NotAllowed("a client-role certificate cannot let go of a worker for its "
                             "coordinator: expected release unset, got it set")
        if runner is None or not runner.spec.is_last:
            where = "no stage" if runner is None else f"stage {runner.spec.stage}"
            raise NotAllowed(f"a direct client may Subscribe only at the last stage; this "
                             f"worker serves {where} (ask the coordinator's WatchRoute for "
                             "the last stage's address)")

    @grpc_errors
    def GetProfile(self, request: pb.ProfileRequest, context) -> pb.WorkerProfile:
        if not (math.isfinite(request.since) and request.since >= 0):
            raise BadRequest(f"since: expected a unix time in seconds >= 0 (0: all samples), "
                             f"got {request.since}")
        samples = [pb.MemorySample(**vars(s)) for s in self.sampler.since(request.since)]
        return pb.WorkerProfile(samples=samples, interval_s=self.sampler.interval_s,
                                memory_budget_mb=self.config.memory_budget_mb,
                                rss_at_load_bytes=self._loaded[0], load_ms=self._loaded[1])

    @grpc_errors
    def Calibrate(self, request: pb.CalibrateRequest, context) -> pb.CalibrateReply:
        seconds = request.seconds
        if not (math.isfinite(seconds) and 0 <= seconds <= MAX_CALIBRATE_SECONDS):
            raise BadRequest(f"seconds: expected 0-{MAX_CALIBRATE_SECONDS:g} (0: no "
                             f"benchmark), got {seconds}")
        reply = pb.CalibrateReply(startup_rss_bytes=self.startup_rss,
                                  threads=self.config.threads or 0,
                                  facts=pb.DeviceFacts(**device_facts()))
        if request.seconds > 0:
            if self.engine.busy():
                raise Busy("this worker is serving requests; calibrate an idle worker")

            reply.gflops, reply.runs = measure_gflops(seconds, self.config.threads)
        return reply

    @grpc_errors
    def GetStatus(self, request: pb.StatusRequest, context) -> pb.WorkerStatus:
        runner = self.engine.runner
        done, failed, total = self.engine.stats()
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
            queue_depth=self.engine.queue_depth(),
            facts=pb.DeviceFacts(**device_facts()),
        )
        if runner is not None:
            s = runner.spec
            status.stage, status.shard_sha256 = s.stage, s.shard_sha256
            status.plan_id, status.epoch = s.plan_id, s.epoch
            status.mode = s.mode
        status.coordinator_id = self.events.owner or ""
        status.sequences, status.kv_cache_bytes = self.engine.sessions.stats()
        status.batched_runs, status.batched_rows = self.engine.batched()
        return status

    # ------------------------------------------------------------------ internals

    def message_limits(self) -> dict:
        """Per method, the bound on one request message (see ``add_service``): a Forward
        up to the plan's largest for this stage, upload chunks of about 1 MiB."""
        def forward() -> tuple[int, str]:
            runner = self.engine.runner
            if runner is None or not runner.spec.max_request_bytes:
                return 0, ""
            return (runner.spec.max_request_bytes,
                    f"the largest the plan allows {runner.spec.where}")

        return {"Forward": forward,
                "UploadShard": lambda: (MAX_CHUNK_BYTES, "upload chunks of up to 1 MiB")}

    def stop(self) -> None:
        self.engine.stop()
        self.events.wake_all()  # their streams end now, not at their next look
        self.sampler.stop()


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
    stop = catch_stop_signals()  # before anyone is told we are ready
    server, port, servicer, health_servicer = start_worker(config)
    if on_ready:
        on_ready(port)
    announcer = _announce(config, port) if config.announce else None
    systemd.ready(f"serving on port {port} as {config.device}")  # if under systemd
    try:
        wait_for_signal(stop)
        log.info("stopping: no new requests, %.0f s for calls in flight", grace)
        systemd.stopping()
        health_servicer.enter_graceful_shutdown()
    finally:
        if announcer is not None:
            announcer.stop()  # browsers drop the worker now, not after the record's TTL
        server.stop(grace).wait()
        servicer.stop()


def _announce(config: WorkerConfig, port: int):
    from edge.transport.discovery import cluster_id
    from edge.worker.announce import announce

    return announce(parse_address(config.listen, allow_port_zero=True)[0], port, config.name,
                    config.device, config.memory_budget_mb,
                    cluster_id(config.security, config.cluster_id), config.security.tls)
