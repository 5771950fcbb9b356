"""The Python API (issue 13): edge.plan, edge.serve and edge.Client, as a user embeds them."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import yaml

import edge
from edge.coordinator.pipeline import InferError
from edge.errors import ConfigError
from edge.export import example_inputs
from edge.worker.launch import LocalWorkers
from helpers import reference


def test_plan_serve_and_call_as_the_readme_says(bert_tiny, tmp_path):
    x = example_inputs("bert", "tiny", batch=1, seq=16)
    want = reference(bert_tiny, x)
    with LocalWorkers(2, tmp_path / "w", threads=1) as workers:
        cluster = {"devices": [{"name": f"pi-{i}", "address": a, "profile": "rpi4b-2gb"}
                               for i, a in enumerate(workers.addresses)]}
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
        plan = edge.plan(bert_tiny, tmp_path / "cluster.yaml", out=tmp_path / "build",
                         dims={"sequence": 16})
        assert len(plan.stages) == 2 and (tmp_path / "build" / "plan.json").is_file()
        # The CLI's defaults: batch=1 was filled in, the sequence given.
        assert plan.model.bindings == {"batch": 1, "sequence": 16}
        with edge.serve(tmp_path / "build") as pipe:
            got = pipe(x)
            assert set(got) == set(want)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0)
            assert pipe.address.startswith("127.0.0.1:") and not pipe.address.endswith(":0")
            with edge.Client(pipe.address) as client:
                remote = client(x)
            for k in want:
                np.testing.assert_allclose(remote[k], want[k], atol=1e-4, rtol=0)
            # Bad input says what was expected, with the status a client would get.
            with pytest.raises(InferError) as e:
                pipe({"input_ids": x["input_ids"]})
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "attention_mask" in str(e.value)


def test_bad_arguments_are_config_errors(bert_tiny, tmp_path):
    from edge.planning.cluster import cluster_from_profile

    cluster = cluster_from_profile("rpi4b-2gb", 2)  # a Cluster object works as a file does
    with pytest.raises(ConfigError, match="modes: expected some of fp32.*got \\['fp64'\\]"):
        edge.plan(bert_tiny, cluster, out=tmp_path, modes=["fp64"])
    with pytest.raises(ConfigError, match="expected an .npz"):
        edge.plan(bert_tiny, cluster, out=tmp_path, sample=tmp_path / "missing.npz")
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        edge.nothing  # noqa: B018
