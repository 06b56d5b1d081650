"""Bundles as users meet them: malformed manifests and templates, the Hugging Face cache layout,
file modes, the formats' single homes, options validated where built, and streams that stop."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import soundfile as sf

from mdl_edge.runtime import constants as C
from mdl_edge.runtime.cli import main
from mdl_edge.runtime.errors import CheckpointError, MdlEdgeError, OptionError
from mdl_edge.runtime.options import GenerationOptions as G
from mdl_edge.runtime.options import SamplingOptions, resolve_threads
from mdl_edge.runtime.pipeline import AudioLM
from mdl_edge.runtime.prompt import CAPTION_PROMPT
from mdl_edge.runtime.options import DecoderOptions, EncoderOptions


def _clip(seconds: float, seed: int = 0) -> np.ndarray:
    n = int(seconds * C.SAMPLE_RATE)
    t = np.arange(n) / C.SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + np.random.default_rng(seed).standard_normal(n) * 0.05).astype(np.float32)


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    sf.write(path, _clip(2.0), C.SAMPLE_RATE, subtype="PCM_16")
    return path


def _copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst


def _edit_manifest(d: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    m = json.loads((d / "manifest.json").read_text())
    out = edit(m)
    (d / "manifest.json").write_text(json.dumps(m if out is None else out))


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mdl-edge: error: "), f"not one error line: {err!r}"
    assert "Traceback" not in err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    return err


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.pop(key) and None


MALFORMED = [
    ("list", lambda m: [m], "the manifest must be a JSON object, got a list"),
    ("file-not-a-string", _set("encoder.variants.int8.file", 5), "field 'encoder.variants.int8.file' must be a file name"),
    ("missing-source-hash", _delete("source_hash"), "field 'source_hash' is missing"),
    ("variants-a-list", _set("decoder.variants", []), "field 'decoder.variants' must be a JSON object, got a list"),
    ("hidden-size-a-string", _set("decoder.hidden_size", "64"), "field 'decoder.hidden_size' must be a whole number"),
    ("stop-not-ids", _set("tokens.stop", [1, "x"]), "field 'tokens.stop' must be a list of token ids"),
    ("default-unknown", _set("encoder.default", "int4"), "field 'encoder.default' is 'int4', which is not one of its variants"),
    ("dotdot", _set("decoder.variants.Q8_0.file", "../decoder.Q8_0.gguf"), "points outside the bundle folder"),
    ("absolute", _set("decoder.variants.Q8_0.file", "/etc/passwd"), "an absolute path"),
    ("token-mismatch", _set("tokens.audio", 7), "field 'tokens.audio' is 7 but the bundle's tokenizer.json has"),
    ("old-version", _set("format_version", 0), "bundle format version 0"),
]


@pytest.mark.parametrize("name,edit,match", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_manifest_is_one_line_and_exit_1(bundle, wav, tmp_path, capsys, name, edit, match) -> None:
    d = _copy(bundle, tmp_path / "b")
    _edit_manifest(d, edit)
    assert main(["caption", str(wav), "--model", str(d)]) == 1
    _one_line_error(capsys, str(d / "manifest.json"), match)


def test_deeply_nested_manifest(bundle, wav, tmp_path, capsys) -> None:
    d = _copy(bundle, tmp_path / "b")
    (d / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["caption", str(wav), "--model", str(d)]) == 1
    _one_line_error(capsys, "manifest.json: not readable as JSON")


TEMPLATES = [
    ("syntax", "{% for m in messages %}{{ m['role'] }", "the chat template does not compile"),
    ("sandbox-range", "{% for i in range(10 ** 9) %}{% endfor %}{{ messages }}", "failed to render: OverflowError"),
    ("raise-exception", "{{ raise_exception('only text conversations are supported') }}", "only text conversations are supported"),
    ("unsafe", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "tried an unsafe operation"),
    ("drops-audio", "{% for m in messages %}{{ m['role'] }}{% endfor %}", "0 audio placeholder(s) but 1 audio clip(s)"),
]


@pytest.mark.parametrize("name,template,match", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_broken_chat_template_is_refused_at_open(bundle, wav, tmp_path, capsys, name, template, match) -> None:
    d = _copy(bundle, tmp_path / "b")
    (d / "chat_template.jinja").write_text(template)
    assert main(["caption", str(wav), "--model", str(d)]) == 1
    _one_line_error(capsys, str(d), match)


@pytest.mark.parametrize("name,content,match", [
    ("tokenizer-config-list", "[1, 2]", "tokenizer_config.json: must hold a JSON object, got a list"),
    ("generation-config-garbage", "{nope", "generation_config.json: not readable as JSON"),
])
def test_broken_side_files(bundle, wav, tmp_path, capsys, name, content, match) -> None:
    d = _copy(bundle, tmp_path / "b")
    target = "tokenizer_config.json" if name.startswith("tokenizer") else "generation_config.json"
    if target == "tokenizer_config.json":
        (d / "chat_template.jinja").unlink()  # so that the template is looked up there
    (d / target).write_text(content)
    assert main(["caption", str(wav), "--model", str(d)]) == 1
    _one_line_error(capsys, match)


def test_corrupt_tokenizer_json(bundle, wav, tmp_path, capsys) -> None:
    d = _copy(bundle, tmp_path / "b")
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    assert main(["caption", str(wav), "--model", str(d)]) == 1
    _one_line_error(capsys, "tokenizer.json: not a valid tokenizers file")


def test_hugging_face_cache_layout_captions(bundle, tmp_path) -> None:
    """huggingface_hub keeps a snapshot's files as symlinks into ../../blobs/<sha256>."""
    root = tmp_path / "hub" / "models--someone--midashenglm-bundle"
    snap = root / "snapshots" / "0123abcd"
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in Path(bundle).iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, root / "blobs" / digest)
        (snap / f.name).symlink_to(f"../../blobs/{digest}")
    wave = _clip(3.0)
    with AudioLM(snap, encoder="fp32", decoder="f32") as lm:
        got = lm.caption(wave, G(max_new_tokens=6), sample_rate=C.SAMPLE_RATE)
    with AudioLM(bundle, encoder="fp32", decoder="f32") as lm:
        want = lm.caption(wave, G(max_new_tokens=6), sample_rate=C.SAMPLE_RATE)
    assert got.token_ids == want.token_ids and got.n_audio_tokens == 15


