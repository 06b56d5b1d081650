"""ONNX encoder chunks + stitching + projector against the PyTorch reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mdl_edge.runtime import constants as C
from mdl_edge.runtime.encoder import AudioEncoder, chunk_plan, schedule
from mdl_edge.runtime.errors import CheckpointError, ConfigError
from mdl_edge.runtime.mel import log_mel

from conftest import rel_max_error

SECONDS = [0.2, 1.0, 3.0, 10.07, 10.08, 10.09, 12.0, 20.16, 25.0, 61.0]
CORNERS = [16480, 16639, 161760, 323040, 161119, 161120]  # floor(L/640) corner cases and a lone masked patch
LENGTHS = [int(round(s * C.SAMPLE_RATE)) for s in SECONDS] + CORNERS


def clip(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + n)
    t = np.arange(n) / C.SAMPLE_RATE
    return (0.2 * np.sin(2 * np.pi * 300 * t * (1 + t / 20)) + rng.standard_normal(n) * 0.05).astype(np.float32)


@pytest.fixture(scope="module")
def onnx_dir(tiny_dir, tmp_path_factory) -> Path:
    from mdl_edge.export.convert.onnx_encoder import export_audio_onnx
    from mdl_edge.quantize.encoder import quantize_encoder

    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export_audio_onnx(tiny_dir, out)
    quantize_encoder(out, "int8")
    quantize_encoder(out, "int8-static")
    return out


@pytest.fixture(scope="module")
def encoder(onnx_dir) -> AudioEncoder:
    return AudioEncoder(onnx_dir)


def reference(model, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        mel, lengths = model.log_mel([wave])
        feats = model.audio_encoder(mel, lengths)[0]
        (emb,) = model.encode_audio([wave])
    return feats.numpy(), emb.numpy()


@pytest.mark.parametrize("name", ["encoder.onnx", "encoder.int8.onnx", "projector.onnx"])
def test_gelu_runs_as_one_onnx_runtime_kernel(onnx_dir, tmp_path, name: str) -> None:
    """The graphs' exact GELU is written in the form ONNX Runtime fuses into its Gelu kernel: the
    graph it runs has Gelu (or BiasGelu, the bias added in it) nodes, no Erf left (five elementwise
    ops per MLP otherwise) and no tanh approximation."""
    import onnx

    from mdl_edge.runtime.onnx_meta import ort_session

    ort_session(onnx_dir / name, threads=1, optimized_dir=tmp_path)
    ops = [n.op_type for n in onnx.load(str(tmp_path / (Path(name).stem + ".optimized.onnx")), load_external_data=False).graph.node]
    assert {"Gelu", "BiasGelu"} & set(ops) and "Erf" not in ops and "FastGelu" not in ops, sorted(set(ops))


def test_sessions_do_not_spin_after_a_run(onnx_dir) -> None:
    """The encoder's and projector's thread pools sleep after a run: each run is followed at once
    by another pool's on the same cores (projector, prompt engine, llama.cpp), and a pool left
    spinning slowed a 30 s clip's encoder stage by a fifth on two cores (``runtime/onnx_meta.py``)."""
    from mdl_edge.runtime.encoder import AudioEncoder
    from mdl_edge.runtime.onnx_meta import ALLOW_SPINNING_KEY

    enc = AudioEncoder(onnx_dir, threads=2)
    for sess in (enc.encoder, enc.projector):
        assert sess.get_session_options().get_session_config_entry(ALLOW_SPINNING_KEY) == "0"


@pytest.mark.parametrize("n", LENGTHS)
def test_fp32_onnx_matches_reference(encoder, tiny_model, n: int) -> None:
    wave = clip(n)
    ref_feats, ref_emb = reference(tiny_model, wave)
    (feats,) = encoder.encode_mels([log_mel(wave)], [n])
    emb = encoder.embed(wave)
    assert feats.shape == ref_feats.shape == (C.n_patches(max(n, C.MIN_SAMPLES)), 64)
    assert emb.shape == ref_emb.shape == (C.n_audio_tokens(n), 64)
    for name, got, want in (("features", feats, ref_feats), ("embeddings", emb, ref_emb)):
        err = rel_max_error(got, want)
        assert err <= 1e-4, f"{n} samples: {name} relative max error {err:.2e} > 1e-4"


