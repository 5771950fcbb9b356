"""Text generation with SmolLM2-135M-Instruct in ``edge lab``: 4 emulated Raspberry Pi 4s.

On loopback every stage shares this machine's cores, so a pipeline's aggregate tokens/s
with several sequences cannot show what separate boards do. In the lab each emulated
device has its profile's memory cap and a CPU quota of its profile's share of this host
(``edge.lab``), so the stages compute side by side at an emulated board's speed. A fifth
emulated device of the same profile runs the baselines, one after the other, each in a
process of its own joined to that device's cgroup:

- unsharded onnxruntime with its KV cache (``OnnxDecoder``), fp32;
- llama.cpp (``llama-cpp-python``) on the same GGUF, Q4_1 (its own 4-bit kernels).

Measured in one run, side by side (rounds alternate):

1. the pipeline's aggregate decode tokens/s with ``--sequences`` sequences at once ÷ its
   tokens/s with one (the issue's target: ≥ 3.0× over 4 stages), with the coordinator's
   decode batching (its default) and with each step run alone (``max_batch=1``: the
   sequences only interleave), alternating;
2. one sequence over the pipeline against the unsharded model on one emulated device;
3. time to first token for the ``--prompt-tokens`` prompt;
4. each worker's peak RSS against the plan, with every sequence's cache held.

A CPU quota emulates a board's throughput, not its memory bandwidth or per-operation
latency: these are "measured in the emulated lab", never "measured on a Pi". Needs root.

Usage:
    PYTHONPATH=$PWD python benchmarks/lab_generation.py --work /tmp/genbench \\
        --out /tmp/genbench/lab_generation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

from generation import (Child, _llama_child, _ort_child, export_model, gguf_path,
                        make_prompts, multi_run, pipeline_run, summarize, worker_memory)

log = logging.getLogger("lab_generation")


def lab_child(name: str, cgroup, target, *args) -> Child:
    """A baseline process moved into an emulated device's cgroup (its memory cap and CPU
    quota) before it loads anything."""
    def join(pid: int) -> None:
        for d in cgroup.dirs:
            (d / "cgroup.procs").write_text(str(pid))

    return Child(name, target, *args, started=join)


def baseline_rounds(child: Child, prompts, n: int, eos, rounds: int) -> list[dict]:
    out = []
    for _ in range(rounds):
        run = child.run(prompts[0], n, eos)
        out.append(summarize(run))
    return out


def med(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(vals), 2) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True,
                    help="keeps the export (work/model) between runs")
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("EDGE_LOG", "WARNING")

    from edge.build import make_plan
    from edge.coordinator.generate import Generator
    from edge.coordinator.pipeline import Pipeline
    from edge.lab.devices import DeviceSpec
    from edge.lab.lab import Lab
    from edge.planning.cluster import load_cluster
    from edge.planning.generation import GenerationRequest

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    onnx = export_model(work)
    eos = json.loads((onnx.parent / "generation.json").read_text()).get("eos_token_ids", [])
    prompts = make_prompts(onnx.parent, args.prompt_tokens, args.sequences)
    n, context = args.new_tokens, args.prompt_tokens + args.new_tokens
    run_dir = work / f"lab-run-{os.getpid()}"
    lab = Lab.up([DeviceSpec(args.profile)] * (args.devices + 1), state_dir=run_dir / "lab",
                 cache_dir=run_dir / "lab-cache", cluster_file=run_dir / "cluster.yaml")
    result: dict = {"profile": args.profile, "devices": args.devices,
                    "prompt_tokens": args.prompt_tokens, "new_tokens": n,
                    "sequences": args.sequences, "host_gflops": lab.host_gflops}
    try:
        devs = list(load_cluster(run_dir / "cluster.yaml").devices)
        spare = lab.devices[args.devices]
        result["quota_cores"] = round(spare.cpu_cores, 3)
        plan = make_plan(onnx, devs[:args.devices], run_dir / "plan", modes=("fp32",),
                         generation=GenerationRequest(context=context,
                                                      sequences=args.sequences,
                                                      prefill=args.prompt_tokens))
        result["plan_stages"] = [list(s.node_range) for s in plan.stages]
        baselines = {"unsharded onnxruntime (one emulated device)":
                     lab_child("onnxruntime", spare.cgroup, _ort_child, str(onnx),
                              spare.threads)}
        if not args.no_llama:
            baselines["llama.cpp Q4_1 (one emulated device)"] = lab_child(
                "llama.cpp", spare.cgroup, _llama_child, str(gguf_path()), spare.threads,
                context, args.prompt_tokens)
        with Pipeline(plan, run_dir / "plan", diagnose=lab.diagnose,
                      security=lab.security()) as pipeline:
            pipeline.start()
            # The coordinator's default (decode steps of the sequences ready together run
            # as one batch), and each step alone (the sequences only interleave).
            generators = {"batched": Generator(pipeline),
                          "interleaved": Generator(pipeline, max_batch=1)}
            generator = generators["batched"]
            pipeline_run(generator, prompts[-1], 4)  # warm up
            for child in baselines.values():
                child.run(prompts[-1], 4, eos)
            single, base = [], {k: [] for k in baselines}
            many: dict[str, list] = {k: [] for k in generators}
            for r in range(args.rounds):
                single.append(summarize(pipeline_run(generator, prompts[0], n)))
                for name, gen in (generators.items() if r % 2 == 0
                                  else reversed(generators.items())):
                    m = multi_run(gen, prompts, n, pipeline.status)
                    if name == "batched":
                        memory = worker_memory(m["status"], plan)
                        batches = [(s.worker.batched_runs, s.worker.batched_rows)
                                   for s in m["status"].stages]
                    m.pop("status")
                    m.pop("results")
                    many[name].append(m)
                for name, child in baselines.items():
                    base[name] += baseline_rounds(child, prompts, n, eos, 1)
                log.info("round %d: 1 sequence %.2f tok/s, %d sequences %s", r,
                         single[-1]["decode_tokens_per_s"], args.sequences,
                         {k: round(v[-1]["decode_tokens_per_s"] or 0, 2)
                          for k, v in many.items()})
            peaks = {name: child.close() / 2**20 for name, child in baselines.items()}
    finally:
        lab.down()
    one = med(single, "decode_tokens_per_s")
    agg = {k: statistics.median(m["decode_tokens_per_s"] for m in v) for k, v in many.items()}
    result.update({
        "pipeline_1_sequence": {"decode_tokens_per_s": one,
                                "decode_ms_median": med(single, "decode_ms_median"),
                                "ttft_ms": med(single, "ttft_ms")},
        "pipeline_n_sequences": {k: {"decode_tokens_per_s": round(a, 2),
                                     "per_round": [round(m["decode_tokens_per_s"], 2)
                                                   for m in many[k]],
                                     "ttft_ms_median": round(statistics.median(
                                         many[k][-1]["ttft_ms"]), 1)}
                                 for k, a in agg.items()},
        "aggregate_ratio": {k: round(a / one, 2) for k, a in agg.items()},
        "batched_runs_rows_by_stage": batches,
        "baselines": {name: {"decode_tokens_per_s": med(rows, "decode_tokens_per_s"),
                             "ttft_ms": med(rows, "ttft_ms"),
                             "peak_rss_mb": round(peaks[name], 1)}
                      for name, rows in base.items()},
        "worker_memory": memory,
        "note": "measured in edge lab: CPU quotas scaled to the profile's GFLOP/s emulate "
                "a board's throughput, not its memory bandwidth; not measured on a Pi",
    })
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
