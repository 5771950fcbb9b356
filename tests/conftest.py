"""Shared fixtures: small models exported once per test session. Shared helpers that are
not fixtures are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def pytest_terminal_summary(terminalreporter, config):
    """Per-RPC case counts of tests/test_fuzz.py, when it ran."""
    counts = getattr(config, "_edge_fuzz_counts", None)
    if counts:
        terminalreporter.section("fuzz cases per RPC")
        for rpc, n in sorted(counts.items()):
            terminalreporter.write_line(f"{rpc:32s} {n:6d}")
        terminalreporter.write_line(f"{'total':32s} {sum(counts.values()):6d}")