def test_chunk_plan_corners() -> None:
    # 161 760 samples: 253 patches, floor(L/640) = 252: chunk 2 is a lone masked patch -> attends to itself
    assert [(s.n_real, s.n_keys) for s in chunk_plan(161760)] == [(252, 252), (1, 1)]
    # 16 480: 26 patches, 25 keys
    assert [(s.n_real, s.n_keys) for s in chunk_plan(16480)] == [(26, 25)]
    # exactly two full chunks whose last patch is masked
    L = (2 * C.CHUNK_FRAMES - 1) * C.HOP_LENGTH  # 2016 frames = 504 patches; (L // 160) % 4 == 3
    plan = chunk_plan(L)
    assert [s.first_frame for s in plan] == [0, 1008] and plan[-1].n_keys == plan[-1].n_real - 1


class RunSpy:
    """Records the ``mel`` shape of every encoder run of an :class:`AudioEncoder`."""

    def __init__(self, enc: AudioEncoder) -> None:
        self.shapes: list[tuple[int, ...]] = []
        run = enc.encoder.run

        def spy(names, feeds):  # noqa: ANN001, ANN202
            self.shapes.append(feeds["mel"].shape)
            return run(names, feeds)

        enc.encoder = type("Spied", (), {"run": staticmethod(spy), "get_inputs": enc.encoder.get_inputs})()


def test_partial_chunk_runs_at_its_own_length(onnx_dir) -> None:
    """A 3 s clip costs 300 frames of encoder input, not 1008; a 12 s clip a full chunk and 192."""
    enc = AudioEncoder(onnx_dir)
    spy = RunSpy(enc)
    for seconds in (3.0, 12.0):
        enc.embed(clip(int(seconds * C.SAMPLE_RATE)))
    assert spy.shapes == [(1, 64, 300), (1, 64, 1008), (1, 64, 192)]
    assert all(s[2] < C.CHUNK_FRAMES for s in (spy.shapes[0], spy.shapes[2]))


def test_static_frames_pad_to_1008_with_the_same_result(onnx_dir, encoder) -> None:
    """The graph's time axis pinned to 1008 (as a static-shape backend needs): every chunk is
    padded, the features at real positions are the dynamic graph's."""
    static = AudioEncoder(onnx_dir, static_frames=True)
    spy = RunSpy(static)
    for n in (int(3 * C.SAMPLE_RATE), 161119, int(12 * C.SAMPLE_RATE)):
        mel = log_mel(clip(n))
        (want,) = encoder.encode_mels([mel], [n])
        (got,) = static.encode_mels([mel], [n])
        assert got.shape == want.shape
        err = rel_max_error(got, want)
        assert err <= 1e-5, f"{n} samples: static vs dynamic relative max error {err:.2e}"
    assert {s[2] for s in spy.shapes} == {C.CHUNK_FRAMES}


def test_schedule_never_pads_a_chunk_to_another_length() -> None:
    lengths = [int(s * C.SAMPLE_RATE) for s in (3.0, 12.0, 3.0, 25.0, 10.08, 0.5)]
    jobs = [(i, spec) for i, n in enumerate(lengths) for spec in chunk_plan(max(n, C.MIN_SAMPLES))]
    runs = schedule(jobs, 4)
    assert sorted((i, s.first_frame) for r in runs for i, s in r) == sorted((i, s.first_frame) for i, s in jobs)  # every chunk once
    for r in runs:
        assert len(r) <= 4 and len({spec.n_real for _, spec in r}) == 1, [spec.n_real for _, spec in r]
    assert all(spec.n_real == C.CHUNK_PATCHES for _, spec in runs[0])  # full chunks together first
    # four full chunks (12 s, 2 x 25 s, 10.08 s) in one run; the two 3 s clips share one
    assert [[spec.n_real for _, spec in r] for r in runs] == [[252] * 4, [75, 75], [48], [121], [12]]
    for i in range(len(lengths)):  # each clip's chunks keep their order
        order = [spec.first_frame for r in runs for j, spec in r if j == i]
        assert order == sorted(order)


