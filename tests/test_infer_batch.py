"""Infer requests that wait for room in the pipeline travel as one batch
(``edge.coordinator.infer_batch``), against in-memory workers: each request gets its own
rows back, a bad request in a batch fails alone, a failover resends the batch whole.
Against real workers and a model: test_e2e.py."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from edge.coordinator.fake import FakeCluster, FakeReplanner, fake_devices, fake_plan
from edge.coordinator.infer_batch import batch_dim
from edge.coordinator.pipeline import InferError, Pipeline
from edge.errors import TensorError
from edge.planning.plan import TensorSpec
from edge.proto import edge_pb2 as pb
from edge.transport.codec import decode_tensors, encode_tensors, split_rows, stack_rows
from edge.transport.channels import Deadlines
from helpers import until

X = (TensorSpec("x", "float32", ("batch", 4)),)


class Recorder:
    """A stage function that adds one and records the rows of every run; a row whose
    first value is negative makes the run fail, as a worker refusing bad contents."""

    def __init__(self):
        self.runs: list[tuple[int, int]] = []  # (stage, rows)
        self.lock = threading.Lock()

    def __call__(self, config: pb.StageConfig, arrays: dict) -> dict:
        x = arrays["x"]
        with self.lock:
            self.runs.append((config.stage, x.shape[0]))
        if (x[:, 0] < 0).any():
            raise ValueError("a negative row")
        return {"x": x + 1}

    def rows(self, stage: int) -> list[int]:
        with self.lock:
            return [r for s, r in self.runs if s == stage]


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(n: int = 2, standby: int = 0, inputs=X, **kw):
        devices = fake_devices(n)
        spares = fake_devices(standby, prefix="spare", standby=True)
        plan = fake_plan(tmp_path / "plan", devices, spares, inputs=inputs)
        rec = Recorder()
        fc = FakeCluster([d.address for d in devices + spares], stage_fn=rec)
        kw = {"deadlines": Deadlines(infer=10, ready=0.5), "health_interval": 0.01,
              "infer_batch": 8, **kw}
        p = Pipeline(plan, tmp_path / "plan", worker_factory=fc.client,
                     replanner=FakeReplanner(plan, tmp_path / "plan"), **kw)
        made.append((fc, p))
        p.start()
        return fc, p, rec, devices

    yield make
    for fc, p in made:
        for w in fc.workers.values():
            w.release()
        p.close()


def _send(pool, p: Pipeline, values: list[float]):
    return [pool.submit(p.infer, {"x": np.full((1, 4), v, np.float32)}) for v in values]


def _behind_one(pool, p: Pipeline, first, values: list[float]):
    """Hold the first stage, send one request (0.0) into the pipeline's one slot, then
    one request per value, which wait for it. The futures of both."""
    first.hold()
    lead = _send(pool, p, [0.0])
    until(lambda: first.forwards == 1)
    rest = _send(pool, p, values)
    until(lambda: p.batcher.waiting == len(values))
    return lead, rest


def test_requests_that_wait_share_a_batch_and_each_gets_its_own_rows(cluster):
    fc, p, rec, devices = cluster(n=2, infer_slots=1)
    first = fc[devices[0].address]
    sent = REGISTRY.get_sample_value("edge_infer_batched_requests_total") or 0.0
    with ThreadPoolExecutor(8) as pool:
        # The one slot is taken: these five wait, then go as one batch.
        lead, rest = _behind_one(pool, p, first, [1.0, 2.0, 3.0, 4.0, 5.0])
        assert p.in_flight == 6
        first.release()
        results = [f.result(10) for f in lead + rest]
    for v, r in zip([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], results):
        out = decode_tensors(r.outputs)["x"]
        np.testing.assert_array_equal(out, np.full((1, 4), v + 2, np.float32))
    assert rec.rows(0) == [1, 5] and rec.rows(1) == [1, 5]
    assert (p.batcher.batches, p.batcher.batched, p.batcher.largest) == (1, 5, 5)
    assert len({r.request_id for r in results[1:]}) == 1  # they ran as one request
    assert REGISTRY.get_sample_value("edge_infer_batched_requests_total") == sent + 5


def test_below_the_slots_every_request_goes_alone_at_once(cluster):
    fc, p, rec, devices = cluster(n=2)  # 4 slots: two per stage
    first = fc[devices[0].address]
    first.hold()
    with ThreadPoolExecutor(4) as pool:
        futures = _send(pool, p, [1.0, 2.0, 3.0, 4.0])
        until(lambda: first.forwards == 4)  # none waited for a slot
        first.release()
        [f.result(10) for f in futures]
    assert rec.rows(0) == [1, 1, 1, 1] and p.batcher.batches == 0


def test_max_batch_and_slot_hand_over(cluster):
    fc, p, rec, devices = cluster(n=1, infer_slots=1, infer_batch=2)
    first = fc[devices[0].address]
    with ThreadPoolExecutor(8) as pool:
        lead, rest = _behind_one(pool, p, first, [1.0, 2.0, 3.0, 4.0, 5.0])
        first.release()  # stops holding: the next ones run as they come
        results = [f.result(10) for f in lead + rest]
    for v, r in zip([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], results):
        np.testing.assert_array_equal(decode_tensors(r.outputs)["x"][0], np.full(4, v + 1))
    assert rec.rows(0) == [1, 2, 2, 1]
    assert p.batcher.largest == 2


def test_a_slot_takes_an_even_share_of_the_requests_not_all_that_wait(cluster):
    # Two slots, two requests in them, six waiting: eight requests over two slots. Taking
    # all six at the first free slot would make one batch of six cross the stages as a
    # convoy; an even share is at most four.
    fc, p, rec, devices = cluster(n=1, infer_slots=2)
    first = fc[devices[0].address]
    first.hold()
    with ThreadPoolExecutor(8) as pool:
        futures = _send(pool, p, [0.0, 1.0])
        until(lambda: first.forwards == 2)
        futures += _send(pool, p, [2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
        until(lambda: p.batcher.waiting == 6)
        first.release()
        results = [f.result(10) for f in futures]
    for v, r in enumerate(results):
        np.testing.assert_array_equal(decode_tensors(r.outputs)["x"][0], np.full(4, v + 1))
    rows = rec.rows(0)
    assert rows[:2] == [1, 1] and sum(rows[2:]) == 6
    assert 2 <= len(rows[2:]) <= 3 and max(rows[2:]) <= 4, rows


def test_a_bad_request_in_a_batch_fails_alone(cluster):
    fc, p, rec, devices = cluster(n=2, infer_slots=1)
    first = fc[devices[0].address]
    with ThreadPoolExecutor(8) as pool:
        lead, rest = _behind_one(pool, p, first, [1.0, -1.0, 3.0])
        first.release()
        good = [lead[0].result(10), rest[0].result(10), rest[2].result(10)]
        with pytest.raises(InferError) as e:
            rest[1].result(10)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "negative" in str(e.value)
    for v, r in zip([0.0, 1.0, 3.0], good):
        np.testing.assert_array_equal(decode_tensors(r.outputs)["x"][0], np.full(4, v + 2))
    # The batch of three failed at stage 0; then each of its requests ran alone.
    assert rec.rows(0) == [1, 3, 1, 1, 1]


def test_a_batch_in_flight_when_a_device_dies_is_resent_whole(cluster):
    fc, p, rec, devices = cluster(n=2, standby=1, infer_slots=1)
    first, second = fc[devices[0].address], fc[devices[1].address]
    second.hold()
    with ThreadPoolExecutor(8) as pool:
        lead = _send(pool, p, [0.0])
        until(lambda: rec.rows(0) == [1])
        rest = _send(pool, p, [1.0, 2.0, 3.0])
        until(lambda: p.batcher.waiting == 3)
        first.hold()
        second.release()  # the lead's slot passes to the batch, held in the first stage
        until(lambda: first.forwards == 2)
        first.kill()
        results = [f.result(15) for f in lead + rest]
    for v, r in zip([0.0, 1.0, 2.0, 3.0], results):
        np.testing.assert_array_equal(decode_tensors(r.outputs)["x"][0], np.full(4, v + 2))
    assert p.recoveries and p.requests_failed == 0
    assert 3 in rec.rows(1) and p.batcher.batches == 1  # sent once, resent whole


def test_a_request_that_waits_past_its_deadline_leaves(cluster):
    fc, p, rec, devices = cluster(n=1, infer_slots=1)
    first = fc[devices[0].address]
    first.hold()
    with ThreadPoolExecutor(4) as pool:
        lead = _send(pool, p, [0.0])
        until(lambda: first.forwards == 1)
        late = pool.submit(p.infer, {"x": np.zeros((1, 4), np.float32)}, 0.3)
        with pytest.raises(InferError) as e:
            late.result(10)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "slots" in str(e.value)
        assert p.batcher.waiting == 0
        first.release()
        lead[0].result(10)


def test_max_in_flight_counts_the_requests_that_wait(cluster):
    fc, p, rec, devices = cluster(n=1, infer_slots=1, max_in_flight=3)
    first = fc[devices[0].address]
    with ThreadPoolExecutor(4) as pool:
        lead, rest = _behind_one(pool, p, first, [1.0, 2.0])
        futures = lead + rest
        with pytest.raises(InferError) as e:
            p.infer({"x": np.zeros((1, 4), np.float32)})
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.release()
        [f.result(10) for f in futures]


def test_requests_of_other_sizes_do_not_share_a_batch(cluster):
    inputs = (TensorSpec("x", "float32", ("batch", "width")),)
    fc, p, rec, devices = cluster(n=1, infer_slots=1, inputs=inputs)
    first = fc[devices[0].address]
    first.hold()
    with ThreadPoolExecutor(8) as pool:
        lead = _send(pool, p, [0.0])
        until(lambda: first.forwards == 1)
        shapes = [(1, 4), (2, 6), (1, 4), (3, 6)]
        rest = [pool.submit(p.infer, {"x": np.full(s, i, np.float32)})
                for i, s in enumerate(shapes)]
        until(lambda: p.batcher.waiting == 4)
        first.release()
        results = [f.result(10) for f in lead + rest]
    for (i, s), r in zip(enumerate(shapes), results[1:]):
        np.testing.assert_array_equal(decode_tensors(r.outputs)["x"],
                                      np.full(s, i + 1, np.float32))
    # The first waiting (width 4) leads a batch of both width-4 requests (2 rows); the
    # width-6 ones (2 + 3 rows) go together next.
    assert sorted(rec.rows(0)) == [1, 2, 5]


def test_a_model_without_a_batch_dimension_is_never_batched(cluster):
    fc, p, rec, devices = cluster(n=1, infer_slots=1, inputs=(TensorSpec("x", "float32",
                                                                         (1, 4)),))
    assert batch_dim(p.plan) is None
    first = fc[devices[0].address]
    first.hold()
    with ThreadPoolExecutor(4) as pool:
        futures = _send(pool, p, [0.0, 1.0, 2.0])
        until(lambda: first.forwards == 1 and p.batcher.waiting == 2)
        first.release()
        [f.result(10) for f in futures]
    assert rec.rows(0) == [1, 1, 1]


def test_stack_and_split_rows_round_trip():
    a = encode_tensors({"x": np.arange(8, dtype=np.float32).reshape(2, 4),
                        "m": np.ones((2, 3), np.int64)})
    b = encode_tensors({"x": np.arange(4, dtype=np.float32).reshape(1, 4) + 100,
                        "m": np.zeros((1, 3), np.int64)})
    both = stack_rows([a, b])
    arrays = decode_tensors(both)
    assert arrays["x"].shape == (3, 4) and arrays["m"].shape == (3, 3)
    back = split_rows(both, [2, 1])
    for orig, got in zip([a, b], back):
        for k, v in decode_tensors(orig).items():
            np.testing.assert_array_equal(decode_tensors(got)[k], v)
    with pytest.raises(TensorError, match="first dimension of 4 rows"):
        split_rows(both, [2, 2])


def test_batching_is_off_unless_asked_for(cluster):
    fc, p, rec, devices = cluster(n=1, infer_batch=1, infer_slots=1)
    first = fc[devices[0].address]
    first.hold()
    with ThreadPoolExecutor(4) as pool:
        futures = _send(pool, p, [0.0, 1.0, 2.0])
        until(lambda: first.forwards == 3)  # none waited for a slot
        assert p.batcher.waiting == 0
        first.release()
        [f.result(10) for f in futures]
    assert rec.rows(0) == [1, 1, 1]
