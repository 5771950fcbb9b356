"""`edge bench`: a small run writes every comparison as JSON, Markdown and PNGs; the torch
peer computes what edge computes; the pure parts (split mapping, model, timeline)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.bench.measure import RequestRecord
from edge.bench.modelled import modelled_pipeline
from edge.bench.timeline import overlap_ms, reconstruct

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOL = 1e-4


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """One quick bench over two loopback workers (BERT-tiny), as the CLI runs it."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "edge", "bench", "--quick", "--model", "bert-tiny",
           "--devices", "rpi4b-2gb:2", "--scaling", "2,4", "--no-lab", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _numbers(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_quick_bench_writes_every_comparison(bench):
    r = json.loads((bench / "bench.json").read_text())
    a, b, c, d, e = (r["a_one_device"], r["b_torch"], r["c_hop"], r["d_scaling"],
                     r["e_timeline"])
    # a. one device vs the pipeline, measured and modelled
    assert _numbers(a["one_device"]["throughput_rps"], a["pipeline"]["throughput_rps"],
                    a["measured_throughput_ratio"], a["modelled_throughput_ratio"],
                    a["one_device"]["latency_ms"]["median"], a["pipeline"]["modelled"]["period_ms"])
    assert len(a["pipeline"]["stages"]) == 2
    # b. torch.distributed.pipelining, split at the same layers
    assert [s["layers"] for s in b["stages"]][-1][1] == 2  # BERT-tiny has 2 layers
    assert _numbers(b["torch_throughput_rps"], b["throughput_ratio"], b["peak_rss_ratio_max"],
                    b["torch_latency_ms"]["median"],
                    *(s["torch_peak_rss_mib"] for s in b["stages"]),
                    *(s["edge_peak_rss_mib"] for s in b["stages"]))
    # c. the hop, on loopback (the lab is skipped here: it needs root and no other lab)
    assert c["activation_bytes"] == 393216 and c["loopback"]["crossing_bytes"] == 393216
    assert _numbers(c["loopback"]["hop_ms"]["median"])
    assert c["gige"]["status"] == "unavailable"
    # d. scaling: the baseline and each count, measured and modelled
    assert [p["devices"] for p in d["points"]] == [1, 2, 4]
    for p in d["points"]:
        assert _numbers(p["latency_ms"], p["throughput_rps"], p["speedup"],
                        p["modelled_latency_ms"], p["modelled_throughput_rps"])
    # e. the timeline: a bar per stage and request
    assert {(bar[0], bar[1]) for bar in e["bars"] if bar[2] == "compute"} == {
        (i, k) for i in range(e["requests"]) for k in range(2)}
    # from the workers' own clocks: a stage never computes two requests at once
    assert e["source"].startswith("the workers' arrival timestamps")
    assert e["max_compute_overlap_ms"] <= 0.01

    md = (bench / "bench.md").read_text()
    for heading in ("| comparison | edge | baseline |", "## a. One device", "## b. torch",
                    "## c. One hop", "## d. Scaling", "## e. Timeline", "*modelled*"):
        assert heading in md
    for png in ("timeline.png", "scaling.png"):
        w, h = _png_size(bench / png)
        assert w > 300 and h > 200


def test_torch_peer_equals_edge(bench):
    """The distributed torch peer's outputs equal edge's pipeline's for the same input."""
    r = json.loads((bench / "bench.json").read_text())
    assert r["b_torch"]["max_abs_diff_vs_edge"] <= TOL


def test_torch_stages_split_like_edge_and_compute_the_model(bert_tiny, tmp_path):
    """Three stages, one of them cut inside a layer by the planner: the torch stages,
    chained, give the unsharded model's outputs."""
    import onnxruntime as ort

    from edge.bench.split import layer_splits
    from edge.bench.torch_peer import run_stages, save_stages
    from edge.export import example_inputs
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile

    plan = make_plan(bert_tiny, cluster_from_profile("rpi4b-2gb", 3).devices, tmp_path / "p",
                     bindings={"batch": 1, "sequence": 16})
    splits = layer_splits(plan, tmp_path / "p", bert_tiny)
    assert [s.embeddings for s in splits] == [True, False, False]
    assert [s.pooler for s in splits] == [False, False, True]
    # Contiguous, covering both layers, each cut rounded to the nearest layer boundary.
    assert splits[0].layers[0] == 0 and splits[-1].layers[1] == 2
    for s, t in zip(splits, splits[1:]):
        assert s.layers[1] == t.layers[0] == math.floor(s.cut_at + 0.5)
    x = example_inputs("bert", "tiny", batch=2, seq=16, seed=5)
    x["attention_mask"][1, 10:] = 0  # padding must reach every stage
    session = ort.InferenceSession(str(bert_tiny), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, x)))
    got = run_stages(save_stages("tiny", 0, splits, tmp_path / "torch"), x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=TOL, rtol=0, err_msg=k)