def test_bundle_files_have_ordinary_modes(bundle) -> None:
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in Path(bundle).iterdir()}
    assert all(m == 0o666 & ~umask for m in modes.values()), modes


# -- formats ----------------------------------------------------------------------------------
def write_small_gguf(path: Path, add_keys: Callable[[Any], object]) -> None:
    """A GGUF file written by gguf-py (llama.cpp's own writer): the keys ``add_keys`` adds and one
    small tensor ``x``."""
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen3")
    add_keys(w)
    w.add_tensor("x", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_reader_value_types_round_trip(tmp_path) -> None:
    """Every GGUF value type the writer (gguf-py) emits reads back through our header reader."""
    from mdl_edge.runtime.gguf_meta import read_gguf_metadata

    path = tmp_path / "t.gguf"
    values = {"u8": ("add_uint8", 200), "i8": ("add_int8", -100), "u16": ("add_uint16", 60000), "i16": ("add_int16", -30000),
              "u32": ("add_uint32", 4_000_000_000), "i32": ("add_int32", -2_000_000_000), "f32": ("add_float32", 0.5),
              "bool": ("add_bool", True), "u64": ("add_uint64", 2**40), "i64": ("add_int64", -(2**40)), "f64": ("add_float64", 0.25),
              "str": ("add_string", "héllo"), "arr": ("add_array", [1, 2, 3]), "long": ("add_array", list(range(40)))}
    write_small_gguf(path, lambda w: [getattr(w, add)(f"t.{key}", v) for key, (add, v) in values.items()])
    meta = read_gguf_metadata(path)
    for key, (_, v) in values.items():
        assert meta[f"t.{key}"] == (len(v) if key == "long" else v), key
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated GGUF"):
        read_gguf_metadata(path)


def test_gguf_reader_steps_over_long_arrays(tmp_path) -> None:
    """A vocabulary-sized string array is stepped over (its length returned), the keys after it
    still read; a file cut inside it, or a string length past any sane size, is refused."""
    import struct

    from mdl_edge.runtime.gguf_meta import read_gguf_header

    path = tmp_path / "v.gguf"

    def keys(w: Any) -> None:  # a gguf.GGUFWriter
        w.add_array("tokenizer.ggml.tokens", [f"tok{i}" * (1 + i % 3) for i in range(5000)])
        w.add_array("t.floats", [0.5] * 300)
        w.add_array("t.short", ["a", "b"])
        w.add_uint32("t.after", 7)

    write_small_gguf(path, keys)
    header = read_gguf_header(path)
    assert header.meta["tokenizer.ggml.tokens"] == 5000 and header.meta["t.floats"] == 300
    assert header.meta["t.short"] == ["a", "b"] and header.meta["t.after"] == 7
    assert header.tensors["x"].shape == (8, 4)
    data = path.read_bytes()
    inside = data.index(b"tok2500")
    (tmp_path / "cut.gguf").write_bytes(data[:inside])
    with pytest.raises(CheckpointError, match="truncated GGUF"):
        read_gguf_header(tmp_path / "cut.gguf")
    at = inside - 8  # the u64 length of that string
    (tmp_path / "huge.gguf").write_bytes(data[:at] + struct.pack("<Q", 1 << 40) + data[at + 8 :])
    with pytest.raises(CheckpointError, match="corrupt GGUF"):
        read_gguf_header(tmp_path / "huge.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf_header(tmp_path / "empty.gguf")


def test_exported_gguf_carries_the_keys_the_bundle_checks(bundle) -> None:
    from mdl_edge.runtime import gguf_meta as Gm
    from mdl_edge.runtime.bundle import Bundle

    b = Bundle.open(bundle)
    for name, variant in b.manifest.decoder.variants.items():
        meta = Gm.read_gguf_metadata(b.file(variant.file))
        assert meta[Gm.KEY_SOURCE_HASH] == b.manifest.source_hash, name
        assert meta[Gm.KEY_AUDIO_TOKEN_ID] == b.manifest.tokens.audio
        assert meta[Gm.KEY_AUDIO_BOS_TOKEN_ID] == b.manifest.tokens.audio_bos
        assert meta[Gm.KEY_ENCODER_EMBED_DIM] == b.manifest.encoder.embed_dim
        assert meta[Gm.key_embedding_length(str(meta[Gm.KEY_ARCHITECTURE]))] == b.manifest.decoder.hidden_size


def test_onnx_metadata_round_trip(bundle, tmp_path) -> None:
    import onnxruntime as ort

    from mdl_edge.runtime.onnx_meta import PROJECTOR_FILE, read_file_metadata, read_metadata, write_metadata

    src = Path(bundle) / PROJECTOR_FILE
    for f in (src, src.with_name(src.name + ".data")):
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / PROJECTOR_FILE
    meta = {**read_file_metadata(path), "note": "ünïcode", "nested": {"a": [1, 2]}}
    write_metadata(path, meta)
    assert read_file_metadata(path) == meta
    assert read_metadata(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path) == meta


def test_manifest_writer_refuses_what_the_reader_refuses(bundle, tmp_path) -> None:
    import dataclasses

    from mdl_edge.runtime.manifest import Manifest, Variant

    m = Manifest.read(Path(bundle) / "manifest.json")
    assert Manifest.from_json(m.to_json()) == m
    bad = dataclasses.replace(m, decoder=dataclasses.replace(m.decoder, variants={"x": Variant("../escape.gguf")}, default="x"))
    with pytest.raises(CheckpointError, match="points outside the bundle folder"):
        bad.write(tmp_path / "manifest.json")
    assert not (tmp_path / "manifest.json").exists()


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make,option", [
    (lambda: G(max_new_tokens=0), "max_new_tokens"),
    (lambda: G(max_new_tokens=True), "max_new_tokens"),
    (lambda: G(stop_ids=(-1,)), "stop_ids"),
    (lambda: SamplingOptions(temperature=-0.1), "temperature"),
    (lambda: SamplingOptions(temperature=float("nan")), "temperature"),
    (lambda: SamplingOptions(top_k=2.5), "top_k"),
    (lambda: SamplingOptions(top_p=0), "top_p"),
    (lambda: resolve_threads(0), "threads"),
])
def test_options_validate_where_built(make, option) -> None:
    with pytest.raises(OptionError) as e:
        make()
    assert e.value.option == option


