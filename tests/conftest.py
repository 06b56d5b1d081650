"""Shared fixtures: synthetic checkpoints built once per session, and comparison helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def chirp(seconds: float, seed: int, *, rate: int = 16000) -> np.ndarray:
    """A test clip: a rising chirp (its pitch set by ``seed``) over light noise, float32."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t * (1 + t)) + rng.standard_normal(n) * 0.05).astype(np.float32)


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, what: str = "values") -> None:
    """``|a - e| <= atol + rtol * |e|`` elementwise; the failure names the worst element."""
    a = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, dtype=np.float64)
    e = np.asarray(expected.detach().cpu() if hasattr(expected, "detach") else expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    err = np.abs(a - e)
    excess = err - (atol + rtol * np.abs(e))
    worst = np.unravel_index(int(np.nanargmax(np.where(np.isnan(err), np.inf, excess))), a.shape)
    assert np.isfinite(a).all() == np.isfinite(e).all(), f"{what}: non-finite values differ"
    assert (excess <= 0).all(), (
        f"{what}: {int((excess > 0).sum())} of {a.size} elements exceed atol={atol:g} rtol={rtol:g}; "
        f"worst at {tuple(int(i) for i in worst)}: got {a[worst]!r}, expected {e[worst]!r} (|diff| {err[worst]:.3g}); "
        f"max |diff| {np.nanmax(err):.3g}"
    )


def rel_max_error(actual, expected) -> float:
    """max |a - e| / max |e| (relative error at the scale of the tensor)."""
    a = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, dtype=np.float64)
    e = np.asarray(expected.detach().cpu() if hasattr(expected, "detach") else expected, dtype=np.float64)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mdl_edge.export.synthetic.checkpoint import write_synthetic_checkpoint

    return write_synthetic_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mdl_edge.export.synthetic.checkpoint import write_synthetic_checkpoint

    return write_synthetic_checkpoint("tiny-qwen2", tmp_path_factory.mktemp("ckpt") / "tiny-qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny MiDashengLM-0.6B-style checkpoint: DashengTokenizer-style encoder (100-bin acoustic
    branch), tensor names spelled as the public DashengTokenizer code spells them."""
    from mdl_edge.export.synthetic.checkpoint import write_synthetic_checkpoint

    return write_synthetic_checkpoint("tiny-tok", tmp_path_factory.mktemp("ckpt") / "tiny-tok", seed=3)


@pytest.fixture(scope="session")
def tiny_tok_model(tiny_tok_dir: Path):
    from mdl_edge.export.reference.model import MiDashengLM

    return MiDashengLM.from_pretrained(tiny_tok_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path):
    from mdl_edge.export.reference.model import MiDashengLM

    return MiDashengLM.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_model(tiny_qwen2_dir: Path):
    from mdl_edge.export.reference.model import MiDashengLM

    return MiDashengLM.from_pretrained(tiny_qwen2_dir)


@pytest.fixture(scope="session")
def bundle(tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the tiny Qwen2 checkpoint: fp32 + int8 encoders, f32 + Q8_0 decoders."""
    from mdl_edge.export.convert.bundle import export_bundle

    return export_bundle(tiny_qwen2_dir, tmp_path_factory.mktemp("bundle") / "b", encoders=["fp32", "int8"],
                         decoders=["f32", "Q8_0"], progress=lambda *_: None)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def toy_dir() -> Path:
    """The toy model trained on the toy world (export/toy/train.py): the weights shipped with the
    package while the recipe is theirs, else trained on first use (minutes) and cached."""
    from mdl_edge.export.toy import world as toyworld

    if not toyworld.espeak_available():
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    from mdl_edge.export.toy.store import toy_model

    return toy_model(progress=lambda m: print(f"[toy model] {m}", flush=True))


@pytest.fixture(scope="session")
def toy_bundle(toy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained toy model exported: fp32 + int8 encoders, f32 + Q4_K_M decoders."""
    from mdl_edge.export.convert.bundle import export_bundle

    return export_bundle(toy_dir, tmp_path_factory.mktemp("toy-bundle") / "b", encoders=["fp32", "int8"],
                         decoders=["f32", "Q4_K_M"], progress=lambda *_: None)
