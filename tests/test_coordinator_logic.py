"""The coordinator's retry and failover logic, against in-memory workers
(``edge.coordinator.fake``): no processes, no sockets, each test well under a second.

The same situations run against real workers in test_failover.py and
test_field_defects.py; here they are cheap enough to cover every branch.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from edge.coordinator.deploy import DeployError
from edge.coordinator.fake import FakeCluster, FakeReplanner, as_array, fake_devices, fake_plan
from edge.coordinator.pipeline import InferError, Pipeline
from edge.coordinator.workers import GrpcWorker, WorkerClient
from edge.transport.channels import Deadlines
from helpers import until

X = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}


class Setup:
    """A fake cluster of ``n`` primaries and ``standby`` spares, and pipelines over it."""

    def __init__(self, root, n: int, standby: int, replan: bool):
        self.primaries = fake_devices(n)
        self.spares = fake_devices(standby, prefix="spare", standby=True)
        self.plan_dir = root / "plan"
        self.plan = fake_plan(self.plan_dir, self.primaries, self.spares)
        self.cluster = FakeCluster([d.address for d in self.primaries + self.spares])
        self.replan = replan
        self.pipelines: list[Pipeline] = []
        self.pool = ThreadPoolExecutor(4)

    def pipeline(self, start: bool = True, **kw) -> Pipeline:
        kw = {"deadlines": Deadlines(infer=5, ready=0.5), "health_interval": 0.01,
              "backoff_s": 5.0, **kw}
        replanner = FakeReplanner(self.plan, self.plan_dir) if self.replan else None
        p = Pipeline(self.plan, self.plan_dir, worker_factory=self.cluster.client,
                     replanner=replanner, **kw)
        self.pipelines.append(p)
        if start:
            p.start()
        return p

    def worker(self, name: str):
        d = next(d for d in self.primaries + self.spares if d.name == name)
        return self.cluster[d.address]

    def close(self) -> None:
        for w in self.cluster.workers.values():
            w.release()
        for p in self.pipelines:
            p.close()
        self.pool.shutdown(wait=True)


@pytest.fixture
def setup(tmp_path):
    made = []

    def make(n: int = 2, standby: int = 0, replan: bool = False) -> Setup:
        made.append(Setup(tmp_path / f"c{len(made)}", n, standby, replan))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _answer(p: Pipeline, stages: int) -> None:
    np.testing.assert_array_equal(as_array(p.infer(X).outputs), X["x"] + stages)


def _names(p: Pipeline) -> list[str]:
    return [w.stage.device.name for w in p.workers]


def test_the_fake_and_grpc_are_worker_clients(setup):
    s = setup(1)
    assert isinstance(s.cluster.client(s.primaries[0].address), WorkerClient)
    assert isinstance(GrpcWorker(None, "127.0.0.1:1"), WorkerClient)
    p = s.pipeline()
    _answer(p, 1)
    assert p.requests_done == 1 and p.in_flight == 0


def test_a_request_in_flight_when_a_stage_dies_is_resent_and_answered_once(setup):
    s = setup(2, standby=1)
    p = s.pipeline()
    s.worker("fake-1").hold()
    pending = s.pool.submit(p.infer, X)
    until(lambda: s.worker("fake-1").held == 1, what="the request to reach stage 1")
    s.worker("fake-1").kill()
    np.testing.assert_array_equal(as_array(pending.result(2).outputs), X["x"] + 2)
    assert _names(p) == ["fake-0", "spare-0"]
    r = p.recoveries[-1]
    assert (r.how, r.lost, r.joined, r.resent) == ("standby", ("fake-1",), ("spare-0",), 1)
    assert r.uploaded_bytes > 0  # the spare had no shard
    assert s.worker("fake-0").forwards == 2 and s.worker("spare-0").forwards == 1
    assert (p.requests_done, p.requests_failed, p.in_flight) == (1, 0, 0)


def test_a_standby_takes_a_lost_stage_and_later_requests_go_there(setup):
    s = setup(2, standby=1)
    p = s.pipeline()
    epoch = p.epoch
    s.worker("fake-0").kill()
    until(lambda: p.recoveries, what="the recovery")
    _answer(p, 2)
    assert _names(p) == ["spare-0", "fake-1"] and p.epoch > epoch
    assert p.status().not_serving == ""


def test_a_device_refusing_its_stage_is_backed_off_and_the_rest_replanned(setup, caplog):
    s = setup(2, standby=1, replan=True)
    s.worker("spare-0").refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
    p = s.pipeline()
    s.worker("fake-0").kill()
    until(lambda: p.recoveries, what="the recovery")
    _answer(p, 1)
    assert _names(p) == ["fake-1"] and p.recoveries[-1].how == "re-planned"
    assert p.replanner.replans == [("fake-1",)]
    assert s.worker("spare-0").configured == 0
    time.sleep(0.1)  # ten monitor rounds: still backed off, asked once
    left_out = [r.getMessage() for r in caplog.records if "leaving device spare-0" in
                r.getMessage()]
    assert len(left_out) == 1 and "RESOURCE_EXHAUSTED" in left_out[0], left_out


def test_only_the_standby_left_serves_then_nothing_fails_at_once(setup):
    s = setup(2, standby=1, replan=True)
    p = s.pipeline()
    s.worker("fake-0").kill()
    s.worker("fake-1").kill()
    until(lambda: _names(p) == ["spare-0"], what="the standby alone")
    _answer(p, 1)
    s.worker("spare-0").kill()
    until(lambda: p.status().not_serving, what="the pipeline to say it cannot serve")
    start = time.monotonic()
    with pytest.raises(InferError) as e:
        p.infer(X)
    assert time.monotonic() - start < 0.1
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.retryable
    assert "no device can serve" in str(e.value) and "spare-0" in str(e.value)
    assert p.recoveries[-1].how == "unavailable"


def test_nothing_can_serve_fails_what_is_in_flight_and_a_device_back_serves_again(setup):
    s = setup(1)
    p = s.pipeline()
    told = []
    p.watch_serving(told.append)
    s.worker("fake-0").hold()
    pending = s.pool.submit(p.infer, X)
    until(lambda: s.worker("fake-0").held == 1, what="the request to reach stage 0")
    s.worker("fake-0").kill()
    with pytest.raises(InferError) as e:
        pending.result(1)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert told[0] == "" and "no device can serve" in told[-1]
    s.worker("fake-0").restart(empty=False)
    until(lambda: told[-1] == "", what="serving again")
    # Results published while no stream is open are lost (as with real workers): wait for
    # the listener to reconnect.
    until(lambda: s.worker("fake-0").subscribers, what="the event stream again")
    _answer(p, 1)
    assert [r.how for r in p.recoveries] == ["unavailable", "original"]
    assert p.recoveries[-1].uploaded_bytes == 0  # its shard was cached


def test_a_worker_that_restarts_empty_gets_its_stage_again(setup):
    s = setup(2)
    p = s.pipeline()
    w = s.worker("fake-1")
    w.kill()
    w.restart(empty=True)
    until(lambda: w.configured == 2, what="the stage deployed again")
    until(lambda: w.subscribers, what="the event stream again")
    _answer(p, 2)
    assert _names(p) == ["fake-0", "fake-1"] and p.recoveries[-1].uploaded_bytes > 0


def test_a_full_first_stage_is_retried_with_backoff(setup):
    s = setup(2)
    p = s.pipeline()
    s.worker("fake-0").full = 2
    _answer(p, 2)
    assert s.worker("fake-0").full == 0 and not p.recoveries


def test_without_failover_a_refusal_answers_the_request(setup):
    s = setup(2)
    p = s.pipeline(failover=False)
    s.worker("fake-0").full = 1
    with pytest.raises(InferError) as e:
        p.infer(X)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in str(e.value) and "fake-0" in str(e.value)
    _answer(p, 2)


def test_without_failover_a_lost_stage_fails_what_is_in_flight(setup):
    s = setup(2)
    p = s.pipeline(failover=False, diagnose=lambda device: f"{device.name} ran out of memory")
    s.worker("fake-1").hold()
    pending = s.pool.submit(p.infer, X)
    until(lambda: s.worker("fake-1").held == 1, what="the request to reach stage 1")
    s.worker("fake-1").kill()
    with pytest.raises(InferError) as e:
        pending.result(1)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "fake-1 ran out of memory" in str(e.value)


def test_a_next_hop_gone_is_reported_by_its_upstream_and_failed_over(setup):
    s = setup(2, standby=1)
    p = s.pipeline(misses=1000)  # only the stage's report can tell
    s.worker("fake-1").alive = False  # gone without breaking the stream yet
    _answer(p, 2)
    assert _names(p) == ["fake-0", "spare-0"]


def test_a_second_coordinator_is_refused_and_take_over_stops_the_first(setup):
    s = setup(2)
    old = s.pipeline()
    told = []
    old.watch_serving(told.append)
    with pytest.raises(DeployError) as refused:
        s.pipeline()
    assert old.coordinator_id in str(refused.value)
    _answer(old, 2)
    s.worker("fake-1").hold()
    pending = s.pool.submit(old.infer, X)
    until(lambda: s.worker("fake-1").held == 1, what="the request to reach stage 1")
    new = s.pipeline(take_over=True)
    until(lambda: old.taken_over, what="the old coordinator to notice")
    with pytest.raises(InferError) as e:
        pending.result(1)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and not e.value.retryable
    start = time.monotonic()
    with pytest.raises(InferError) as e:
        old.infer(X)
    assert time.monotonic() - start < 0.1 and not e.value.retryable
    assert "taken over" in str(e.value) and new.coordinator_id in str(e.value)
    assert told[-1] and "taken over" in old.status().not_serving
    s.worker("fake-1").release()
    _answer(new, 2)
    assert not old.recoveries  # it did not fight back


def test_a_request_in_flight_through_more_losses_than_max_losses_fails(setup):
    s = setup(2, standby=2)
    p = s.pipeline(max_losses=1)
    s.worker("fake-1").hold()
    s.worker("spare-0").hold()
    pending = s.pool.submit(p.infer, X)
    until(lambda: s.worker("fake-1").held == 1, what="the request to reach stage 1")
    s.worker("fake-1").kill()
    until(lambda: s.worker("spare-0").held == 1, what="the request resent to the spare")
    s.worker("spare-0").kill()
    with pytest.raises(InferError) as e:
        pending.result(1)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "through 2 device losses" in str(e.value)
    until(lambda: _names(p) == ["fake-0", "spare-1"], what="the second spare")
    _answer(p, 2)


def test_a_result_from_an_older_epoch_still_answers(setup):
    s = setup(2, standby=1)
    p = s.pipeline()
    last = s.worker("fake-1")
    last.hold()
    pending = s.pool.submit(p.infer, X)
    until(lambda: last.held == 1, what="the request to reach the last stage")
    epoch = p.epoch
    s.worker("fake-0").kill()
    until(lambda: last.held == 2, what="the request resent under the new epoch")
    assert p.epoch > epoch
    last.release(1)  # the copy sent under the old epoch
    np.testing.assert_array_equal(as_array(pending.result(1).outputs), X["x"] + 2)
    last.release()  # the second copy's result is ignored
    time.sleep(0.02)
    assert (p.requests_done, p.requests_failed) == (1, 0)


def test_a_failed_stage_under_an_older_epoch_is_ignored(setup):
    s = setup(2)
    p = s.pipeline()
    from edge.proto import edge_pb2 as pb

    p._listeners.on_event(pb.Event(failure=pb.Failure(
        request_id="gone", stage=0, code=grpc.StatusCode.INTERNAL.value[0], message="x",
        epoch=p.epoch - 1)))
    _answer(p, 2)
    assert p.requests_failed == 0


@pytest.fixture(autouse=True)
def _quick(request):
    """Every test here runs in well under a second."""
    start = time.monotonic()
    yield
    assert time.monotonic() - start < 1.5, f"{request.node.name} took too long"
    logging.getLogger("edge").setLevel(logging.NOTSET)


def test_workers_that_answer_requests_are_not_health_checked_meanwhile(setup):
    """A request answered since the last monitor round passed through every stage: the
    round skips their health checks (a cost on a coordinator's small board), and makes
    them again once requests stop."""
    s = setup(n=2)
    p = s.pipeline(health_interval=0.02)
    checks = (lambda: sum(s.cluster[d.address].health_checks for d in s.primaries))
    before, end = checks(), time.monotonic() + 0.4
    while time.monotonic() < end:
        p.infer(X)
    busy = checks() - before
    before = checks()
    time.sleep(0.4)
    idle = checks() - before
    assert idle >= 10 and busy <= idle / 4, (busy, idle)