def test_modelled_pipeline_scales_compute_and_adds_transfer():
    m = modelled_pipeline([10.0, 20.0], [1.0, 2.0], host_gflops=100.0,
                          device_gflops=[10.0, 10.0])
    assert m["stage_ms"] == [101.0, 202.0]
    assert m["period_ms"] == 202.0 and m["latency_ms"] == 303.0
    assert m["throughput_rps"] == pytest.approx(1000 / 202, abs=1e-3)
    with pytest.raises(ValueError, match="one compute time"):
        modelled_pipeline([1.0], [1.0, 2.0], 1.0, [1.0])


def test_timeline_places_stages_in_order_and_spreads_the_gaps():
    # 2 stages; 4 ms of the 20 ms latency are unreported: 4/3 ms per hop.
    rec = RequestRecord(start_s=1.0, end_s=1.020,
                        timings=((1, 1.0, 5.0, 0.0), (0, 0.0, 8.0, 2.0)))
    bars = reconstruct([rec], num_stages=2)
    by = {(b.stage, b.kind): b for b in bars}
    gap = 4.0 / 3
    assert by[(0, "compute")].start_ms == pytest.approx(gap)
    assert by[(0, "send")].end_ms == pytest.approx(gap + 10.0)
    assert by[(1, "queue")].start_ms == pytest.approx(2 * gap + 10.0)
    assert by[(1, "compute")].end_ms == pytest.approx(20.0 - gap)
    assert overlap_ms(bars) == 0.0
    # A second request whose stage-0 compute starts before the first one's ends.
    late = RequestRecord(start_s=1.005, end_s=1.030, timings=((0, 0.0, 8.0, 0.0),
                                                              (1, 0.0, 5.0, 0.0)))
    assert overlap_ms(reconstruct([rec, late], 2)) > 0


def test_bench_json_has_the_summary_even_without_the_lab(bench):
    """The headline numbers are always there; without the lab, None and why."""
    s = json.loads((bench / "bench.json").read_text())["summary"]
    assert s["lab_speedup_2"] is None  # --quick measures a 2-stage lab pipeline
    assert s["coordinator_device"] == "rpi4b-2gb"
    assert s["coordinator_cpu_ms_per_request"] is None and s["latency_ratio_2"] is None
    assert s["source"] == "not measured: skipped (--no-lab)"


def test_steady_rate_leaves_out_filling_and_draining():
    from edge.bench.lab_pipeline import steady_rate

    # 4 in flight: the first 4 completions come while the pipeline fills (slowly here),
    # then one every 0.5 s, then the last 4 while it drains.
    done = [5.0, 5.1, 5.2, 5.3] + [5.3 + 0.5 * k for k in range(1, 11)] + [11, 12, 13, 14]
    assert steady_rate(done, 4) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 10 completions with 4 in flight; got 9"):
        steady_rate(done[:9], 4)
