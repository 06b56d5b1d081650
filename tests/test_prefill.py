"""The prompt engine: the ONNX prompt graph against llama.cpp's own keys and values, the KV
handover in llama.cpp's sequence-state layout, generation through it, and its place in a bundle."""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_close, rel_max_error

TOKENS = tuple(range(10, 40))


@pytest.fixture(scope="module")
def ggufs(tiny_dir: Path, tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mdl_edge.export.convert.gguf_decoder import export_decoder_gguf

    out = tmp_path_factory.mktemp("prefill-gguf")
    return {name: export_decoder_gguf(d, out / f"{name}.f32.gguf", out_type="f32") for name, d in (("qwen3", tiny_dir), ("qwen2", tiny_qwen2_dir))}


@pytest.fixture(scope="module")
def graphs(ggufs: dict[str, Path]) -> dict[str, Path]:
    """The fp32 prompt graph of each tiny decoder (bundles keep only the int8 one)."""
    from mdl_edge.export.convert.onnx_prefill import export_prefill_onnx

    return {name: export_prefill_onnx(p, p.with_name(f"{name}.prefill.onnx")) for name, p in ggufs.items()}


def _state(dec) -> bytes:
    L = dec._L
    size = L.llama_state_seq_get_size(dec._ctx, 0)
    buf = (ctypes.c_ubyte * size)()
    assert L.llama_state_seq_get_data(dec._ctx, buf, size, 0) == size
    return bytes(buf)


@pytest.mark.parametrize("f32_kv,flash_attn", [(True, False), (False, True), (False, False)])
def test_sequence_state_layout_round_trips_llama_cpp(ggufs, f32_kv, flash_attn) -> None:
    """What llama.cpp saves, read and written back, is the same bytes: the layout is llama.cpp's."""
    from mdl_edge.runtime.decoder import LlamaDecoder
    from mdl_edge.runtime.prompt import Segment
    from mdl_edge.runtime.kv_state import read_sequence, write_sequence

    with LlamaDecoder(ggufs["qwen3"], n_ctx=256, f32_kv=f32_kv, flash_attn=flash_attn) as dec:
        dec.evaluate([Segment(tokens=TOKENS)])
        blob = _state(dec)
    kv = read_sequence(blob)
    assert kv.k.shape == (2, len(TOKENS), 32) and kv.k.dtype == (np.float32 if f32_kv else np.float16)
    assert kv.v_trans == (not flash_attn) and kv.positions.tolist() == list(range(len(TOKENS)))
    assert write_sequence(kv).data == blob


def test_sequence_state_errors_name_the_problem() -> None:
    from mdl_edge.runtime.errors import MdlEdgeError
    from mdl_edge.runtime.kv_state import SequenceKV, read_sequence, write_sequence

    k = np.ones((2, 3, 8), np.float16)
    blob = bytes(write_sequence(SequenceKV(np.arange(3, dtype=np.int32), k, k, False)).data)
    assert read_sequence(blob).k.tolist() == k.tolist()
    with pytest.raises(MdlEdgeError, match="ends early"):
        read_sequence(blob[:-5])
    with pytest.raises(MdlEdgeError, match="not 0xaf143cd8"):
        read_sequence(b"\0" * 4 + blob[4:])
    with pytest.raises(MdlEdgeError, match="unread bytes"):
        read_sequence(blob + b"\0")
    with pytest.raises(ValueError, match="float16 or float32"):
        SequenceKV(np.arange(3, dtype=np.int32), k.astype(np.int8), k.astype(np.int8), False)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_prompt_graph_matches_llama_cpp_keys_and_values(ggufs, graphs, arch) -> None:
    """The graph's keys (after the per-head norm and RoPE) and values are llama.cpp's own, and a
    prompt run in two parts (the second after the first's cache) gives the same as one run."""
    from mdl_edge.runtime.decoder import LlamaDecoder
    from mdl_edge.runtime.prompt import Segment
    from mdl_edge.runtime.kv_state import read_sequence
    from mdl_edge.runtime.prefill import PrefillEngine

    with LlamaDecoder(ggufs[arch], n_ctx=256, f32_kv=True, flash_attn=False) as dec:
        dec.evaluate([Segment(tokens=TOKENS)])
        ref = read_sequence(_state(dec))
        rows = dec.token_rows(TOKENS)
    engine = PrefillEngine(graphs[arch], threads=1)
    k, v = engine.run(rows, 0)
    assert rel_max_error(k, ref.k) <= 1e-5, rel_max_error(k, ref.k)
    assert rel_max_error(v, ref.v) <= 1e-5, rel_max_error(v, ref.v)
    k1, v1 = engine.run(rows[:12], 0)
    k2, v2 = engine.run(rows[12:], 12, k1, v1)
    assert_close(np.concatenate([k1, k2], 1), k, atol=1e-6, what="keys in two parts")
    assert_close(np.concatenate([v1, v2], 1), v, atol=1e-6, what="values in two parts")
    with pytest.raises(ValueError, match="do not fit 5 positions"):
        engine.run(rows[12:], 5, k1, v1)


def test_float16_prompt_graph_is_the_float32_one_rounded(ggufs, graphs, tmp_path: Path) -> None:
    """A graph made for an f16 KV cache (as bundles carry) takes and returns float16 keys and values
    equal to the float32 graph's to float16 rounding, in one run and after a cached part."""
    from mdl_edge.export.convert.onnx_prefill import export_prefill_onnx
    from mdl_edge.runtime.prefill import PrefillEngine

    f32 = PrefillEngine(graphs["qwen3"], threads=1)
    f16 = PrefillEngine(export_prefill_onnx(ggufs["qwen3"], tmp_path / "f16.onnx", kv_dtype="float16"), threads=1)
    assert (f32.kv_dtype, f16.kv_dtype) == (np.float32, np.float16)
    rows = np.random.default_rng(1).standard_normal((len(TOKENS), f16.hidden_size)).astype(np.float32) * 0.05
    k, v = f32.run(rows, 0)
    k16, v16 = f16.run(rows, 0)
    assert k16.dtype == v16.dtype == np.float16
    assert rel_max_error(k16.astype(np.float32), k) <= 1e-3, rel_max_error(k16.astype(np.float32), k)
    assert rel_max_error(v16.astype(np.float32), v) <= 1e-3, rel_max_error(v16.astype(np.float32), v)
    k1, v1 = f16.run(rows[:12], 0)
    k2, _ = f16.run(rows[12:], 12, k1, v1)
    assert rel_max_error(k2.astype(np.float32), k[:, 12:]) <= 2e-3, rel_max_error(k2.astype(np.float32), k[:, 12:])
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        export_prefill_onnx(ggufs["qwen3"], tmp_path / "bf16.onnx", kv_dtype="bfloat16")


@pytest.mark.parametrize("f32_kv,flash_attn", [(True, False), (False, True)])
def test_generation_through_the_prompt_engine_matches_llama_cpp(ggufs, graphs, f32_kv, flash_attn) -> None:
    """Text + audio + text prompts, then a second request that reuses the cached text prefix: the
    same tokens, the same positions evaluated, and logits equal to llama.cpp's own prompt pass
    (to float round-off with an f32 cache; to the f16 cache's rounding otherwise)."""
    from mdl_edge.runtime.decoder import LlamaDecoder
    from mdl_edge.runtime.prompt import Segment
    from mdl_edge.runtime.prefill import PrefillEngine

    audio = np.random.default_rng(0).standard_normal((15, 64)).astype(np.float32) * 0.02
    first = [Segment(tokens=TOKENS[:12]), Segment(embeddings=audio), Segment(tokens=TOKENS[12:22])]
    second = [first[0], Segment(embeddings=audio[::-1].copy()), first[2]]
    runs = []
    for engine in (None, PrefillEngine(graphs["qwen3"], threads=1)):
        with LlamaDecoder(ggufs["qwen3"], n_ctx=256, f32_kv=f32_kv, flash_attn=flash_attn, prefill=engine) as dec:
            assert dec.prefill is engine
            a = dec.generate(first, max_new_tokens=8).result()
            logits_a = dec.logits()
            b = dec.generate(second, max_new_tokens=8).result()
            runs.append((a.token_ids, b.token_ids, a.n_evaluated, b.n_evaluated, logits_a, dec.logits()))
    (ta, tb, na, nb, la, lb), (ea, eb, ma, mb, fa, fb) = runs
    assert (ea, eb) == (ta, tb) and (ma, mb) == (na, nb) == (37, 25)
    tol = 1e-5 if f32_kv else 2e-3
    for got, want in ((fa, la), (fb, lb)):
        assert rel_max_error(got, want) <= tol, rel_max_error(got, want)


def test_float16_engine_writes_straight_into_llama_cpps_buffer(ggufs, tmp_path: Path) -> None:
    """The bundles' case (float16 graph, f16 cache, flash attention): each layer's keys and values
    are bound into the buffer handed to llama.cpp, equal to the graph's own outputs, and generation
    matches llama.cpp's prompt pass to the f16 cache's rounding."""
    from mdl_edge.export.convert.onnx_prefill import export_prefill_onnx
    from mdl_edge.runtime.decoder import LlamaDecoder
    from mdl_edge.runtime.kv_state import SequenceBlob, read_sequence
    from mdl_edge.runtime.prefill import PrefillEngine, layer_outputs
    from mdl_edge.runtime.prompt import Segment

    engine = PrefillEngine(export_prefill_onnx(ggufs["qwen3"], tmp_path / "f16.onnx", kv_dtype="float16"), threads=1)
    assert engine.per_layer and [o.name for o in engine.session.get_outputs()] == layer_outputs(engine.n_layer)
    rows = np.random.default_rng(2).standard_normal((9, engine.hidden_size)).astype(np.float32) * 0.05
    k, v = engine.run(rows, 0)
    blob = SequenceBlob(np.arange(9, dtype=np.int32), engine.n_layer, engine.kv_dim, np.float16, v_trans=False)
    engine.run_into(rows, 0, [blob.k(i) for i in range(engine.n_layer)], [blob.v(i) for i in range(engine.n_layer)])
    got = read_sequence(bytes(blob.data))
    assert np.array_equal(got.k, k) and np.array_equal(got.v, v) and got.positions.tolist() == list(range(9))
    with pytest.raises(ValueError, match="writable C-contiguous"):
        engine.run_into(rows, 0, [blob.k(i) for i in range(engine.n_layer)], [blob.v(i).T for i in range(engine.n_layer)])

    bound: list[int] = []
    run_into = engine.run_into
    engine.run_into = lambda rows, *rest: (bound.append(rows.shape[0]), run_into(rows, *rest))[1]  # type: ignore[method-assign]
    audio = np.random.default_rng(0).standard_normal((15, 64)).astype(np.float32) * 0.02
    prompt = [Segment(tokens=TOKENS[:12]), Segment(embeddings=audio), Segment(tokens=TOKENS[12:22])]
    runs = []
    for eng in (None, engine):
        with LlamaDecoder(ggufs["qwen3"], n_ctx=256, prefill=eng) as dec:
            assert dec.flash_attn
            runs.append((dec.generate(prompt, max_new_tokens=8).result().token_ids, dec.logits()))
    assert bound == [36] and runs[1][0] == runs[0][0]
    assert rel_max_error(runs[1][1], runs[0][1]) <= 2e-3, rel_max_error(runs[1][1], runs[0][1])


def test_graphs_in_the_stacked_layout_still_run(graphs, tmp_path: Path) -> None:
    """A prompt graph exported before each layer had its own inputs and outputs (``past_k`` /
    ``past_v`` in, ``k`` / ``v`` out, all layers stacked [n_layer, n, kv_dim]) loads and gives the
    same cells through every call, a cached prefix and pieces included."""
    import onnx
    from onnx import helper

    from mdl_edge.runtime.prefill import PrefillEngine, layer_inputs, layer_outputs

    src = graphs["qwen3"]
    new = PrefillEngine(src, threads=1)
    n_layer, dim = new.n_layer, new.kv_dim
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    axis = helper.make_tensor("stack_axis", onnx.TensorProto.INT64, [1], [0])
    g.initializer.append(axis)
    ins, outs = layer_inputs(n_layer), layer_outputs(n_layer)
    for kind, part in (("past_k", ins[:n_layer]), ("past_v", ins[n_layer:])):
        g.node.insert(0, helper.make_node("Split", [kind], [f"{n}.3d" for n in part], axis=0, num_outputs=n_layer))
        for name in part:
            g.node.insert(1, helper.make_node("Squeeze", [f"{name}.3d", "stack_axis"], [name]))
    for kind, part in (("k", outs[:n_layer]), ("v", outs[n_layer:])):
        for name in part:
            g.node.append(helper.make_node("Unsqueeze", [name, "stack_axis"], [f"{name}.stacked"]))
        g.node.append(helper.make_node("Concat", [f"{n}.stacked" for n in part], [kind], axis=0))
    kept = [i for i in g.input if i.name not in ins]
    del g.input[:]
    g.input.extend(kept + [helper.make_tensor_value_info(kind, onnx.TensorProto.FLOAT, [n_layer, "past", dim]) for kind in ("past_k", "past_v")])
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(kind, onnx.TensorProto.FLOAT, [n_layer, "rows", dim]) for kind in ("k", "v")])
    old_path = src.with_name("stacked.onnx")
    onnx.save(model, str(old_path))  # the weights stay in the source graph's .data file beside it
    old = PrefillEngine(old_path, threads=1)
    assert new.per_layer and new.per_layer_past and not old.per_layer and not old.per_layer_past
    rows = np.random.default_rng(3).standard_normal((9, new.hidden_size)).astype(np.float32) * 0.05
    k, v = new.run(rows, 0)
    for engine in (new, old):
        k_old, v_old = engine.run(rows, 0)
        assert np.array_equal(k_old, k) and np.array_equal(v_old, v)
        k1, v1 = engine.run(rows[:4], 0)
        k2, v2 = engine.run(rows[4:], 4, k1, v1)
        assert_close(np.concatenate([k1, k2], 1), k, atol=1e-6, what="keys in two parts")
        k_out, v_out = np.zeros_like(k), np.zeros_like(v)
        engine.write_prompt(rows, list(k_out), list(v_out), piece=4)
        assert_close(k_out, k, atol=1e-6, what="keys in pieces of 4")
        assert_close(v_out, v, atol=1e-6, what="values in pieces of 4")


