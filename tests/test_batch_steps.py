"""A batch of decode steps on one stage (``Activation.rows``, ``sessions.run_batch``):
sequences of different lengths, left-padded into one run of the seeded tiny Llama, give
each row the logits, the token and the caches its own single step gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.export.decoder import export_llama
from edge.planning.plan import TensorSpec
from edge.proto import edge_pb2 as pb
from edge.worker.errors import PositionMismatch
from edge.worker.sessions import SessionStore, check_rows, run_batch, run_step
from edge.worker.stage import StageRunner, StageSpec

LENGTHS = [3, 11, 6, 1]   # prompt tokens of each sequence: every row pads differently
KEY = ("p", 1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return export_llama("tiny", seed=0, out=tmp_path_factory.mktemp("llama") / "model.onnx",
                        verify=False)


def runner(llama: Path, last: bool) -> StageRunner:
    """The whole tiny Llama as one stage; ``last`` False: it sends its logits on, so the
    test sees them."""
    import onnxruntime as ort

    s = ort.InferenceSession(str(llama))
    pasts = [i.name for i in s.get_inputs() if i.name.startswith("past_key_values")]
    ints = ("batch", "sequence")
    spec = StageSpec(
        stage=0, num_stages=1, shard_sha256="x", epoch=KEY[1], plan_id=KEY[0],
        inputs=(TensorSpec("input_ids", "int64", ints),
                TensorSpec("attention_mask", "int64", ("batch", "total")),
                TensorSpec("position_ids", "int64", ints)),
        outputs=(TensorSpec("logits", "float32", ("batch", "sequence", 1000)),),
        next_address="" if last else "next:1", state=tuple(
            (p, p.replace("past_key_values", "present")) for p in pasts),
        max_sequences=8, context=64)
    return StageRunner(spec, llama, threads=1)


def tensors(ids, mask, positions) -> dict[str, np.ndarray]:
    return {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64),
            "position_ids": np.asarray(positions, np.int64)}


def prefilled(r: StageRunner) -> SessionStore:
    """A store holding the prompts of LENGTHS (as sequences s0, s1, ...)."""
    store = SessionStore()
    store.reset(KEY)
    rng = np.random.default_rng(1)
    for i, n in enumerate(LENGTHS):
        ids = rng.integers(0, 1000, (1, n))
        run_step(r, store, KEY[1], tensors(ids, np.ones((1, n)), np.arange(n)[None]),
                 pb.Step(sequence_id=f"s{i}", position=0))
    return store


def batch_tensors(tokens: list[int]) -> dict[str, np.ndarray]:
    """The coordinator's left-padded decode step of every sequence."""
    longest = max(LENGTHS)
    return tensors([[t] for t in tokens],
                   [[0] * (longest - n) + [1] * (n + 1) for n in LENGTHS],
                   [[n] for n in LENGTHS])


def rows(sampling: pb.Sampling | None = None) -> list[pb.Step]:
    return [pb.Step(sequence_id=f"s{i}", position=n, sampling=sampling or pb.Sampling())
            for i, n in enumerate(LENGTHS)]


def solo(r: StageRunner, store: SessionStore, i: int, token: int,
         sampling: pb.Sampling | None = None):
    n = LENGTHS[i]
    return run_step(r, store, KEY[1], tensors([[token]], np.ones((1, n + 1)), [[n]]),
                    pb.Step(sequence_id=f"s{i}", position=n,
                            sampling=sampling or pb.Sampling()))


def caches(store: SessionStore, i: int, length: int) -> dict[str, np.ndarray]:
    return store.take(KEY, f"s{i}", length, 8, "test")


def test_padded_batch_gives_each_row_its_solo_logits_and_caches(llama):
    r = runner(llama, last=False)
    tokens = [17, 402, 5, 999]
    one, many = prefilled(r), prefilled(r)
    outputs, drawn = run_batch(r, many, KEY[1], batch_tensors(tokens), rows())
    assert drawn is None and outputs["logits"].shape == (len(LENGTHS), 1, 1000)
    for i, n in enumerate(LENGTHS):
        want, _ = solo(r, one, i, tokens[i])
        np.testing.assert_allclose(outputs["logits"][i], want["logits"][0], atol=1e-4)
        got, ref = caches(many, i, n + 1), caches(one, i, n + 1)
        assert got.keys() == ref.keys()
        for name in ref:
            assert got[name].shape == ref[name].shape == (1, 2, n + 1, 16)
            np.testing.assert_allclose(got[name], ref[name], atol=1e-5)
    # The caches a batch kept carry on as a single step's do: a second step each, solo.
    for i in range(len(LENGTHS)):
        a, _ = run_step(r, many, KEY[1], tensors([[7]], np.ones((1, LENGTHS[i] + 2)),
                                                 [[LENGTHS[i] + 1]]),
                        pb.Step(sequence_id=f"s{i}", position=LENGTHS[i] + 1))
        b, _ = run_step(r, one, KEY[1], tensors([[7]], np.ones((1, LENGTHS[i] + 2)),
                                                [[LENGTHS[i] + 1]]),
                        pb.Step(sequence_id=f"s{i}", position=LENGTHS[i] + 1))
        np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-4)


@pytest.mark.parametrize("sampling", [pb.Sampling(),
                                      pb.Sampling(temperature=0.9, top_k=50, seed=123)])
def test_last_stage_draws_each_row_as_its_solo_step(llama, sampling):
    r = runner(llama, last=True)
    tokens = [3, 30, 300, 900]
    one, many = prefilled(r), prefilled(r)
    outputs, drawn = run_batch(r, many, KEY[1], batch_tensors(tokens), rows(sampling))
    assert outputs == {}
    want = [int(solo(r, one, i, t, sampling)[1][0]) for i, t in enumerate(tokens)]
    assert drawn.tolist() == want


def test_a_row_at_the_wrong_position_refuses_the_batch_and_changes_no_cache(llama):
    r = runner(llama, last=True)
    store = prefilled(r)
    bad = rows()
    bad[2].position += 1
    with pytest.raises(PositionMismatch, match="sequence s2"):
        run_batch(r, store, KEY[1], batch_tensors([1, 2, 3, 4]), bad)
    for i, n in enumerate(LENGTHS):
        assert caches(store, i, n)["past_key_values.0.key"].shape[2] == n


@pytest.mark.parametrize("rows_, message", [
    ([pb.Step(sequence_id="a", position=0)], "position of at least 1"),
    ([pb.Step(sequence_id="a", position=3, release=True)], "release"),
    ([pb.Step(sequence_id="a", position=3), pb.Step(sequence_id="a", position=3)], "twice"),
    ([pb.Step(sequence_id="", position=3)], "sequence id"),
])
def test_bad_rows_are_named(rows_, message):
    assert message in check_rows(rows_)
