"""Text generation end to end (issue 14): a decoder planned with its KV caches on the
stages, real worker processes, the coordinator's token loop, compared token for token with
transformers' generate and with the unsharded model run with its own cache."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edge.build import make_plan
from edge.coordinator.generate import Generator
from edge.coordinator.pipeline import Pipeline
from edge.export.decoder import build_llama, export_llama
from edge.export.generate import OnnxDecoder, greedy_generate
from edge.planning.cluster import cluster_from_profile
from edge.planning.generation import GenerationRequest
from edge.worker.launch import LocalWorkers

PROMPT = [5, 17, 3, 250, 9, 41, 7]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """The seeded tiny Llama (2 layers, 4 heads over 2 KV heads) with its KV cache."""
    return export_llama("tiny", seed=0, out=tmp_path_factory.mktemp("llama") / "model.onnx")


def tokens_of(generation) -> list[int]:
    return [t for chunk in generation for t in chunk.tokens]


def reference(llama: Path, prompt: list[int], n: int) -> list[int]:
    """The unsharded model's greedy tokens, EOS dropped (the loop does not emit it)."""
    decoder = OnnxDecoder(llama)
    out = greedy_generate(decoder, prompt, n)
    return [t for t in out if t not in set(decoder.eos_token_ids)]


def plan_over(llama: Path, addresses: list[str], out: Path, sequences: int = 2,
              standby: list[str] = ()):
    devices = cluster_from_profile("rpi4b-2gb", len(addresses) + len(standby),
                                   addresses=list(addresses) + list(standby)).devices
    active = devices[:len(addresses)]
    spares = [dataclasses.replace(d, standby=True) for d in devices[len(addresses):]]
    return make_plan(llama, active, out, standby=spares, modes=("fp32",),
                     generation=GenerationRequest(context=64, sequences=sequences,
                                                  prefill=16))


def test_greedy_over_three_workers_equals_transformers(llama, tmp_path):
    import torch

    with torch.no_grad():
        want = build_llama("tiny", seed=0).generate(
            torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))[0, len(PROMPT):]
    want = [int(t) for t in want]
    assert reference(llama, PROMPT, 12) == want[:len(reference(llama, PROMPT, 12))]
    with LocalWorkers(3, tmp_path / "w", threads=1) as workers:
        plan = plan_over(llama, workers.addresses, tmp_path / "build")
        assert len(plan.stages) == 3 and any(s.state for s in plan.stages)
        with Pipeline(plan, tmp_path / "build") as pipeline:
            pipeline.start()
            got = tokens_of(Generator(pipeline).start(PROMPT, max_tokens=12))
    assert got == reference(llama, PROMPT, 12)
    assert got == want[:len(got)]


def batched(pipeline) -> list[tuple[int, int]]:
    """(runs, rows) of batched decode steps each stage reports."""
    return [(s.worker.batched_runs, s.worker.batched_rows) for s in pipeline.status().stages]


def test_eight_sequences_at_once_each_equal_their_solo_run(llama, tmp_path):
    prompts = [PROMPT[:k] + [k] * (k % 3) for k in range(1, 9)]
    with LocalWorkers(2, tmp_path / "w", threads=1) as workers:
        plan = plan_over(llama, workers.addresses, tmp_path / "build", sequences=8)
        with Pipeline(plan, tmp_path / "build") as pipeline:
            pipeline.start()
            generator = Generator(pipeline)  # batches of up to 8 decode steps
            with ThreadPoolExecutor(8) as pool:
                runs = [pool.submit(lambda p: tokens_of(generator.start(p, max_tokens=8)), p)
                        for p in prompts]
                got = [r.result(timeout=120) for r in runs]
            stats = batched(pipeline)
    assert got == [reference(llama, p, 8) for p in prompts]
    # the rows of different lengths shared stage runs: every stage ran the same batches
    assert generator.batcher.largest > 1
    assert stats[0] == stats[1] and stats[0][1] > stats[0][0] > 0


