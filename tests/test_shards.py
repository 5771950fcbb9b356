"""Shards of real exported models: valid on their own, and chained they equal the model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge.export.inputs import example_inputs
from edge.build import make_plan
from edge.planning.plan import Device, load_plan
from edge.shards.runtime import session_options
from edge.shards.build import gather_tables
from helpers import reference

CASES = {
    # kind: (bindings, [(batch, seq-or-side), ...])
    "bert": ({"batch": 1, "sequence": 128}, [(1, 16), (3, 37)]),
    "unet": ({"batch": 1, "height": 64, "width": 64}, [(1, 64), (2, 32)]),
}


def _devices(k: int) -> list[Device]:
    # Unequal speeds so the split is not trivially even; memory is ample.
    return [Device(name=f"pi-{i}", address=f"pi-{i}:50051", profile="test", memory_mb=4096,
                   gflops=g, bandwidth_mbps=1000.0) for i, g in zip(range(k), (2.0, 3.0, 2.5))]


@pytest.fixture(scope="module", params=sorted(CASES))
def planned(request, tmp_path_factory):
    kind = request.param
    model = request.getfixturevalue(f"{kind}_tiny")
    out = tmp_path_factory.mktemp(f"plan-{kind}")
    plan = make_plan(model, _devices(3), out, bindings=CASES[kind][0])
    return kind, model, out, plan


def test_plan_round_trip(planned):
    kind, model, out, plan = planned
    assert load_plan(out / "plan.json") == plan
    assert [s.node_range for s in plan.stages][0][0] == 0
    assert plan.stages[-1].node_range[1] == plan.model.num_nodes
    assert {t.name for t in plan.stages[0].inputs} == {t.name for t in plan.model.inputs}
    assert {t.name for t in plan.stages[-1].outputs} == {t.name for t in plan.model.outputs}
    for a, b in zip(plan.stages, plan.stages[1:]):
        assert a.node_range[1] == b.node_range[0]
        assert a.outputs == b.inputs
    assert plan.bottleneck_ms == max(s.predicted.time_ms for s in plan.stages)
    # shapes stay symbolic where the model is dynamic
    assert "batch" in plan.stages[1].inputs[-1].shape or any(
        "batch" in t.shape for t in plan.stages[1].inputs)


def test_each_shard_valid_alone(planned, tmp_path):
    import hashlib
    import shutil

    kind, model, out, plan = planned
    for st in plan.stages:
        # Alone: the .onnx and only its own data files, in a folder of their own.
        alone = tmp_path / f"stage-{st.index}"
        alone.mkdir()
        shutil.copy(out / st.shard, alone)
        for f in st.data_files:
            assert hashlib.sha256((out / f.path).read_bytes()).hexdigest() == f.sha256
            assert (out / f.path).stat().st_size == f.size
            shutil.copy(out / f.path, alone)
        path = alone / (out / st.shard).name
        onnx.checker.check_model(str(path), full_check=True)
        m = onnx.load(str(path), load_external_data=False)
        locations = {e.value for t in m.graph.initializer for e in t.external_data
                     if e.key == "location"}
        assert locations == {f.name for f in st.data_files}
        gathered = gather_tables(m.graph)
        for t in m.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                where = {e.key: e.value for e in t.external_data}
                assert where["location"].endswith(".gather.data") == (t.name in gathered)
                assert int(where["offset"]) % 4096 == 0
        assert path.stat().st_size == st.shard_bytes
        if kind == "bert" and st.index == 0:  # the embedding tables are read at random
            assert [f.random_access for f in st.data_files] == [False, True]
        sess = ort.InferenceSession(str(path), session_options(1),
                                    providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        # the shard reads only what it needs; pass-throughs it does not touch are not inputs
        assert names <= {t.name for t in st.inputs}
        assert {o.name for o in sess.get_outputs()} == (
            {t.name for t in st.outputs} - set(st.passthrough))


def test_chained_equals_full(planned, run_chain):
    kind, model, out, plan = planned
    for batch, size in CASES[kind][1]:
        feeds = example_inputs(kind, "tiny", batch=batch, seq=size, seed=1)
        want = reference(model, feeds, session_options(1))
        got = run_chain(out, plan, feeds)
        assert set(got) == set(want)
        for name in want:
            assert got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)


def test_cuts_carry_more_than_one_tensor(planned):
    kind, model, out, plan = planned
    if kind == "bert":
        # hidden state, the float mask and int64 shape tensors reused by every layer
        for st in plan.stages[1:]:
            assert len(st.inputs) > 1, [t.describe() for t in st.inputs]
    else:
        # a UNet cut inside the encoder/decoder carries the open skips
        assert max(len(st.inputs) for st in plan.stages[1:]) > 1


def test_gather_tables_only_when_read_as_table_alone():
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.zeros((64, 8), np.float32), "emb")
    tied = numpy_helper.from_array(np.zeros((64, 8), np.float32), "tied")
    w = numpy_helper.from_array(np.zeros((8, 8), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["a"]),
         helper.make_node("Gather", ["tied", "ids"], ["b"]),
         helper.make_node("MatMul", ["a", "w"], ["c"]),
         helper.make_node("MatMul", ["c", "tied"], ["d"], name="tied_head")],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)], [emb, tied, w])
    # "tied" is also read whole by a MatMul: not a random-access table
    assert gather_tables(g) == {"emb"}