def test_batched_chunks_equal_one_at_a_time(onnx_dir) -> None:
    wave = clip(int(61 * C.SAMPLE_RATE))
    mel = log_mel(wave)
    (one,) = AudioEncoder(onnx_dir, max_batch=1).encode_mels([mel], [wave.size])
    (many,) = AudioEncoder(onnx_dir, max_batch=8).encode_mels([mel], [wave.size])
    assert rel_max_error(many, one) <= 1e-5


def test_clips_batched_together_equal_each_alone(onnx_dir, encoder) -> None:
    waves = [clip(n, seed=3) for n in LENGTHS]
    mels = [log_mel(w) for w in waves]
    together = AudioEncoder(onnx_dir, max_batch=8).encode_mels(mels, [w.size for w in waves])
    for w, m, t in zip(waves, mels, together):
        (alone,) = encoder.encode_mels([m], [w.size])
        assert rel_max_error(t, alone) <= 1e-5, f"clip of {w.size} samples"


def test_quantizing_where_an_older_bundle_lies(onnx_dir, tmp_path, monkeypatch) -> None:
    """Run from a folder that holds a file named like the output's data file (an older bundle's),
    quantizing still writes its own: onnx's writer checks that name in the working directory."""
    import shutil

    from mdl_edge.quantize.encoder import quantize_encoder

    out = tmp_path / "new"
    out.mkdir()
    for name in ("encoder.onnx", "encoder.onnx.data", "projector.onnx", "projector.onnx.data"):
        shutil.copy(onnx_dir / name, out / name)
    old = tmp_path / "old-bundle"
    old.mkdir()
    (old / "encoder.int8.onnx.data").write_bytes(b"an older bundle's weights")
    monkeypatch.chdir(old)
    made = quantize_encoder(Path("..") / "new", "int8")
    assert made == out / "encoder.int8.onnx" and (out / "encoder.int8.onnx.data").stat().st_size > 1000
    assert (old / "encoder.int8.onnx.data").read_bytes() == b"an older bundle's weights" and Path.cwd() == old


@pytest.mark.parametrize("variant", ["int8", "int8-static"])
def test_int8_variants_drift(onnx_dir, encoder, variant: str) -> None:
    """Per-frame cosine to fp32 on held-out audio, floor 0.9995 mean / 0.999 min: the goal's
    0.999 with margin. Measured 0.99996 here (2 layers) and 0.9994 at real size (32 layers,
    README): 8-bit error grows with depth, so the floor holds for the deeper model too."""
    import onnx

    from mdl_edge.quantize.encoder import activation_matmul_nodes, patch_embed_nodes, variant_file

    # every weighted MatMul is int8 except the patch embedding, which reads the raw log-mel
    fp32 = onnx.load(str(onnx_dir / "encoder.onnx"), load_external_data=False)
    q = onnx.load(str(onnx_dir / variant_file(variant)), load_external_data=False)
    weights = {i.name for i in q.graph.initializer}
    float_mm = [n.name for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert float_mm == patch_embed_nodes(fp32), float_mm
    # attention's products of two activations stay fp32 too: no input comes from a DequantizeLinear
    dequantized = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    by_name = {n.name: n for n in q.graph.node}
    act_mm = activation_matmul_nodes(fp32)
    assert len(act_mm) == 2 * len([n for n in fp32.graph.node if n.op_type == "Softmax"]), act_mm
    assert all(by_name[m].op_type == "MatMul" and not set(by_name[m].input) & dequantized for m in act_mm), act_mm

    var = AudioEncoder(onnx_dir, encoder_file=variant_file(variant))
    waves = [clip(int(25 * C.SAMPLE_RATE), seed=99), clip(int(3.3 * C.SAMPLE_RATE), seed=7) * 3]
    mels = [log_mel(w) for w in waves]
    a = np.concatenate(encoder.encode_mels(mels, [w.size for w in waves]))
    b = np.concatenate(var.encode_mels(mels, [w.size for w in waves]))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"{variant}: per-frame cosine mean {cos.mean():.6f} min {cos.min():.6f}")
    assert cos.mean() >= 0.9995 and cos.min() >= 0.999, f"{variant}: cosine mean {cos.mean():.5f} min {cos.min():.5f}"
    drift = var.meta["drift_vs_fp32"]
    assert var.meta["precision"] == variant and drift["frame_cosine_mean"] >= 0.9995


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_encoder_from_another_checkpoint_is_refused(onnx_dir, tiny_qwen2_dir, tmp_path) -> None:
    from mdl_edge.export.convert.onnx_encoder import export_audio_onnx

    other = tmp_path / "other"
    export_audio_onnx(tiny_qwen2_dir, other)
    mixed = _copy(onnx_dir, tmp_path / "mixed")
    for f in ("projector.onnx", "projector.onnx.data"):
        shutil.copy(other / f, mixed / f)
    with pytest.raises(CheckpointError, match="come from different checkpoints"):
        AudioEncoder(mixed)