def test_options_are_frozen_and_keyword_only() -> None:
    opts = G(max_new_tokens=3, sampling=SamplingOptions(temperature=0.5, seed=2))
    with pytest.raises(Exception):
        opts.max_new_tokens = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        G(3)  # type: ignore[misc]
    assert resolve_threads(None) >= 1 and resolve_threads(3) == 3


@pytest.mark.parametrize("args,flag", [
    (["caption", "--max-new-tokens", "-3"], "argument --max-new-tokens: must be a whole number >= 1, got -3"),
    (["ask", "-q", ""], "argument --question: must be a non-empty question"),
    (["ask", "-q", "   "], "argument --question: must be a non-empty question"),
    (["transcribe", "--language", "english"], "argument --language: must be a short language code"),
    (["caption", "--threads", "0"], "argument --threads: must be a whole number >= 1"),
    (["caption", "--temperature", "-1"], "argument --temperature: invalid sampling option temperature=-1.0"),
])
def test_cli_usage_errors_name_the_option(bundle, wav, capsys, args, flag) -> None:
    """Refused with exit 2 before anything is loaded (the bundle path does not even exist)."""
    assert main([args[0], str(wav), "--model", "/nonexistent/bundle", *args[1:]]) == 2
    err = capsys.readouterr().err
    assert flag in err and "usage: mdl-edge" in err, err


