"""The coordinator's token loop (``edge generate``) against in-memory workers
(``edge.coordinator.fake``): no processes, no sockets, each test well under a second.

The fake decoder draws ``(last token * 7 + position) % DECODER_VOCAB``, so the expected
sequence is computed here and every step's position is checked by the fake stages.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from edge.coordinator.fake import (FakeCluster, decoder_stage, fake_decoder_plan, fake_devices,
                                   fake_next_token)
from edge.coordinator.generate import Generator, TextStream
from edge.coordinator.pipeline import InferError, Pipeline
from edge.proto import edge_pb2 as pb
from edge.transport.channels import Deadlines
from helpers import until

PROMPT = [3, 5]


def expected(prompt, n: int) -> list[int]:
    """The fake decoder's first ``n`` tokens after ``prompt``."""
    out, tokens = [], list(prompt)
    for _ in range(n):
        t = fake_next_token(tokens[-1], len(tokens) - 1)
        out.append(t)
        tokens.append(t)
    return out


class Letters:
    """A tokenizer of the interface of edge.text.ChatTokenizer: token i is letter i % 26;
    token 49 is half of a character (U+FFFD) unless another token follows it."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids, skip_special_tokens=True):
        text = "".join("é" if i == 49 else chr(ord("a") + i % 26) for i in ids)
        return text[:-1] + "\ufffd" if ids and ids[-1] == 49 else text

    def chat_ids(self, messages, add_generation_prompt=True):
        return [25] + self.encode(messages[0]["content"]) + [24]


def write_tokenizer(folder) -> None:
    """A real tokenizer.json (``tokenizers``): letters a..z are ids 0..25, ids 26..49 are
    ``<id>``; one character per token, decoded without spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(ord("a") + i): i for i in range(26)}
    vocab.update({f"<{i}>": i for i in range(26, 50)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<26>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))


class Setup:
    def __init__(self, root, n=2, standby=0, sequences=2, context=32, eos=(),
                 tokenizer=False, **kw):
        self.primaries = fake_devices(n)
        self.spares = fake_devices(standby, prefix="spare", standby=True)
        if tokenizer:
            write_tokenizer(root / "plan" / "tokenizer")
        self.plan = fake_decoder_plan(root / "plan", self.primaries, self.spares,
                                      context=context, sequences=sequences, eos_token_ids=eos,
                                      tokenizer="tokenizer" if tokenizer else "")
        self.cluster = FakeCluster([d.address for d in self.primaries + self.spares],
                                   decoder_stage)
        self.pipeline = Pipeline(self.plan, root / "plan", worker_factory=self.cluster.client,
                                 deadlines=Deadlines(infer=5, ready=0.5), health_interval=0.01,
                                 backoff_s=5.0, **kw)
        self.pipeline.start()
        self.pool = ThreadPoolExecutor(8)

    def worker(self, name: str):
        d = next(d for d in self.primaries + self.spares if d.name == name)
        return self.cluster[d.address]

    def close(self):
        for w in self.cluster.workers.values():
            w.release()
        self.pipeline.close()
        self.pool.shutdown(wait=True)