def test_a_long_prompt_runs_in_pieces_that_read_the_cells_in_place(ggufs, tmp_path: Path) -> None:
    """Through the decoder, a prompt longer than one piece is written piece by piece into the
    buffer llama.cpp reads, each piece attending over the earlier pieces' cells there: the same
    cells as one run, and generation as through llama.cpp's own prompt pass."""
    from mdl_edge.export.convert.onnx_prefill import export_prefill_onnx
    from mdl_edge.runtime import prefill
    from mdl_edge.runtime.decoder import LlamaDecoder
    from mdl_edge.runtime.kv_state import SequenceBlob
    from mdl_edge.runtime.prefill import PrefillEngine
    from mdl_edge.runtime.prompt import Segment

    engine = PrefillEngine(export_prefill_onnx(ggufs["qwen3"], tmp_path / "f16.onnx", kv_dtype="float16"), threads=1)
    rows = np.random.default_rng(5).standard_normal((23, engine.hidden_size)).astype(np.float32) * 0.05
    k, v = engine.run(rows, 0)
    blob = SequenceBlob(np.arange(23, dtype=np.int32), engine.n_layer, engine.kv_dim, np.float16, v_trans=False)
    ks, vs = [blob.k(i) for i in range(engine.n_layer)], [blob.v(i) for i in range(engine.n_layer)]
    runs: list[tuple[int, int]] = []
    run_into = engine.run_into
    engine.run_into = lambda rows, start, *rest: (runs.append((start, rows.shape[0])), run_into(rows, start, *rest))[1]  # type: ignore[method-assign]
    engine.write_prompt(rows, ks, vs, piece=8)
    assert runs == [(0, 8), (8, 8), (16, 7)]
    assert rel_max_error(np.stack(ks).astype(np.float32), k.astype(np.float32)) <= 2e-3
    assert rel_max_error(np.stack(vs).astype(np.float32), v.astype(np.float32)) <= 2e-3
    runs.clear()
    prefill.PIECE_ROWS, piece_rows = 8, prefill.PIECE_ROWS
    try:
        prompt = [Segment(tokens=TOKENS[:12]), Segment(embeddings=rows[:15] * 0.4), Segment(tokens=TOKENS[12:22])]
        results = []
        for eng in (None, engine):
            with LlamaDecoder(ggufs["qwen3"], n_ctx=256, prefill=eng) as dec:
                results.append((dec.generate(prompt, max_new_tokens=8).result().token_ids, dec.logits()))
    finally:
        prefill.PIECE_ROWS = piece_rows
    assert [s for s, _ in runs] == [0, 8, 16, 24, 32] and sum(n for _, n in runs) == 36
    assert results[1][0] == results[0][0]
    assert rel_max_error(results[1][1], results[0][1]) <= 2e-3, rel_max_error(results[1][1], results[0][1])