def test_projector_of_the_wrong_width_is_refused(onnx_dir, tmp_path) -> None:
    import onnx
    from onnx import TensorProto, helper

    d = _copy(onnx_dir, tmp_path / "m")
    meta = json.loads(AudioEncoder(onnx_dir).projector.get_modelmeta().custom_metadata_map["mdl_edge"])
    w = helper.make_tensor("w", TensorProto.FLOAT, [100, 64], np.zeros(6400, np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["stacked", "w"], ["embeddings"])], "p",
        [helper.make_tensor_value_info("stacked", TensorProto.FLOAT, ["rows", 100])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["rows", 64])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.metadata_props.add(key="mdl_edge", value=json.dumps(meta))
    (d / "projector.onnx.data").unlink()
    onnx.save_model(model, str(d / "projector.onnx"))
    with pytest.raises(CheckpointError, match="takes 100 inputs, but the encoder gives 5 x 64 = 320"):
        AudioEncoder(d)


def test_missing_external_data(onnx_dir, tmp_path) -> None:
    d = _copy(onnx_dir, tmp_path / "m")
    (d / "encoder.onnx.data").unlink()
    with pytest.raises(CheckpointError, match="encoder.onnx: onnxruntime cannot load it"):
        AudioEncoder(d)


def test_external_data_outside_the_folder_is_refused(onnx_dir, tmp_path) -> None:
    import onnx

    d = _copy(onnx_dir, tmp_path / "inner" / "m")
    shutil.move(str(d / "encoder.onnx.data"), str(tmp_path / "inner" / "stolen.data"))
    model = onnx.load(str(d / "encoder.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../stolen.data"
    onnx.save_model(model, str(d / "encoder.onnx"))
    with pytest.raises(CheckpointError, match="encoder.onnx"):
        AudioEncoder(d)


def test_mel_of_the_wrong_shape(encoder) -> None:
    with pytest.raises(ConfigError, match="expected \\[64, frames\\], got \\[80, 500\\]"):
        encoder.encode_mels([np.zeros((80, 500), np.float32)], [80000])
    with pytest.raises(ConfigError, match="100 frames, but 80000 samples make 501"):
        encoder.encode_mels([np.zeros((64, 100), np.float32)], [80000])


def test_missing_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="encoder.onnx: not found"):
        AudioEncoder(tmp_path)


def test_cuda_provider_without_cuda(onnx_dir) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ConfigError, match="no CUDAExecutionProvider"):
        AudioEncoder(onnx_dir, provider="cuda")


@pytest.mark.slow
def test_real_size_chunk(tmp_path_factory) -> None:
    """0.6b preset (the DashengTokenizer-style encoder): one full chunk and a partial one through
    ONNX fp32 vs the PyTorch reference encoder."""
    from mdl_edge.export.convert.checkpoint import Checkpoint
    from mdl_edge.export.convert.onnx_encoder import export_audio_onnx
    from mdl_edge.export.reference.model import load_audio_tower
    from mdl_edge.export.reference.mel import LogMel, batch_log_mel
    from mdl_edge.export.synthetic.checkpoint import write_synthetic_checkpoint

    root = tmp_path_factory.mktemp("real")
    ckpt_dir = write_synthetic_checkpoint("0.6b", root / "ckpt")
    out = export_audio_onnx(ckpt_dir, root / "onnx")[0].parent
    wave = clip(int(10.08 * C.SAMPLE_RATE) + 800)
    ckpt = Checkpoint(ckpt_dir)
    enc, _ = load_audio_tower(ckpt)
    with torch.inference_mode():
        mel, lengths = batch_log_mel(LogMel(acoustic_mels=ckpt.config.encoder.acoustic_mels), [wave])
        ref = enc(mel, lengths)[0].numpy()
    runtime = AudioEncoder(out)
    (got,) = runtime.encode_mels([runtime.log_mel(wave)], [wave.size])
    assert rel_max_error(got, ref) <= 1e-4