@pytest.fixture
def setup(tmp_path):
    made = []

    def make(**kw) -> Setup:
        made.append(Setup(tmp_path / f"c{len(made)}", **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def spy_steps(worker) -> list[tuple[int, int]]:
    """(position, tokens) of each step that ``worker`` takes from now on (-1: release)."""
    seen, real = [], worker.forward

    def forward(activation):
        # noted before the call: the stage's own thread may run it, fail downstream and
        # get the replay sent before this call returns
        ids = [t for t in activation.tensors if t.name == "input_ids"]
        entry = (-1, 0) if activation.step.release else (activation.step.position,
                                                          ids[0].shape[1])
        seen.append(entry)
        code, details = real(activation)
        if code != grpc.StatusCode.OK:
            seen.remove(entry)
        return code, details

    worker.forward = forward
    return seen


def run(generation):
    chunks = list(generation)
    return [t for c in chunks for t in c.tokens], "".join(c.text for c in chunks), chunks[-1].usage


def test_the_loop_yields_the_decoders_tokens_and_frees_the_caches(setup):
    s = setup()
    tokens, _, usage = run(Generator(s.pipeline).start(PROMPT, max_tokens=6))
    assert tokens == expected(PROMPT, 6)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.finish_reason) == \
        (2, 6, "length")
    assert usage.ttft_ms > 0
    until(lambda: all(not w.sequences for w in s.cluster.workers.values()), what="release")
    # one prefill and five decode steps reached the first stage, and one release
    assert s.worker("fake-0").forwards == 7


def test_eos_ends_with_stop_and_is_not_emitted(setup):
    want = expected(PROMPT, 8)
    s = setup(eos=(want[3],))
    tokens, _, usage = run(Generator(s.pipeline).start(PROMPT, max_tokens=8))
    assert tokens == want[:3] and usage.finish_reason == "stop"
    assert usage.completion_tokens == 3


def test_the_context_bounds_the_tokens(setup):
    s = setup(context=6)
    tokens, _, usage = run(Generator(s.pipeline).start(PROMPT))
    assert tokens == expected(PROMPT, 4) and usage.finish_reason == "length"


def test_requests_the_context_cannot_take_are_refused(setup, tmp_path):
    s = setup(context=6)
    g = Generator(s.pipeline)
    with pytest.raises(InferError) as e:
        g.start(list(range(6)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "context of 6" in str(e.value)
    with pytest.raises(InferError) as e:
        g.start([])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InferError) as e:
        g.prompt_ids("hello")  # the plan names no tokenizer
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_stop_strings_are_not_emitted(setup):
    s = setup()
    want = expected(PROMPT, 10)
    letters = Letters().decode(want)
    stop = letters[4:6]
    tokens, text, usage = run(Generator(s.pipeline, tokenizer=Letters())
                              .start(PROMPT, max_tokens=10, stop=[stop, "zzzz"]))
    assert text == letters[:letters.index(stop)] and usage.finish_reason == "stop"
    assert tokens == want[:6]


def test_text_holds_back_incomplete_characters_and_stop_prefixes():
    t = TextStream(Letters(), stop=["cd"])
    assert [t.add(i) for i in (0, 49, 1, 2)] == ["a", "", "éb", ""]
    assert t.add(4) == "ce" and t.flush() == ""
    t = TextStream(Letters(), stop=["cd"])
    assert [t.add(i) for i in (2, 3)] == ["", ""] and t.stopped and t.flush() == ""
    assert TextStream(None).add(3) == ""


def test_chat_prompts_use_the_template(setup):
    s = setup()
    assert Generator(s.pipeline, tokenizer=Letters()).prompt_ids("ab", chat=True) == \
        [25, 0, 1, 24]


def test_sequences_past_the_limit_wait_then_are_refused_past_the_queue(setup):
    s = setup(sequences=1)
    g = Generator(s.pipeline, queue=1)
    s.worker("fake-1").hold()
    first = s.pool.submit(run, g.start(PROMPT, max_tokens=2))
    until(lambda: s.worker("fake-1").held == 1, what="the first sequence's prefill")
    waiting = s.pool.submit(run, g.start([7, 8], max_tokens=2))
    until(lambda: g.slots.waiting == 1, what="the second to queue")
    with pytest.raises(InferError) as e:
        list(g.start([1], max_tokens=2))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert s.worker("fake-0").forwards == 1  # the queued one sent nothing yet
    s.worker("fake-1").release()
    assert first.result(2)[0] == expected(PROMPT, 2)
    assert waiting.result(2)[0] == expected([7, 8], 2)


def test_a_stage_killed_mid_generation_replays_and_repeats_nothing(setup):
    s = setup(standby=1)
    g = Generator(s.pipeline)
    spare = spy_steps(s.worker("spare-0"))
    out: list[int] = []
    generation = iter(g.start(PROMPT, max_tokens=8))
    for _ in range(3):
        out += next(generation).tokens
    s.worker("fake-1").hold()
    pending = s.pool.submit(lambda: [t for c in generation for t in c.tokens])
    until(lambda: s.worker("fake-1").held == 1, what="the 4th step to reach stage 1")
    s.worker("fake-1").kill()
    out += pending.result(3)
    assert out == expected(PROMPT, 8)
    assert [w.stage.device.name for w in s.pipeline.workers] == ["fake-0", "spare-0"]
    assert s.pipeline.recoveries[-1].resent == 1
    # the spare's caches were built by the replay (prompt and 3 tokens at position 0),
    # then the steps went on from there
    assert spare[:3] == [(0, 5), (5, 1), (6, 1)]


def test_a_stage_that_lost_its_caches_gets_the_replay(setup):
    s = setup()
    generation = iter(Generator(s.pipeline).start(PROMPT, max_tokens=6))
    out = next(generation).tokens + next(generation).tokens
    first = spy_steps(s.worker("fake-0"))
    s.worker("fake-1").sequences.clear()  # say, its idle timeout freed them
    out += [t for c in generation for t in c.tokens]
    assert out == expected(PROMPT, 6)
    # stage 1 refused the step at position 3; its replay restarted both stages
    assert first[:3] == [(3, 1), (0, 4), (4, 1)]


def test_without_failover_a_position_mismatch_still_gets_the_replay(setup):
    s = setup(failover=False)
    generation = iter(Generator(s.pipeline).start(PROMPT, max_tokens=5))
    out = next(generation).tokens
    s.worker("fake-0").sequences.clear()
    out += [t for c in generation for t in c.tokens]
    assert out == expected(PROMPT, 5)


def test_cancellation_releases_the_caches_on_every_stage(setup):
    s = setup(n=3)
    g = Generator(s.pipeline)
    generation = g.start(PROMPT, max_tokens=20)
    it = iter(generation)
    next(it)
    assert all(w.sequences for w in s.cluster.workers.values())
    s.worker("fake-2").hold()
    pending = s.pool.submit(lambda: list(it))
    until(lambda: s.worker("fake-2").held == 1, what="a step in flight")
    threading.Timer(0.01, generation.cancel).start()
    with pytest.raises(InferError) as e:
        pending.result(2)
    assert e.value.code == grpc.StatusCode.CANCELLED
    s.worker("fake-2").release()
    until(lambda: all(not w.sequences for w in s.cluster.workers.values()),
           what="every stage to free the sequence")
    assert g.slots.busy == 0


def test_a_stream_closed_by_its_reader_releases_too(setup):
    s = setup()
    it = iter(Generator(s.pipeline).start(PROMPT, max_tokens=20))
    next(it)
    it.close()
    until(lambda: all(not w.sequences for w in s.cluster.workers.values()), what="release")


def test_sampling_travels_with_every_step(setup):
    s = setup()
    seen = []
    real = s.worker("fake-0").forward

    def spy(activation):
        seen.append(pb.Step.FromString(activation.step.SerializeToString()))
        return real(activation)

    s.worker("fake-0").forward = spy
    run(Generator(s.pipeline).start(PROMPT, max_tokens=3,
                                    sampling=pb.Sampling(temperature=0.7, top_k=5)))
    steps = [x for x in seen if not x.release]
    assert [x.position for x in steps] == [0, 2, 3]
    assert len({x.sampling.seed for x in steps}) == 1 and steps[0].sampling.seed != 0
    assert all(x.sampling.top_k == 5 for x in steps) and seen[-1].release


# ---------------------------------------------------------------------- the RPC, client, CLI


@pytest.fixture
def served(setup):
    """A coordinator's gRPC server (port 0, in this process) over the fake decoder."""
    from edge.coordinator.server import start_coordinator

    s = setup()
    server, port = start_coordinator(s.pipeline, "127.0.0.1:0")
    try:
        yield s, f"127.0.0.1:{port}", server
    finally:
        server.stop(0).wait()


def test_generate_streams_over_grpc_and_ends_with_the_usage(served):
    from edge.coordinator.client import InferClient

    s, address, _ = served
    with InferClient(address, timeout=10) as client:
        replies = list(client.generate_raw(prompt_tokens=PROMPT, max_tokens=4))
        assert [t for r in replies for t in r.tokens] == expected(PROMPT, 4)
        assert not any(r.HasField("usage") for r in replies[:-1])
        u = replies[-1].usage
        assert (u.prompt_tokens, u.completion_tokens, u.finish_reason) == (2, 4, "length")
        for kw, code in (({"prompt_tokens": list(range(40))}, "INVALID_ARGUMENT"),
                         ({}, "INVALID_ARGUMENT"),
                         ({"prompt": "hi"}, "INVALID_ARGUMENT")):  # no tokenizer
            with pytest.raises(grpc.RpcError) as e:
                list(client.generate_raw(**kw))
            assert e.value.code().name == code, kw
        with pytest.raises(grpc.RpcError) as e:
            list(client.generate_raw(prompt_tokens=list(range(40))))
        assert "context of 32" in e.value.details()


def test_generate_on_a_plan_without_generation_fails_precondition(tmp_path):
    from edge.coordinator.client import InferClient
    from edge.coordinator.fake import fake_plan
    from edge.coordinator.server import start_coordinator

    devices = fake_devices(1)
    plan = fake_plan(tmp_path / "plan", devices)
    cluster = FakeCluster([d.address for d in devices])
    with Pipeline(plan, tmp_path / "plan", worker_factory=cluster.client,
                  deadlines=Deadlines(infer=5, ready=0.5), health_interval=0.01) as p:
        p.start()
        server, port = start_coordinator(p, "127.0.0.1:0")
        try:
            with InferClient(f"127.0.0.1:{port}", timeout=10) as client:
                with pytest.raises(grpc.RpcError) as e:
                    list(client.generate_raw(prompt_tokens=[1]))
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            server.stop(0).wait()


def test_a_client_that_goes_away_frees_the_caches(served):
    from edge.coordinator.client import InferClient

    s, address, _ = served
    s.worker("fake-1").hold()
    with InferClient(address, timeout=10) as client:
        stream = client.stub.Generate(pb.GenerateRequest(prompt_tokens=PROMPT, max_tokens=20),
                                      timeout=10)
        until(lambda: s.worker("fake-1").held == 1, what="the prefill in flight")
        stream.cancel()
    s.worker("fake-1").release()
    until(lambda: all(not w.sequences for w in s.cluster.workers.values()),
           what="every stage to free the sequence")


def test_edge_generate_prints_json_and_lists_its_arguments(setup, capsys):
    from edge.cli import build_parser, main
    from edge.coordinator.server import start_coordinator

    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["generate"].format_help()
    for flag in ("--coordinator", "--prompt", "--chat", "--max-tokens", "--temperature",
                 "--top-p", "--top-k", "--seed", "--stop", "--json", "--certs"):
        assert flag in help_text
    s = setup(tokenizer=True)  # a real tokenizer.json, loaded with edge.text
    server, port = start_coordinator(s.pipeline, "127.0.0.1:0")
    try:
        prompt = [ord(c) - ord("a") for c in "hello"]
        want = expected(prompt, 5)
        assert main(["generate", "--coordinator", f"127.0.0.1:{port}", "--prompt", "hello",
                     "--max-tokens", "5", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["tokens"] == want and out["finish_reason"] == "length"
        assert out["text"] == "".join(chr(ord("a") + t) if t < 26 else f"<{t}>" for t in want)
        assert out["prompt_tokens"] == 5 and out["ttft_ms"] > 0
        assert main(["generate", "--coordinator", f"127.0.0.1:{port}", "--prompt", "hello",
                     "--max-tokens", "5", "--stop", out["text"][2:4]]) == 0
        assert capsys.readouterr().out == out["text"][:2] + "\n"
    finally:
        server.stop(0).wait()


class CountingBPE:
    """A byte-level BPE tokenizer trained here (``tokenizers``), whose ids split
    multi-byte characters across tokens; it records how many ids each decode reads."""

    def __init__(self):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        corpus = ["the capital of France is Paris", "naïve café déjà vu", "plain words"] * 20
        tok.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        self.tok, self.read = tok, []

    def encode(self, text, add_special_tokens=True):
        return self.tok.encode(text).ids

    def decode(self, ids, skip_special_tokens=True):
        self.read.append(len(ids))
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def test_text_stream_decodes_a_window_not_the_whole_text():
    bpe = CountingBPE()
    text = "Paris est la capitale 🇫🇷 de la France, naïve café 東京 " * 40
    ids = bpe.encode(text)
    assert any(bpe.tok.decode([i]).endswith("\ufffd") for i in ids)  # split characters
    stream = TextStream(bpe)
    out = "".join(stream.add(i) for i in ids) + stream.flush()
    assert out == bpe.tok.decode(ids) == text
    assert len(ids) > 500 and max(bpe.read) < 20  # each token reads a short window


def test_text_stream_with_stop_strings_over_bpe():
    bpe = CountingBPE()
    ids = bpe.encode("the café is on the left; STOP here")
    stream = TextStream(bpe, stop=["STOP"])
    out = ""
    for i in ids:
        out += stream.add(i)
        if stream.stopped:
            break
    assert out + stream.flush() == "the café is on the left; "


# ---------------------------------------------------------------------- batches of decode steps

PROMPTS = [[3, 5], [1, 2, 3, 4, 5, 6], [9], [4, 4, 4]]


def batches(s: Setup, name: str = "fake-0") -> list[int]:
    return list(s.worker(name).batches)


def run_all(s: Setup, g: Generator, prompts, n: int) -> list:
    jobs = [s.pool.submit(run, g.start(p, max_tokens=n)) for p in prompts]
    return [j.result(10)[0] for j in jobs]


def test_sequences_at_once_share_batches_and_each_gets_its_own_tokens(setup):
    s = setup(sequences=4)
    g = Generator(s.pipeline, batch_slots=1)
    assert run_all(s, g, PROMPTS, 12) == [expected(p, 12) for p in PROMPTS]
    # every stage ran the same batches, some of more than one row, none over max_batch
    assert batches(s) == batches(s, "fake-1") and max(batches(s)) > 1
    assert max(batches(s)) <= 4 and g.batcher.largest == max(batches(s))
    until(lambda: all(not w.sequences for w in s.cluster.workers.values()), what="release")


def test_max_batch_one_sends_every_step_alone(setup):
    s = setup(sequences=4)
    g = Generator(s.pipeline, max_batch=1, batch_slots=1)
    assert run_all(s, g, PROMPTS, 6) == [expected(p, 6) for p in PROMPTS]
    assert g.batcher is None and batches(s) == []


def test_max_batch_bounds_the_rows(setup):
    s = setup(sequences=4)
    g = Generator(s.pipeline, max_batch=2, batch_slots=1)
    assert run_all(s, g, PROMPTS, 10) == [expected(p, 10) for p in PROMPTS]
    assert max(batches(s)) == 2


def held_batch(s: Setup, name: str) -> bool:
    """True once ``name`` holds a batch of several decode steps (releasing what else it
    holds until then)."""
    w = s.worker(name)
    if any(a.rows for a in w.held_requests):
        return True
    w.release()
    w.hold()
    return False


def test_a_stage_killed_under_a_batch_replays_each_row_and_they_batch_again(setup):
    s = setup(sequences=3, standby=1)
    g = Generator(s.pipeline, batch_slots=1)
    prompts = PROMPTS[:3]
    jobs = [s.pool.submit(run, g.start(p, max_tokens=14)) for p in prompts]
    until(lambda: batches(s) and max(batches(s)) > 1, what="a batch", seconds=5)
    s.worker("fake-1").hold()
    until(lambda: held_batch(s, "fake-1"), what="a batch held by stage 1", seconds=5)
    rows = max(len(a.rows) for a in s.worker("fake-1").held_requests)
    spare = spy_steps(s.worker("spare-0"))
    s.worker("fake-1").kill()
    assert [j.result(10)[0] for j in jobs] == [expected(p, 14) for p in prompts]
    assert [w.stage.device.name for w in s.pipeline.workers] == ["fake-0", "spare-0"]
    # each row of the lost batch restarted its caches on the spare with its replay alone
    assert sum(1 for position, _ in spare if position == 0) >= rows
    assert max(batches(s, "spare-0")) > 1  # and the rows batched again after


def test_a_cancelled_row_leaves_the_others_untouched(setup):
    s = setup(sequences=3)
    g = Generator(s.pipeline, batch_slots=1)
    generations = [g.start(p, max_tokens=12) for p in PROMPTS[:3]]
    its = [iter(x) for x in generations]
    firsts = [next(it).tokens for it in its]
    jobs = [s.pool.submit(lambda it=it: [t for c in it for t in c.tokens]) for it in its]
    until(lambda: batches(s) and max(batches(s)) > 1, what="a batch", seconds=5)
    generations[1].cancel()
    with pytest.raises(InferError) as e:
        jobs[1].result(5)
    assert e.value.code == grpc.StatusCode.CANCELLED
    for i in (0, 2):
        assert firsts[i] + jobs[i].result(5) == expected(PROMPTS[i], 12)
    until(lambda: all(not w.sequences for w in s.cluster.workers.values()),
          what="every stage to free every sequence")
    assert g.slots.busy == 0


@pytest.mark.parametrize("failover", [True, False])
def test_a_row_whose_caches_are_gone_breaks_the_batch_up_and_every_row_replays(setup, failover):
    s = setup(sequences=3, failover=failover)
    g = Generator(s.pipeline, batch_slots=1)
    generations = [iter(g.start(p, max_tokens=10)) for p in PROMPTS[:3]]
    outs = [next(it).tokens + next(it).tokens for it in generations]
    s.worker("fake-1").sequences.pop(next(iter(s.worker("fake-1").sequences)))  # say, expired
    jobs = [s.pool.submit(lambda it=it: [t for c in it for t in c.tokens]) for it in generations]
    for i, j in enumerate(jobs):
        assert outs[i] + j.result(10) == expected(PROMPTS[i], 10)
    assert max(batches(s)) > 1


def test_default_batch_is_bounded_by_the_stages_memory(tmp_path):
    """A batch holds transient copies of its rows' caches (padded pasts, presents). A plan
    counts them for a batch of all its sequences; more rows (``--max-batch``) are
    batched only as far as they fit beyond each stage's plan."""
    import dataclasses

    from edge.planning.generation import batch_rows_that_fit

    plan = fake_decoder_plan(tmp_path, fake_devices(2), context=1024, sequences=2)
    mib_per_token = 2**20 // 1024  # one row at the full context: 1 MiB of caches
    stages = [dataclasses.replace(s, kv_bytes_per_token=mib_per_token) for s in plan.stages]
    roomy = dataclasses.replace(plan, stages=tuple(stages))
    assert min(s.device.memory_mb - s.predicted.memory_mb for s in stages) > 16 * 2
    assert batch_rows_that_fit(roomy, 8) == 8
    # Room for three more rows of 2 x 1 MiB on stage 1, beyond the plan's two.
    stages[1] = dataclasses.replace(stages[1], predicted=dataclasses.replace(
        stages[1].predicted, memory_mb=stages[1].device.memory_mb - 6.5))
    tight = dataclasses.replace(plan, stages=tuple(stages))
    assert batch_rows_that_fit(tight, 8) == 5
    assert batch_rows_that_fit(tight, 2) == 2