def test_cli_load_option_errors_name_the_option(bundle, wav, capsys) -> None:
    """Load-time options are validated where their objects are built (before the model loads);
    a variant the bundle lacks is found when it opens. Each exits 2 naming the flag."""
    assert main(["caption", str(wav), "--model", str(bundle), "--n-ctx", "8"]) == 2
    assert "argument --n-ctx: must be a whole number >= 64 positions, got 8" in capsys.readouterr().err
    assert main(["caption", str(wav), "--model", str(bundle), "--decoder", "Q2_K"]) == 2
    assert "argument --decoder:" in capsys.readouterr().err
    assert main(["caption", str(wav), "--model", str(bundle), "--max-batch", "0"]) == 2
    assert "argument --max-batch: must be a whole number >= 1, got 0" in capsys.readouterr().err
    assert main(["caption", str(wav), "--model", str(bundle), "--provider", "tpu"]) == 2
    assert "argument --provider: must be one of cpu, cuda, got 'tpu'" in capsys.readouterr().err


def test_load_options_are_validated_where_built() -> None:
    from mdl_edge.runtime.errors import OptionError

    for build, match in ((lambda: DecoderOptions(n_ctx=8), "n_ctx"), (lambda: DecoderOptions(n_batch=0), "n_batch"),
                         (lambda: DecoderOptions(f32_kv="yes"), "f32_kv"), (lambda: EncoderOptions(max_batch=0), "max_batch"),
                         (lambda: EncoderOptions(provider="tpu"), "provider"), (lambda: EncoderOptions(variant=""), "encoder")):
        with pytest.raises(OptionError, match=match):
            build()
    with pytest.raises(TypeError):
        AudioLM("/nonexistent", n_ctx=1024)  # the knobs travel in option objects only