def test_bundle_prompt_engine(bundle: Path, tmp_path: Path) -> None:
    """A bundle with a quantized decoder carries an int8 prompt engine with its measured drift; the
    default uses it for the quantized decoder only, outside parity mode, on a CPU with int8 dot
    products; a foreign graph is refused."""
    from mdl_edge.runtime.bundle import Bundle
    from mdl_edge.runtime.prompt import Segment
    from mdl_edge.runtime.errors import CheckpointError, OptionError
    from mdl_edge.runtime.manifest import MANIFEST
    from mdl_edge.runtime.options import DecoderOptions

    b = Bundle.open(bundle)
    part = b.manifest.prefill
    assert part is not None and part.file == "prefill.int8.onnx" and part.source == "f32"
    drift = part.drift_vs_fp32
    assert drift["positions"] == 48 and drift["key_cosine_mean"] >= 0.999 and drift["value_cosine_min"] >= 0.99, drift
    assert b.load_prefill(DecoderOptions(prefill="onnx"), {}, threads=1).kv_dtype == np.float16  # the f16 cache's type
    from mdl_edge.runtime.cpu import cpu_info

    expect = {DecoderOptions(variant="Q8_0"): cpu_info().fast_int8, DecoderOptions(variant="f32"): False, DecoderOptions(variant="Q8_0", f32_kv=True): False,
              DecoderOptions(variant="Q8_0", one_batch=False): False, DecoderOptions(variant="Q8_0", prefill="llama"): False,
              DecoderOptions(variant="f32", prefill="onnx"): True}
    for opts, used in expect.items():
        _, dec = b.load_decoder(opts, threads=1)
        with dec:
            assert (dec.prefill is not None) == used, opts
    # int8 prompt + Q8_0 decoder against llama.cpp's Q8_0 prompt pass: next-token logits close
    logits = []
    for how in ("onnx", "llama"):
        _, dec = b.load_decoder(DecoderOptions(variant="Q8_0", prefill=how), threads=1)
        with dec:
            dec.evaluate([Segment(tokens=TOKENS)])
            logits.append(dec.logits())
    assert rel_max_error(logits[0], logits[1]) <= 0.05, rel_max_error(logits[0], logits[1])
    assert int(logits[0].argmax()) == int(logits[1].argmax())

    bare = tmp_path / "bare"
    shutil.copytree(bundle, bare)
    manifest = json.loads((bare / MANIFEST).read_text())
    del manifest["prefill"]
    (bare / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OptionError, match="has no prompt engine"):
        Bundle.open(bare).load_decoder(DecoderOptions(prefill="onnx"))
    with pytest.raises(OptionError, match="prefill"):
        DecoderOptions(prefill="gpu")
    # a prompt graph made from another checkpoint
    from mdl_edge.runtime.onnx_meta import read_file_metadata, write_metadata

    foreign = tmp_path / "foreign"
    shutil.copytree(bundle, foreign)
    meta = read_file_metadata(foreign / part.file)
    write_metadata(foreign / part.file, {**meta, "source_hash": "0" * 16})
    with pytest.raises(CheckpointError, match="made from another checkpoint"):
        Bundle.open(foreign).load_decoder(DecoderOptions(variant="Q8_0"))


