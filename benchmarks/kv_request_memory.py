"""Decode steps with a KV cache larger than the plan's: the coordinator's memory bound
against each worker's measured peak RSS.

GPT-2 with seeded weights is exported with its KV cache (torch's dynamo exporter: inputs
``past_key_values.N.key/value [batch, heads, past_sequence_length, 64]``, outputs
``present.N.*``), in one of the two forms exporters give the total length:
``--style plus-one``: one new token, and the attention mask over ``past_sequence_length +
1``, an expression the planner computes; ``--style named``: any number of new tokens
(``sequence_length``), and the mask over a dim of its own, ``total_sequence_length`` (the
exporter's symbol, renamed), which must be bound and which the planner finds to be the sum
of the other two.

The plan is made for a short past (24) and one new token; for each request size, fresh
loopback workers serve it (so each peak belongs to that size alone) and the bound the
coordinator computes before accepting the request (``StagePrediction.memory_at``) is set
against the peak (VmHWM) the workers' own sampler reports, as ``edge profile`` reads it.

Usage:
    python benchmarks/kv_request_memory.py --size small --devices 4 --style plus-one \
        --past 24 300 1000 --json benchmarks/results/kv_request_memory.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path

PAST, NEW, TOTAL = "past_sequence_length", "sequence_length", "total_sequence_length"
SIZES = {"tiny": dict(n_layer=2, n_embd=128, n_head=2), "small": {}}


def export_gpt2_kv(path: Path, size: str, style: str, positions: int, seed: int = 0) -> Path:
    """GPT-2 of ``size`` with seeded weights and its KV cache as inputs and outputs."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from torch.export import Dim
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.cache_utils import DynamicCache

    from edge.export.onnx_export import _perturb

    cfg = GPT2Config(**SIZES[size], n_positions=positions, use_cache=True,
                     attn_implementation="eager")
    torch.manual_seed(seed)
    inner = GPT2LMHeadModel(cfg)
    _perturb(inner, seed)
    inner.eval()
    layers = cfg.n_layer

    class Step(torch.nn.Module):
        """input_ids, attention_mask, past keys and values -> logits, present ones."""

        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                             past_key_values=cache, use_cache=True, return_dict=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    heads, head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
    # Batch 2, not 1: the exporter fixes dims it sees at size 1. One new token for
    # plus-one: the exporter writes the mask's length as past_sequence_length + 1. For
    # named, 3 new tokens and a mask length left to the exporter: it gets a symbol of its
    # own, renamed below.
    batch, past, new = 2, 24, (1 if style == "plus-one" else 3)
    example = (torch.zeros(batch, new, dtype=torch.long),
               torch.ones(batch, past + new, dtype=torch.long),
               *[torch.randn(batch, heads, past, head_dim) for _ in range(2 * layers)])
    b, p = Dim("batch_size", max=64), Dim(PAST, max=positions - 64)
    names_in = ["input_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    names_out = ["logits"] + [f"present.{i}.{kv}" for i in range(layers)
                              for kv in ("key", "value")]
    if style == "plus-one":
        dynamic = {"input_ids": {0: b}, "attention_mask": {0: b, 1: p + 1}}
    else:
        dynamic = {"input_ids": {0: b, 1: Dim(NEW, max=64)},
                   "attention_mask": {0: b, 1: Dim.AUTO}}
    dynamic["past"] = tuple({0: b, 2: p} for _ in range(2 * layers))
    torch.onnx.export(Step().eval(), example, str(path), input_names=names_in,
                      output_names=names_out, dynamic_shapes=dynamic, opset_version=18,
                      dynamo=True, external_data=True)
    model = onnx.load(str(path), load_external_data=True)
    if style == "named":
        total = model.graph.input[1].type.tensor_type.shape.dim[1].dim_param
        for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param == total:
                    d.dim_param = TOTAL
    for f in path.parent.glob(path.name + "*"):
        f.unlink()
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    # The export computes what torch does, at a past it was not traced at.
    feeds = step_inputs(model, 100)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        want = Step()(*[torch.from_numpy(v) for v in feeds.values()])
    err = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
    if err > 1e-3:
        raise SystemExit(f"export differs from torch by {err}")
    return path


