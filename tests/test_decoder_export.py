"""Decoders exported with a KV cache: ONNX vs torch logits step by step, greedy tokens vs
transformers' generate, and SmolLM2 (real weights from a GGUF) answering a chat prompt
through the exported tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import SMOLLM2_NEW_TOKENS, SMOLLM2_QUESTION

PROMPT = [5, 17, 42, 99, 3, 250, 7]


def _torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def _check_steps(model, onnx_path: Path, prompt: list[int], steps: int) -> None:
    """ONNX logits at prefill and at each decode step (fed from the cache) equal torch's
    logits over the whole prefix without a cache."""
    import torch

    from edge.export.generate import OnnxDecoder

    dec = OnnxDecoder(onnx_path)
    got = dec.feed(prompt)
    seq = list(prompt)
    for step in range(steps + 1):
        with torch.no_grad():
            want = model(torch.tensor([seq]), use_cache=False).logits[0].numpy()
        want = want if step == 0 else want[-1:]
        assert got.shape == want.shape
        diff = float(np.max(np.abs(got - want)))
        assert diff <= 1e-4, f"step {step}: max abs diff {diff:.3g} vs torch"
        token = int(np.argmax(got[-1]))
        seq.append(token)
        got = dec.feed([token])
    assert dec.length == len(seq)


@pytest.fixture(scope="module")
def llama_tiny(tmp_path_factory):
    from edge.export.decoder import build_llama, export_llama

    out = export_llama("tiny", seed=0, out=tmp_path_factory.mktemp("llama") / "model.onnx")
    return build_llama("tiny", seed=0), out


def test_llama_tiny_graph_io(llama_tiny):
    import onnx

    _, path = llama_tiny
    m = onnx.load(str(path), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in [*m.graph.input, *m.graph.output]}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["position_ids"] == ["batch", "sequence"]
    # GQA: 2 KV heads of 16 (4 query heads, hidden 64).
    for n in range(2):
        for kv in ("key", "value"):
            assert dims[f"past_key_values.{n}.{kv}"] == ["batch", 2, "past_sequence", 16]
            assert dims[f"present.{n}.{kv}"][:2] == ["batch", 2]
            assert dims[f"present.{n}.{kv}"][3] == 16
    assert dims["logits"] == ["batch", "sequence", 1000]
    assert m.opset_import[0].version in (17, 18)
    # Plannable: a flat graph, no control flow.
    assert not {n.op_type for n in m.graph.node} & {"If", "Loop", "Scan"}
    assert path.with_name(path.name + ".data").is_file()
    info = json.loads((path.parent / "generation.json").read_text())
    assert (info["num_layers"], info["num_key_value_heads"], info["head_dim"]) == (2, 2, 16)
    assert info["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]


def test_llama_tiny_logits_match_torch_at_each_step(llama_tiny):
    model, path = llama_tiny
    _check_steps(model, path, PROMPT, steps=6)


def test_llama_tiny_greedy_matches_generate(llama_tiny):
    from edge.export.generate import greedy_generate

    model, path = llama_tiny
    # No EOS stop on either side: 12 tokens each, compared token for token.
    model.generation_config.eos_token_id = None
    got = greedy_generate(path, PROMPT, 12, eos_token_ids=[])
    assert got == _torch_greedy(model, PROMPT, 12)
    assert len(got) == 12


def test_greedy_stops_on_eos(llama_tiny):
    from edge.export.generate import greedy_generate

    _, path = llama_tiny
    full = greedy_generate(path, PROMPT, 12, eos_token_ids=[])
    stop = full[4]
    got = greedy_generate(path, PROMPT, 12, eos_token_ids=[stop])
    assert got == full[:full.index(stop) + 1]


def _tiny_hf(family: str, where: Path):
    import torch
    import transformers as tf

    from edge.export.onnx_export import _perturb

    torch.manual_seed(0)
    if family == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=500, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256)
        model = tf.Qwen2ForCausalLM(cfg)
    else:
        cfg = tf.GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=256)
        model = tf.GPT2LMHeadModel(cfg)
    # Larger than the usual 0.02 nudge, so that greedy decoding does not settle on one
    # repeated token and the comparison sees varied tokens.
    _perturb(model, 0)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    model.eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(where)
    return model


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_hf_decoder_greedy_matches_generate(family, tmp_path):
    from edge.export.decoder import export_hf_decoder
    from edge.export.generate import greedy_generate

    model = _tiny_hf(family, tmp_path / "src")
    path = export_hf_decoder(tmp_path / "src", tmp_path / "onnx" / "model.onnx")
    _check_steps(model, path, PROMPT, steps=3)
    got = greedy_generate(path, PROMPT, 8, eos_token_ids=[])
    assert got == _torch_greedy(model, PROMPT, 8)


def test_opset_17_is_refused_not_silently_18(tmp_path):
    from edge.export import ExportError
    from edge.export.decoder import build_llama, export_decoder

    with pytest.raises(ExportError, match="expected opset 17"):
        export_decoder(build_llama("tiny"), tmp_path / "model.onnx", opset=17, verify=False)


def test_export_gguf_names_a_missing_file(tmp_path):
    from edge.export import ExportError
    from edge.export.decoder import export_gguf

    with pytest.raises(ExportError, match="expected a GGUF file"):
        export_gguf(tmp_path / "nope.gguf", tmp_path / "model.onnx")


def test_render_chat_matches_transformers_rendering():
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from edge.text import render_chat

    # A template using what HF's environment provides: trim/lstrip blocks, loop controls,
    # tojson, raise_exception and the special tokens as variables.
    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "  {% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('bad role') }}{% endif %}\n"
        "  {% if m['content'] == 'skip' %}{% continue %}{% endif %}\n"
        "<|{{ m['role'] }}|>{{ m['content'] | tojson }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    config = {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"}
    messages = [{"role": "system", "content": "Be brief. <b>é</b>"},
                {"role": "user", "content": "skip"}, {"role": "user", "content": "Hi"}]
    want = _compile_jinja_template(template).render(
        messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert render_chat(config, messages) == want
    assert '"Be brief. <b>é</b>"' in want
    # Each chat request renders: the template is compiled once, not per request.
    from edge.text import _compiled

    misses = _compiled.cache_info().misses
    assert render_chat(config, messages) == want
    assert render_chat(config, messages[2:], add_generation_prompt=False) == \
        _compile_jinja_template(template).render(messages=messages[2:], bos_token="<s>",
                                                 eos_token="</s>", add_generation_prompt=False)
    assert _compiled.cache_info().misses == misses


def test_serving_modules_do_not_import_torch():
    from helpers import assert_no_torch

    assert_no_torch("edge.text", "edge.export.generate")


def test_smollm2_gguf_chat_answers_paris(smollm2, smollm2_chat):
    """Real weights: the exported model, tokenizer and chat template (served with
    tokenizers + jinja2 only) answer as transformers does."""
    from edge.export.generate import greedy_generate
    from edge.text import load_tokenizer

    path = smollm2
    for name in ("tokenizer.json", "tokenizer_config.json", "generation.json"):
        assert (path.parent / name).is_file(), name
    info = json.loads((path.parent / "generation.json").read_text())
    assert (info["num_layers"], info["num_key_value_heads"], info["head_dim"],
            info["vocab_size"]) == (30, 3, 64, 49152)

    tok = load_tokenizer(path.parent)
    ids = tok.chat_ids(SMOLLM2_QUESTION)
    answer = greedy_generate(path, ids, SMOLLM2_NEW_TOKENS)
    text = tok.decode(answer)

    assert ids == smollm2_chat["ids"]
    assert answer == smollm2_chat["tokens"]
    assert answer[-1] in tok.eos_token_ids
    assert text.startswith("The capital of France is Paris"), text