@pytest.mark.parametrize("n", [1000, 16000 * 3, int(10.08 * 16000) + 800, 16000 * 31])
def test_chunkwise_projection_equals_projecting_the_stitched_sequence(encoder, n: int) -> None:
    """embed_mel projects each chunk's features as soon as whole groups of 5 are stitched (252 is
    not a multiple of 5: groups straddle chunks); the result is the projector on the whole
    stitched sequence, with the trailing P mod 5 frames dropped."""
    wave = clip(n)
    mel = log_mel(wave)
    (feats,) = encoder.encode_mels([mel], [wave.size])
    timings: dict[str, float] = {}
    got = encoder.embed_mel(mel, wave.size, timings=timings)
    want = encoder.project(feats)
    assert got.shape == want.shape == (C.n_audio_tokens(wave.size), encoder.hidden_size)
    assert rel_max_error(got, want) <= 1e-6, f"max rel error {rel_max_error(got, want):.3g}"
    assert set(timings) == {"encoder", "projector"}


def test_cpu_features_decide_the_int8_kernels(onnx_dir, monkeypatch) -> None:
    """x86-64 without VNNI gets ORT's exact u8 x u8 int8 kernels; the setting reaches the session."""
    from mdl_edge.runtime import cpu, encoder as E

    epyc = cpu.parse_cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC 7763 64-Core Processor\nflags\t\t: fpu sse4_2 avx avx2 fma f16c\n", "x86_64")
    xeon = cpu.parse_cpuinfo("model name\t: Intel(R) Xeon(R) Platinum\nflags\t: avx2 avx512f avx512_vnni amx_int8 amx_tile\n", "x86_64")
    arm = cpu.parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nCPU part\t: 0xd0c\n", "aarch64")
    assert epyc.model == "AMD EPYC 7763 64-Core Processor" and epyc.features == ("sse4_2", "avx", "avx2", "fma", "f16c")
    assert (epyc.int8_saturates, xeon.int8_saturates, arm.int8_saturates) == (True, False, False)
    assert (epyc.fast_int8, xeon.fast_int8, arm.fast_int8) == (False, True, True)  # where the prompt engine is the default
    assert "avx512_vnni" in xeon.describe() and arm.features == ("asimd", "asimddp", "i8mm")
    def entry(enc: AudioEncoder) -> str | None:
        try:
            return enc.encoder.get_session_options().get_session_config_entry(E.PRECISE_INT8_KEY)
        except RuntimeError:  # ORT: no such entry
            return None

    for info, want in ((epyc, "1"), (xeon, None)):
        monkeypatch.setattr(E, "cpu_info", lambda info=info: info)
        enc = AudioEncoder(onnx_dir, encoder_file="encoder.int8.onnx")
        assert enc.precise_int8 == info.int8_saturates and entry(enc) == want
    assert entry(AudioEncoder(onnx_dir, encoder_file="encoder.int8.onnx", precise_int8=True)) == "1"


def test_graph_with_a_fixed_1008_axis_still_runs_padded(onnx_dir, encoder, tmp_path) -> None:
    """An encoder exported before the time axis became dynamic (fixed 1008 frames) loads and pads
    every partial chunk, with the dynamic graph's features."""
    import onnx

    d = tmp_path / "fixed"
    shutil.copytree(onnx_dir, d)
    model = onnx.load(str(d / "encoder.onnx"), load_external_data=False)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = C.CHUNK_FRAMES
    onnx.save(model, str(d / "encoder.onnx"))
    fixed = AudioEncoder(d)
    assert fixed.chunk_frames == C.CHUNK_FRAMES and encoder.chunk_frames is None
    spy = RunSpy(fixed)
    n = int(3 * C.SAMPLE_RATE)
    mel = log_mel(clip(n))
    (got,) = fixed.encode_mels([mel], [n])
    (want,) = encoder.encode_mels([mel], [n])
    assert spy.shapes == [(1, 64, C.CHUNK_FRAMES)] and rel_max_error(got, want) <= 1e-5
