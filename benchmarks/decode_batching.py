"""Decode batching: aggregate decode tokens/s of several sequences at once over loopback
workers, each stage running one sequence's step at a time (``max_batch`` 1) against the
decode steps of the sequences ready batched into one stage run (default ``max_batch``).

The seeded Llama of ``edge export llama --size`` (``small``: 8 layers, hidden 512,
vocabulary 32000) is exported once into ``--work``, planned in fp32 over ``--devices``
``edge worker`` processes (``--threads`` onnxruntime threads each) for ``--sequences``
sequences, and served by one coordinator in this process. Each round runs both settings
one after the other (the order alternates) on the same pipeline; a setting's tokens/s is
the tokens emitted while every sequence was decoding (after the last first token, before
the first sequence ended) over that window, and the median over rounds is reported. Greedy
decoding; both settings must give the same tokens.

Usage:
    PYTHONPATH=$PWD python benchmarks/decode_batching.py --work /tmp/decode-batching
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def timed_run(generator, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """The tokens of one sequence and the perf_counter time each came at."""
    tokens, times = [], []
    for chunk in generator.start(prompt, max_tokens=n):
        for t in chunk.tokens:
            tokens.append(t)
            times.append(time.perf_counter())
    return tokens, times


def aggregate(generator, prompts: list[list[int]], n: int) -> tuple[float, list, float]:
    """Decode tokens/s while every sequence decodes, the tokens, and the mean batch so
    far (rows per batch sent; a lone step counts as a batch of one)."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        runs = [r.result() for r in [pool.submit(timed_run, generator, p, n)
                                     for p in prompts]]
    start = max(times[0] for _, times in runs)
    end = min(times[-1] for _, times in runs)
    count = sum(sum(start < t <= end for t in times) for _, times in runs)
    mean = (generator.batcher.rows / max(1, generator.batcher.batches)
            if generator.batcher else 1.0)
    return count / (end - start), [tokens for tokens, _ in runs], mean


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--size", default="small", choices=("tiny", "small"))
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--slots", type=int, default=None,
                    help="batches in flight at once (default: the plan's stages)")
    args = ap.parse_args(argv)

    from edge.build import make_plan
    from edge.coordinator.generate import Generator
    from edge.coordinator.pipeline import Pipeline
    from edge.export.decoder import export_llama
    from edge.planning.cluster import cluster_from_profile
    from edge.planning.generation import GenerationRequest
    from edge.worker.launch import LocalWorkers

    model = args.work / f"llama-{args.size}" / "model.onnx"
    if not model.exists():
        export_llama(args.size, seed=0, out=model)
    # Prompts of different lengths: batches mix rows that are padded differently.
    prompts = [[(7 * i + 3 * k) % 900 + 5 for k in range(args.prompt_tokens - 2 * i)]
               for i in range(args.sequences)]
    out: dict = {"model": f"llama-{args.size}", "devices": args.devices,
                 "threads": args.threads, "sequences": args.sequences,
                 "new_tokens": args.new_tokens, "slots": args.slots, "rounds": []}
    with LocalWorkers(args.devices, args.work / "workers", threads=args.threads) as workers:
        devices = cluster_from_profile("rpi4b-2gb", args.devices,
                                       addresses=workers.addresses).devices
        plan = make_plan(model, devices, args.work / "build", modes=("fp32",),
                         generation=GenerationRequest(
                             context=args.prompt_tokens + args.new_tokens + 8,
                             sequences=args.sequences, prefill=args.prompt_tokens))
        with Pipeline(plan, args.work / "build") as pipeline:
            pipeline.start()
            settings = {"max_batch 1": Generator(pipeline, max_batch=1),
                        "batched": Generator(pipeline, batch_slots=args.slots)}
            aggregate(settings["batched"], prompts[:2], 4)  # warm up the sessions
            tokens = {}
            for r in range(args.rounds):
                row = {}
                for name in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
                    rate, tokens[name], mean = aggregate(settings[name], prompts,
                                                         args.new_tokens)
                    row[name] = {"tokens_per_s": round(rate, 2), "mean_batch": round(mean, 2)}
                out["rounds"].append(row)
                print(json.dumps(row), flush=True)
    out["same_tokens"] = tokens["max_batch 1"] == tokens["batched"]
    for name in settings:
        out[name] = statistics.median(r[name]["tokens_per_s"] for r in out["rounds"])
    out["speedup"] = round(out["batched"] / out["max_batch 1"], 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