def test_bundle_repacks_weights_where_the_prompt_engine_runs(bundle: Path, caplog) -> None:
    """Unset, ``extra_bufts`` follows the prompt engine (repacking speeds decoding but slows
    llama.cpp's own prompt pass) on builds that repack safely; set, it wins. Repacked weights are
    read, not mapped, so no mapped copy of them stays resident."""
    import logging

    from mdl_edge.runtime.bundle import Bundle
    from mdl_edge.runtime.decoder import extra_bufts_safe
    from mdl_edge.runtime.options import DecoderOptions

    b, safe = Bundle.open(bundle), extra_bufts_safe()
    cases = [DecoderOptions(variant="Q8_0"), DecoderOptions(variant="Q8_0", prefill="llama"), DecoderOptions(variant="f32"),
             DecoderOptions(variant="Q8_0", extra_bufts=False)] + ([DecoderOptions(variant="f32", extra_bufts=True)] if safe else [])
    for opts in cases:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="mdl_edge.llama_cpp"):
            _, dec = b.load_decoder(opts, threads=1)
        with dec:
            want = opts.extra_bufts if opts.extra_bufts is not None else (dec.prefill is not None and safe)
            assert dec.extra_bufts is want, (opts, dec.extra_bufts)
            mapped = "CPU_Mapped model buffer" in caplog.text
            assert mapped is not want, f"{opts}: repacked {want} but the file {'mapped' if mapped else 'read'}"