def test_knobs_reach_the_encoder_and_decoder(bundle, wav, capsys) -> None:
    with AudioLM(bundle, threads=1, encoder=EncoderOptions(max_batch=3), decoder=DecoderOptions(n_ctx=1024, n_batch=64, flash_attn=True)) as lm:
        assert lm.encoder.max_batch == 3 and lm.encoder.threads == 1
        assert lm.decoder.n_ctx == 1024 and lm.decoder.n_batch == 64 and lm.decoder.threads == 1 and not lm.decoder.auto_ctx
        res = lm.caption(wav, G(max_new_tokens=3))
    assert len(res.token_ids) <= 3
    assert main(["caption", str(wav), "--model", str(bundle), "--threads", "1", "--n-batch", "64", "--flash-attn",
                 "--max-batch", "2", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_audio_tokens"] == 10


# -- streams ----------------------------------------------------------------------------------
def test_breaking_out_of_a_stream_frees_the_decoder_at_once(bundle) -> None:
    wave = _clip(3.0)
    long = G(max_new_tokens=200, ignore_eos=True)
    with AudioLM(bundle, decoder="f32") as lm:
        n_prompt_segments = None
        for _piece in lm.stream(wave, CAPTION_PROMPT, long, sample_rate=C.SAMPLE_RATE):
            n_prompt_segments = len(lm.decoder._cached)
            break
        # no token was decoded after the consumer left (generation stopped within a token)
        assert len(lm.decoder._cached) == n_prompt_segments
        t = time.perf_counter()
        res = lm.caption(wave, G(max_new_tokens=4), sample_rate=C.SAMPLE_RATE)  # runs at once: no lock is held
        assert time.perf_counter() - t < 10 and res.n_audio_tokens == 15

        held = lm.stream(wave, CAPTION_PROMPT, long, sample_rate=C.SAMPLE_RATE)
        next(held)
        with pytest.raises(MdlEdgeError, match="unfinished stream holds the decoder"):
            lm.caption(wave, G(max_new_tokens=2), sample_rate=C.SAMPLE_RATE)
        # another thread waits for the stream, and goes on as soon as it is closed
        done: list[object] = []
        worker = threading.Thread(target=lambda: done.append(lm.caption(wave, G(max_new_tokens=2), sample_rate=C.SAMPLE_RATE)))
        worker.start()
        time.sleep(0.3)
        assert worker.is_alive() and not done
        held.close()
        worker.join(timeout=30)
        assert done and not worker.is_alive()
        with pytest.raises(MdlEdgeError, match="closed before it finished"):
            held.result()


def test_stream_result_carries_the_stop_reason(bundle) -> None:
    wave = _clip(3.0)
    with AudioLM(bundle, decoder="f32") as lm:
        with lm.stream(wave, CAPTION_PROMPT, G(max_new_tokens=5, ignore_eos=True), sample_rate=C.SAMPLE_RATE) as s:
            text = "".join(s)
            res = s.result()
        assert res.text == text and len(res.token_ids) == 5 and res.stop_reason == "max_new_tokens"
        stop = lm.caption(wave, G(max_new_tokens=5, stop_ids=(res.token_ids[0],)), sample_rate=C.SAMPLE_RATE)
        assert stop.token_ids == () and stop.stop_reason == "stop_token"


# -- audio in blocks -------------------------------------------------------------------------
def test_long_file_is_never_held_whole(bundle, tmp_path) -> None:
    """A 10-minute file: the pipeline decodes it block by block into the log-mel and projects
    each chunk as it is encoded, so numpy's peak stays well under the waveform's own size."""
    path = tmp_path / "long.wav"
    seconds = 600
    with sf.SoundFile(path, "w", C.SAMPLE_RATE, 1, subtype="PCM_16") as f:
        for k in range(seconds // 30):
            f.write(_clip(30.0, seed=k))
    wave_bytes = seconds * C.SAMPLE_RATE * 4
    with AudioLM(bundle, encoder="fp32", decoder="f32") as lm:
        tracemalloc.start()
        emb, n = lm.embed(path)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert n == seconds * C.SAMPLE_RATE and emb.shape[0] == C.n_audio_tokens(n)
        mel_bytes = C.N_MELS * C.n_frames(n) * 4
        assert peak < mel_bytes + wave_bytes // 4, f"peak {peak / 2**20:.1f} MiB (waveform {wave_bytes / 2**20:.1f} MiB, mel {mel_bytes / 2**20:.1f} MiB)"
        from mdl_edge.runtime.audio import load_audio

        whole = lm.encoder.embed(load_audio(path))
    assert np.abs(emb - whole).max() <= 1e-5 * np.abs(whole).max()


# -- packaging ----------------------------------------------------------------------------------
def test_top_level_import() -> None:
    import mdl_edge
    from mdl_edge import AudioLM as A
    from mdl_edge import GenerationOptions

    assert A is AudioLM and GenerationOptions is G and "AudioLM" in mdl_edge.__all__


def test_runtime_and_quantize_import_without_torch() -> None:
    """Every runtime and quantize module imports with torch and transformers made unimportable."""
    root = Path(__file__).resolve().parents[1]
    modules = [f"mdl_edge.runtime.{p.stem}" for p in sorted((root / "runtime").glob("*.py")) if p.stem != "__init__"]
    modules += [f"mdl_edge.quantize.{p.stem}" for p in sorted((root / "quantize").glob("*.py")) if p.stem != "__init__"]
    code = (
        "import sys, importlib, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "import mdl_edge; mdl_edge.AudioLM\n"
        "print(len(sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mdl_edge.runtime.pipeline" in modules and "mdl_edge.quantize.encoder" in modules
