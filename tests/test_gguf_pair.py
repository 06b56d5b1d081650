"""The official GGUF pair as an export input: a text GGUF without mdl-edge's keys and an mmproj
with the fork's keys and names (both projector types; F32, F16, BF16, Q8_0; fused or split qkv).

The pair is made from a synthetic checkpoint, so the bundle exported from it is compared with the
PyTorch reference of that checkpoint: embeddings, and greedy tokens through `mdl-edge parity`.
The tokenizer built from the GGUF's ``tokenizer.*`` keys is compared with llama.cpp's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mdl_edge.runtime import constants as C
from mdl_edge.runtime.errors import CheckpointError

from conftest import chirp, rel_max_error

CORPUS = [
    "Caption the audio.",
    "Transcribe the speech into text <|en|>",
    "<|im_start|>user\nWhat sound is heard?<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n<|im_start|>assistant\n",
    "A dog barks twice, then a car passes by in the rain... 12345 6.78",
    "  leading spaces\tand tabs\n\n\nnewlines   ",
    "Unicode: café naïve 北京 😀 — “quotes” and 'apostrophes' it's we're",
    "MIXED case WORDS, punctuation!?;: (brackets) [more] {braces}",
]


def foreign_text_gguf(src: Path, dst: Path) -> Path:
    """``src`` (an mdl-edge decoder GGUF) without mdl-edge's keys: a text GGUF as another
    converter writes it."""
    from mdl_edge.export.convert.gguf_pair import rewrite_gguf

    return rewrite_gguf(src, dst, drop=lambda key: key.startswith("mdl_edge."))


def split_qkv(src: Path, dst: Path) -> Path:
    """An mmproj with ``attn_q/attn_k/attn_v`` instead of the fused ``attn_qkv``."""
    from mdl_edge.export.convert.gguf_pair import rewrite_gguf

    def split(t):
        if ".attn_qkv." not in t.name:
            return [(t.name, t.data, t.tensor_type)]
        # rows stay whole in every type, so the raw data splits along its first axis
        return [(t.name.replace("attn_qkv", f"attn_{part}"), np.ascontiguousarray(piece), t.tensor_type)
                for part, piece in zip("qkv", np.split(np.asarray(t.data), 3, axis=0))]

    return rewrite_gguf(src, dst, tensors=split)


def make_pair(ckpt: Path, folder: Path, *, mmproj_dtype: str = "f32", text_type: str = "f32", split: bool = False) -> Path:
    from mdl_edge.export.convert.checkpoint import Checkpoint
    from mdl_edge.export.convert.gguf_decoder import export_decoder_gguf
    from mdl_edge.export.convert.mmproj import write_mmproj
    from mdl_edge.export.reference.model import load_audio_tower

    folder.mkdir(parents=True)
    ours = export_decoder_gguf(ckpt, folder / "ours.gguf", out_type=text_type)
    foreign_text_gguf(ours, folder / f"model-{text_type}.gguf")
    ours.unlink()
    enc, proj = load_audio_tower(Checkpoint(ckpt))
    mm = write_mmproj(enc, proj, folder / "mmproj.tmp", dtype=mmproj_dtype)
    if split:
        split_qkv(mm, folder / f"mmproj-{mmproj_dtype}.gguf")
        mm.unlink()
    else:
        mm.rename(folder / f"mmproj-{mmproj_dtype}.gguf")
    return folder


@pytest.mark.parametrize("which", ["tiny_tok", "tiny"])
def test_pair_bundle_matches_the_reference(which: str, request, tmp_path: Path, capsys) -> None:
    """Both projector types, f32 files: embeddings to round-off, greedy tokens equal (parity)."""
    from mdl_edge.runtime.cli import main
    from mdl_edge.runtime.gguf_meta import read_gguf_metadata
    from mdl_edge.runtime.pipeline import AudioLM

    ckpt, model = request.getfixturevalue(f"{which}_dir"), request.getfixturevalue(f"{which}_model")
    pair = make_pair(ckpt, tmp_path / "pair")
    assert "mdl_edge.source_hash" not in read_gguf_metadata(pair / "model-f32.gguf")
    out = tmp_path / "bundle"
    assert main(["export", str(pair), str(out), "--encoder", "fp32,int8", "--decoder", "f32,Q8_0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["decoder"]["variants"]) == {"f32", "Q8_0"}
    assert manifest["prefill"]["source"] == "f32"  # the prompt engine, from the pair's text model
    for n in (3200, 161760, 400000):
        wave = chirp(n / C.SAMPLE_RATE, 2)[:n]
        with AudioLM(out, encoder="fp32", decoder="f32") as lm:
            emb, _ = lm.embed(wave, sample_rate=C.SAMPLE_RATE)
        want = model.encode_audio([wave])[0].numpy()
        assert emb.shape == want.shape
        err = rel_max_error(emb, want)
        assert err <= 1e-5, f"{which}, {n} samples: embeddings from the pair vs reference rel. error {err:.2e}"
    capsys.readouterr()
    assert main(["parity", str(ckpt), "--bundle", str(out), "--json", "--max-new-tokens", "10"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["end_to_end"]["fp32 + f32"]["exact_match_rate"] == 1.0, report["end_to_end"]
    assert report["decoder"]["f32"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("dtype,split,tol", [("f16", False, 2e-3), ("bf16", True, 1e-2), ("q8_0", False, 1e-2)])
def test_pair_tensor_types_and_split_qkv(tiny_tok_dir: Path, tiny_tok_model, tmp_path: Path, dtype: str, split: bool, tol: float) -> None:
    """Half-precision or quantized mmproj tensors are dequantized with gguf: F16 stays within the
    goal's 2e-3 of the fp32 reference (relative to the largest value); BF16 (8-bit mantissa) and
    Q8_0 weights cost more by their own rounding (measured 3e-3 for BF16)."""
    from mdl_edge.export.convert.bundle import export_bundle
    from mdl_edge.runtime.pipeline import AudioLM

    pair = make_pair(tiny_tok_dir, tmp_path / "pair", mmproj_dtype=dtype, split=split)
    out = export_bundle(pair, tmp_path / "bundle", encoders=["fp32"], decoders=["f32"], progress=lambda *_: None)
    wave = chirp(12.0, 4)
    with AudioLM(out, encoder="fp32", decoder="f32") as lm:
        emb, _ = lm.embed(wave, sample_rate=C.SAMPLE_RATE)
    err = rel_max_error(emb, tiny_tok_model.encode_audio([wave])[0].numpy())
    assert err <= tol, f"{dtype} mmproj: rel. error {err:.2e}"


def test_quantized_text_gguf_is_used_as_it_is(tiny_tok_dir: Path, tmp_path: Path) -> None:
    """A Q8_0 text GGUF becomes the decoder variant 'Q8_0' with its tensors byte for byte, and
    Q4_K_M is requantized from it by llama.cpp."""
    import gguf

    from mdl_edge.export.convert.bundle import export_bundle
    from mdl_edge.quantize.decoder import quantize_decoder

    pair = make_pair(tiny_tok_dir, tmp_path / "pair")
    q8 = quantize_decoder(pair / "model-f32.gguf", pair / "model-q8.gguf", "Q8_0")
    (pair / "model-f32.gguf").unlink()
    out = export_bundle(pair, tmp_path / "bundle", encoders=["fp32"], decoders=["Q8_0", "Q4_K_M"], progress=lambda *_: None)
    src, got = gguf.GGUFReader(str(q8)), gguf.GGUFReader(str(out / "decoder.Q8_0.gguf"))
    assert [t.name for t in src.tensors] == [t.name for t in got.tensors]
    assert all(np.array_equal(a.data, b.data) and a.tensor_type == b.tensor_type for a, b in zip(src.tensors, got.tensors))
    assert (out / "decoder.Q4_K_M.gguf").is_file()
    # the prompt engine comes from the most precise GGUF there is, the quantized text model itself
    assert json.loads((out / "manifest.json").read_text())["prefill"]["source"] == "Q8_0"


def test_tokenizer_from_gguf_matches_llama_cpp(tiny_tok_dir: Path, tmp_path: Path) -> None:
    from mdl_edge.export.convert.gguf_pair import gguf_tokenizer
    from mdl_edge.runtime.decoder import LlamaDecoder
    from mdl_edge.runtime.prompt import PromptFormat

    pair = make_pair(tiny_tok_dir, tmp_path / "pair")
    tok, template, stop = gguf_tokenizer(pair / "model-f32.gguf")
    original = PromptFormat.from_dir(tiny_tok_dir)
    assert template == original.chat_template and original.special.im_end in stop
    dec = LlamaDecoder(pair / "model-f32.gguf", n_ctx=256)
    try:
        for text in CORPUS:
            ours = tok.encode(text, add_special_tokens=False).ids
            theirs = dec.tokenize(text, special=True)
            assert ours == theirs, f"{text!r}: tokenizers {ours} vs llama.cpp {theirs}"
            assert ours == original.tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        dec.close()


def test_pairs_that_do_not_belong_together_are_refused(tiny_tok_dir: Path, tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    import gguf

    from mdl_edge.export.convert.bundle import export_bundle
    from mdl_edge.export.convert.checkpoint import Checkpoint
    from mdl_edge.export.convert.mmproj import write_mmproj
    from mdl_edge.export.reference.encoder import AudioProjector
    from mdl_edge.export.reference.model import load_audio_tower

    def export(folder: Path) -> None:
        export_bundle(folder, tmp_path / f"out-{folder.name}", encoders=["fp32"], decoders=["f32"], progress=lambda *_: None)

    # a projector whose width is not the text model's
    pair = make_pair(tiny_tok_dir, tmp_path / "width")
    enc, _ = load_audio_tower(Checkpoint(tiny_tok_dir))
    (pair / "mmproj-f32.gguf").unlink()
    write_mmproj(enc, AudioProjector(64, 48), pair / "mmproj-f32.gguf")
    with pytest.raises(CheckpointError, match=r"mmproj-f32.gguf: clip.audio.projection_dim is 48, but model-f32.gguf has qwen3.embedding_length 64"):
        export(pair)
    # a vision-only mmproj
    pair = make_pair(tiny_tok_dir, tmp_path / "vision")
    (pair / "mmproj-f32.gguf").unlink()
    w = gguf.GGUFWriter(str(pair / "mmproj-vision.gguf"), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_audio_encoder", False)
    w.add_string("clip.projector_type", "qwen2vl_merger")
    w.add_tensor("v.patch_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"mmproj-vision.gguf: clip.has_audio_encoder is False: this mmproj has no audio encoder"):
        export(pair)
    # two text GGUFs
    pair = make_pair(tiny_tok_dir, tmp_path / "two")
    (pair / "other.gguf").write_bytes((pair / "model-f32.gguf").read_bytes())
    with pytest.raises(CheckpointError, match="expected one text GGUF and one mmproj GGUF, found 2 text"):
        export(pair)
    # a text model without the audio tokens (a plain Qwen GGUF): its tokenizer is refused
    pair = make_pair(tiny_tok_dir, tmp_path / "no-audio")
    reader = gguf.GGUFReader(str(pair / "model-f32.gguf"))
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    del reader
    tokens = ["<|notaudio|>" if t == "<|AUDIO|>" else t for t in tokens]
    from mdl_edge.export.convert.gguf_pair import rewrite_gguf

    rewrite_gguf(pair / "model-f32.gguf", pair / "edited.gguf", extra={"tokenizer.ggml.tokens": (tokens, gguf.GGUFValueType.ARRAY)})
    (pair / "edited.gguf").replace(pair / "model-f32.gguf")
    with pytest.raises(CheckpointError, match=r"model-f32.gguf: the vocabulary has no <\|AUDIO\|> token"):
        export(pair)


def test_pair_in_the_hugging_face_cache_layout(tiny_tok_dir: Path, tmp_path: Path) -> None:
    """The repository folder of the cache (refs/main -> snapshots/<rev>, files as symlinks into
    blobs/) and the snapshot folder itself both export, to the same decoder bytes."""
    import hashlib
    import shutil

    from mdl_edge.export.convert.bundle import export_bundle

    pair = make_pair(tiny_tok_dir, tmp_path / "pair")
    root = tmp_path / "hub" / "models--mispeech--midashenglm-0.6b-gguf"
    snap = root / "snapshots" / "0123abcd"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123abcd")
    snap.mkdir(parents=True)
    for f in pair.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, root / "blobs" / digest)
        (snap / f.name).symlink_to(f"../../blobs/{digest}")
    a = export_bundle(root, tmp_path / "a", encoders=["fp32"], decoders=["f32"], progress=lambda *_: None)
    b = export_bundle(snap, tmp_path / "b", encoders=["fp32"], decoders=["f32"], progress=lambda *_: None)
    assert (a / "decoder.f32.gguf").read_bytes() == (b / "decoder.f32.gguf").read_bytes()
    assert json.loads((a / "manifest.json").read_text())["source_hash"] == json.loads((b / "manifest.json").read_text())["source_hash"]