def test_export_leaves_the_engine_out_where_memory_is_short(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A machine without the memory to export the prompt graph still gets a bundle, without the
    engine, and is told so; a bundle with full-precision decoders only has none either."""
    from mdl_edge.export.convert import onnx_prefill
    from mdl_edge.export.convert.bundle import export_bundle
    from mdl_edge.runtime.bundle import Bundle

    said: list[str] = []
    monkeypatch.setattr(onnx_prefill, "fits_in_memory", lambda path: False)
    out = export_bundle(tiny_dir, tmp_path / "short", encoders=["fp32"], decoders=["Q8_0"], progress=said.append)
    assert Bundle.open(out).manifest.prefill is None and not (out / "prefill.int8.onnx").exists()
    assert any("prompt engine skipped" in line for line in said), said
    monkeypatch.undo()
    plain = export_bundle(tiny_dir, tmp_path / "plain", encoders=["fp32"], decoders=["f16"], progress=lambda *_: None)
    assert Bundle.open(plain).manifest.prefill is None


def test_unknown_state_layout_keeps_llama_cpp_prompt_pass(ggufs, graphs, monkeypatch, caplog) -> None:
    """A llama.cpp that saves its KV cells in another layout is never fed the engine's: the decoder
    warns and evaluates prompts itself."""
    import logging

    from mdl_edge.runtime import kv_state
    from mdl_edge.runtime.decoder import LlamaDecoder
    from mdl_edge.runtime.prompt import Segment
    from mdl_edge.runtime.prefill import PrefillEngine

    monkeypatch.setattr(kv_state, "MAGIC", 0x12345678)
    with caplog.at_level(logging.WARNING, logger="mdl_edge"):
        dec = LlamaDecoder(ggufs["qwen3"], n_ctx=256, prefill=PrefillEngine(graphs["qwen3"], threads=1))
    with dec:
        assert dec.prefill is None and "prompt engine off" in caplog.text
        assert dec.evaluate([Segment(tokens=TOKENS)]) == len(TOKENS)


def test_prompt_engine_in_a_context_of_several_sequences(ggufs, graphs) -> None:
    """After the context was resized for batched decoding (several sequences, one unified cache),
    a prompt through the engine lands in sequence 0 and generates as in a fresh context."""
    from mdl_edge.runtime.decoder import LlamaDecoder
    from mdl_edge.runtime.prompt import Segment
    from mdl_edge.runtime.prefill import PrefillEngine

    engine = PrefillEngine(graphs["qwen3"], threads=1)
    ran: list[int] = []
    run = engine.run
    engine.run = lambda rows, *rest: (ran.append(rows.shape[0]), run(rows, *rest))[1]  # type: ignore[method-assign]
    prompt = [Segment(tokens=TOKENS)]
    with LlamaDecoder(ggufs["qwen3"], n_ctx=256, f32_kv=True, flash_attn=False, prefill=engine) as dec:
        fresh = dec.generate(prompt, max_new_tokens=8).result().token_ids
        dec.resize(512, 4)
        rows = dec.token_rows(TOKENS[:6])
        dec.decode_rows(rows, list(range(6)), [2] * 6, [False] * 5 + [True])  # another sequence's cells in the cache
        again = dec.generate(prompt, max_new_tokens=8).result()
    assert again.token_ids == fresh and again.n_evaluated == len(TOKENS)
    assert ran == [len(TOKENS) - 1] * 2  # both prompts through the engine, all positions but the last