def step_inputs(model, past: int, new: int = 1, batch: int = 1, seed: int = 0):
    """One decode step's inputs: ``past`` cached positions, ``new`` new tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
        if vi.name == "input_ids":
            feeds[vi.name] = rng.integers(0, 50257, (batch, new), dtype=np.int64)
        elif vi.name == "attention_mask":
            feeds[vi.name] = np.ones((batch, past + new), np.int64)
        else:
            feeds[vi.name] = (rng.standard_normal((batch, dims[1], past, dims[3])) * 0.5
                              ).astype(np.float32)
    return feeds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=sorted(SIZES), help="GPT-2 size")
    ap.add_argument("--style", default="plus-one", choices=("plus-one", "named"),
                    help="the total length: an expression dim, or a dim of its own")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--plan-past", type=int, default=24, help="the past the plan is made for")
    ap.add_argument("--past", type=int, nargs="+", default=[24, 300, 1000],
                    help="past lengths of the requests (one new token each)")
    ap.add_argument("--positions", type=int, default=1024, help="GPT-2's n_positions")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args()

    import onnx

    from edge.coordinator.guard import TooLarge, check_fits, request_sizes
    from edge.coordinator.pipeline import Pipeline
    from edge.coordinator.server import start_coordinator
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.coordinator.live_profile import collect
    from edge.profiling.report import summarize
    from edge.worker.launch import LocalWorkers

    work = Path(tempfile.mkdtemp(prefix="edge-kvmem-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    model_path = export_gpt2_kv(work / f"gpt2-{args.size}-kv.onnx", args.size, args.style,
                                args.positions)
    model = onnx.load(str(model_path), load_external_data=False)
    bindings = {PAST: args.plan_past}
    if args.style == "named":
        bindings.update({NEW: 1, TOTAL: args.plan_past + 1})
    rows = []
    for past in args.past:
        x = step_inputs(model, past)
        with LocalWorkers(args.devices, work / f"workers-{past}", device=args.profile) as workers:
            cluster = cluster_from_profile(args.profile, args.devices,
                                           addresses=workers.addresses)
            plan_dir = work / f"plan-{past}"
            plan = make_plan(model_path, cluster.devices, plan_dir, bindings=bindings,
                             modes=("fp32",))
            sizes = request_sizes(plan.model.inputs, [(k, v.shape) for k, v in x.items()])
            try:
                check_fits(plan, sizes)
                refused = ""
            except TooLarge as e:
                refused = str(e)
            with Pipeline(plan, plan_dir) as pipeline:
                pipeline.start()
                server, port = start_coordinator(pipeline, "127.0.0.1:0")
                try:
                    report = None if refused else collect(
                        f"127.0.0.1:{port}", requests=args.requests, concurrency=2, inputs=x)
                finally:
                    server.stop(0)
        io_mb = sum(v.nbytes for v in x.values()) / 2**20
        for st in plan.stages:
            p = st.predicted
            bound = p.memory_at(plan.model.bindings, sizes, plan.model.derived)
            measured = None
            if report is not None:
                measured = next(r["measured_peak_mb"] for r in summarize(report)
                                if r["stage"] == st.index)
            rows.append(dict(past=past, stage=st.index, planned_mb=p.memory_mb,
                             bound_mb=bound, measured_peak_mb=measured,
                             budget_mb=st.device.memory_mb, request_io_mb=io_mb,
                             refused=refused, degrees=p.activation_degrees,
                             derived=plan.model.derived))
            ratio = f"{bound / measured:.2f}" if measured else "-"
            print(f"past {past:>5} stage {st.index}: planned {p.memory_mb:7.1f}  "
                  f"bound {bound:7.1f}  measured {measured or float('nan'):7.1f} MiB  "
                  f"bound/measured {ratio}  (request io {io_mb:.1f} MiB)"
                  f"{'  REFUSED' if refused else ''}", flush=True)
    # The growth alone: what the bound adds to the plan's prediction against what the
    # peak added to the peak at the plan's own size (which the planner's model sets, not
    # the guard).
    base = {r["stage"]: r["measured_peak_mb"] for r in rows if r["past"] == args.plan_past}
    for r in rows:
        m0 = base.get(r["stage"])
        if r["past"] != args.plan_past and m0 and r["measured_peak_mb"]:
            grew = r["measured_peak_mb"] - m0
            r["growth_bound_over_measured"] = ((r["bound_mb"] - r["planned_mb"]) / grew
                                               if grew > 0 else None)
            print(f"past {r['past']:>5} stage {r['stage']}: bound adds "
                  f"{r['bound_mb'] - r['planned_mb']:6.1f}, the peak grew {grew:6.1f} MiB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(model=f"gpt2-{args.size}-kv",
                                                   style=args.style, bindings=bindings,
                                                   rows=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