def test_a_worker_killed_mid_generation_changes_nothing(llama, tmp_path):
    others = [PROMPT[:3], PROMPT + [11, 12, 13]]  # generating in batches with the first
    with LocalWorkers(3, tmp_path / "w", threads=1) as workers:
        plan = plan_over(llama, workers.addresses[:2], tmp_path / "build", sequences=3,
                         standby=workers.addresses[2:])
        with Pipeline(plan, tmp_path / "build", health_interval=0.2) as pipeline:
            pipeline.start()
            generator = Generator(pipeline)
            with ThreadPoolExecutor(2) as pool:
                runs = [pool.submit(lambda p: tokens_of(generator.start(p, max_tokens=16)), p)
                        for p in others]
                generation = generator.start(PROMPT, max_tokens=16)
                got: list[int] = []
                killed = threading.Event()
                for chunk in generation:
                    got.extend(chunk.tokens)
                    if len(got) == 5 and not killed.is_set():
                        os.kill(workers.workers[1].process.pid, signal.SIGKILL)
                        killed.set()
                rest = [r.result(timeout=120) for r in runs]
            assert killed.is_set()
            assert pipeline.recoveries and pipeline.recoveries[-1].how == "standby"
            assert generator.batcher.largest > 1
            assert batched(pipeline)[0][1] > batched(pipeline)[0][0] > 0  # stage 0 lived
    assert got == reference(llama, PROMPT, 16)
    assert rest == [reference(llama, p, 16) for p in others]


def test_a_prompt_longer_than_the_prefill_runs_in_chunks(llama, tmp_path):
    """The plan costs a prefill of 16 tokens: a 40-token prompt runs as chunks of 16, 16
    and 8 on every stage (its activations stay within the plan), and generates what the
    whole prompt at once does, greedy or sampled (a draw is seeded by the length)."""
    from edge.proto import edge_pb2 as pb

    prompt = [(7 * i + 3) % 1000 for i in range(40)]
    sampling = pb.Sampling(temperature=0.8, seed=3)
    with LocalWorkers(3, tmp_path / "w", threads=1) as workers:
        plan = plan_over(llama, workers.addresses, tmp_path / "build")
        assert plan.model.generation.prefill == 16
        with Pipeline(plan, tmp_path / "build") as pipeline:
            pipeline.start()
            before = [s.worker.requests_done for s in pipeline.status().stages]
            gen = Generator(pipeline, max_batch=1)
            got = tokens_of(gen.start(prompt, max_tokens=6))
            runs = [s.worker.requests_done - b
                    for s, b in zip(pipeline.status().stages, before)]
            sampled = tokens_of(gen.start(prompt, max_tokens=6, sampling=sampling))
        whole = dataclasses.replace(plan, model=dataclasses.replace(
            plan.model, generation=dataclasses.replace(plan.model.generation, prefill=64)))
        with Pipeline(whole, tmp_path / "build") as pipeline:
            pipeline.start()
            unchunked = tokens_of(Generator(pipeline).start(prompt, max_tokens=6,
                                                           sampling=sampling))
    assert got == reference(llama, prompt, 6)
    # 3 chunks of the prompt, then one run per decode step after the first token.
    assert runs == [3 + len(got) - 1] * 3, runs
    assert sampled == unchunked


def test_smollm2_over_three_workers_equals_transformers(smollm2, smollm2_chat, tmp_path):
    """Real weights (SmolLM2-135M-Instruct): the chat answer over three worker processes,
    token for token transformers' greedy generate (whose EOS the loop does not emit)."""
    from edge.text import load_tokenizer

    from helpers import SMOLLM2_NEW_TOKENS

    ids, want = smollm2_chat["ids"], smollm2_chat["tokens"]
    tok = load_tokenizer(smollm2.parent)
    with LocalWorkers(3, tmp_path / "w", threads=1) as workers:
        devices = cluster_from_profile("rpi4b-2gb", 3, addresses=workers.addresses).devices
        plan = make_plan(smollm2, devices, tmp_path / "build", modes=("fp32",),
                         generation=GenerationRequest(context=128, prefill=64))
        assert len(plan.stages) == 3 and sum(len(s.state) for s in plan.stages) == 60
        with Pipeline(plan, tmp_path / "build") as pipeline:
            pipeline.start()
            got = tokens_of(Generator(pipeline).start(ids, max_tokens=SMOLLM2_NEW_TOKENS))
    assert got == [t for t in want if t not in set(tok.eos_token_ids)]
    assert "Paris" in tok.decode(got)
