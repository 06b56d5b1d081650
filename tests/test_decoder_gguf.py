"""GGUF export + llama.cpp decoding from audio embeddings against transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mdl_edge.export.convert.gguf_decoder import export_decoder_gguf
from mdl_edge.runtime import constants as C
from mdl_edge.runtime.decoder import LlamaDecoder
from mdl_edge.runtime.prompt import Segment, split_prompt
from mdl_edge.runtime.sampling import Utf8Pieces
from mdl_edge.runtime.gguf_meta import KEY_SOURCE_HASH, read_gguf_metadata
from mdl_edge.runtime.options import SamplingOptions
from mdl_edge.runtime.errors import CheckpointError, ConfigError
from mdl_edge.runtime.prompt import user_message


@pytest.fixture(scope="module")
def ggufs(tiny_dir, tiny_qwen2_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {
        "tiny": export_decoder_gguf(tiny_dir, out / "tiny.f32.gguf", out_type="f32"),
        "tiny_qwen2": export_decoder_gguf(tiny_qwen2_dir, out / "tiny_qwen2.f32.gguf", out_type="f32"),
    }


def _prompt(model, seconds: float = 2.0, text: str = "Caption the audio."):
    wave = (np.random.default_rng(11).standard_normal(int(seconds * C.SAMPLE_RATE)) * 0.1).astype(np.float32)
    (audio,) = model.encode_audio([wave])
    ids = model.prompt.encode(user_message(text), [audio.shape[0]])
    return ids, audio.numpy()


@pytest.mark.parametrize("which", ["tiny", "tiny_qwen2"])
def test_f32_gguf_matches_transformers(which: str, request, ggufs) -> None:
    model = request.getfixturevalue(f"{which}_model")
    ids, audio = _prompt(model)
    with torch.inference_mode():
        emb = model.embed_prompt(ids, [torch.from_numpy(audio)])
        tokens, _, _ = model.generate_from_embeds(emb, max_new_tokens=32, stop_ids=[])
        full = torch.cat([emb, model.decoder.get_input_embeddings()(torch.tensor(tokens))])
        ref_logits = model.decoder(inputs_embeds=full[None]).logits[0].numpy()
    with LlamaDecoder(ggufs[which], n_ctx=512, f32_kv=True, flash_attn=False) as dec:
        segs = split_prompt(ids, [audio], model.cfg.audio_token_id)
        dec.evaluate(segs)
        worst = 0.0
        n = len(ids)
        for k, tok in enumerate(tokens):
            got = dec.logits()
            worst = max(worst, float(np.abs(got - ref_logits[n - 1 + k, : got.size]).max()))
            dec.evaluate(segs + [_tok(t) for t in tokens[: k + 1]])
        assert worst <= 1e-4, f"{which}: max |logit diff| {worst:.2e} over {len(tokens)} teacher-forced positions"
        greedy = list(dec.generate(segs, max_new_tokens=32).result().token_ids)
    assert greedy == tokens, f"{which}: llama.cpp greedy {greedy[:8]}... vs reference {tokens[:8]}..."


def _tok(t: int) -> Segment:
    return Segment(tokens=(t,))


def test_tokenization_equals_tokenizers(tiny_model, ggufs) -> None:
    text = "<|im_start|>user\nA dog barks, 3 times! Ünïcödé 汉字 <|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n"
    want = tiny_model.prompt.tokenizer.encode(text, add_special_tokens=False).ids
    with LlamaDecoder(ggufs["tiny"], n_ctx=256) as dec:
        assert dec.tokenize(text) == want


def test_prefix_reuse_and_streaming(tiny_qwen2_model, ggufs) -> None:
    m = tiny_qwen2_model
    ids, audio = _prompt(m)
    segs = split_prompt(ids, [audio], m.cfg.audio_token_id)
    with LlamaDecoder(ggufs["tiny_qwen2"], n_ctx=512) as dec:
        fresh = list(dec.generate(segs, max_new_tokens=12).result().token_ids)
        # same audio, another question after it: only the changed tail is evaluated
        ids2 = m.prompt.encode(user_message("What sound is heard?", audio_first=True), [audio.shape[0]])
        segs2 = split_prompt(ids2, [audio], m.cfg.audio_token_id)
        first = list(dec.generate(segs2, max_new_tokens=12).result().token_ids)
        evaluated = dec.evaluate(segs2)
        assert evaluated < len(ids2) - audio.shape[0]  # the audio prefix was reused
        again = list(dec.generate(segs2, max_new_tokens=12).result().token_ids)
    with LlamaDecoder(ggufs["tiny_qwen2"], n_ctx=512) as dec2:
        assert list(dec2.generate(segs2, max_new_tokens=12).result().token_ids) == first == again
        assert list(dec2.generate(segs, max_new_tokens=12).result().token_ids) == fresh


def test_utf8_pieces_join_across_tokens() -> None:
    text = "aé汉😀z"
    data = text.encode()
    u = Utf8Pieces()
    out = "".join(u.push(data[i : i + 1]) for i in range(len(data))) + u.flush()
    assert out == text


def test_quantized_variants_drift(tiny_qwen2_model, ggufs, tmp_path) -> None:
    """KL divergence and top-1 agreement of f16 / k-quants vs f32 over a teacher-forced run.
    Random weights overstate quantization drift, and at 64-d most k-quant blocks fall back to
    other types, so the floors are loose; the numbers are printed."""
    from mdl_edge.quantize.decoder import quantize_decoder

    m = tiny_qwen2_model
    ids, audio = _prompt(m)
    segs = split_prompt(ids, [audio], m.cfg.audio_token_id)

    def run(path: Path) -> tuple[list[int], list[np.ndarray]]:
        with LlamaDecoder(path, n_ctx=512, f32_kv=True) as dec:
            toks = list(dec.generate(segs, max_new_tokens=16).result().token_ids)
            logits = []
            for k in range(len(toks) + 1):
                dec.evaluate(segs + [_tok(t) for t in toks[:k]])
                logits.append(dec.logits())
        return toks, logits

    ref_toks, ref_logits = run(ggufs["tiny_qwen2"])
    for variant in ("F16", "Q8_0", "Q4_K_M"):
        path = quantize_decoder(ggufs["tiny_qwen2"], tmp_path / f"{variant}.gguf", variant)
        with LlamaDecoder(path, n_ctx=512, f32_kv=True) as dec:
            kls, agree = [], []
            for k in range(len(ref_toks) + 1):
                dec.evaluate(segs + [_tok(t) for t in ref_toks[:k]])
                q, p = dec.logits(), ref_logits[k]
                lp, lq = p - np.logaddexp.reduce(p), q - np.logaddexp.reduce(q)
                kls.append(float((np.exp(lp) * (lp - lq)).sum()))
                agree.append(int(p.argmax() == q.argmax()))
        print(f"{variant}: KL mean {np.mean(kls):.2e}, top-1 agreement {np.mean(agree):.2f}")
        assert np.mean(kls) < {"F16": 1e-3, "Q8_0": 1e-2, "Q4_K_M": 0.2}[variant]
        assert np.mean(agree) >= {"F16": 0.95, "Q8_0": 0.8, "Q4_K_M": 0.5}[variant]
        assert read_gguf_metadata(path)[KEY_SOURCE_HASH] == read_gguf_metadata(ggufs["tiny_qwen2"])[KEY_SOURCE_HASH]


def test_bad_ggufs(ggufs, tmp_path, tiny_qwen2_model) -> None:
    data = ggufs["tiny"].read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated GGUF"):
        LlamaDecoder(trunc)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(CheckpointError, match="bad magic"):
        LlamaDecoder(junk)
    import gguf

    other = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'llama' is not a MiDashengLM decoder"):
        LlamaDecoder(other)
    ids, audio = _prompt(tiny_qwen2_model, seconds=70.0)  # 350 audio tokens
    with LlamaDecoder(ggufs["tiny_qwen2"], n_ctx=256) as dec:
        with pytest.raises(ConfigError, match=f"the prompt has {len(ids)} positions but the context holds {dec.n_ctx}"):
            dec.evaluate(split_prompt(ids, [audio], tiny_qwen2_model.cfg.audio_token_id))
    ids, audio = _prompt(tiny_qwen2_model)
    with LlamaDecoder(ggufs["tiny_qwen2"], n_ctx=256) as dec:
        with pytest.raises(ConfigError, match="audio embeddings are 32-d"):
            dec.evaluate(split_prompt(ids, [audio[:, :32]], tiny_qwen2_model.cfg.audio_token_id))


def test_streamed_text_concatenates_to_the_full_text(tiny_qwen2_model, ggufs) -> None:
    m = tiny_qwen2_model
    ids, audio = _prompt(m)
    segs = split_prompt(ids, [audio], m.cfg.audio_token_id)
    pieces: list[str] = []
    with LlamaDecoder(ggufs["tiny_qwen2"], n_ctx=512) as dec:
        stream = dec.generate(segs, max_new_tokens=24, stop_ids=m.prompt.stop_ids)
        pieces.extend(stream)
        res = stream.result()
        again = dec.generate(segs, max_new_tokens=24, stop_ids=m.prompt.stop_ids).result()
    assert "".join(pieces) == res.text == again.text == m.prompt.decode(res.token_ids)
    assert res.n_evaluated == len(ids) and again.n_evaluated == len(segs[-1])  # second run reused the prefix
    assert res.stop_reason in ("stop_token", "max_new_tokens")


def test_sampling_is_repeatable_with_a_seed(tiny_qwen2_model, ggufs) -> None:
    m = tiny_qwen2_model
    ids, audio = _prompt(m)
    segs = split_prompt(ids, [audio], m.cfg.audio_token_id)
    opts = SamplingOptions(temperature=1.5, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.1, seed=7)
    with LlamaDecoder(ggufs["tiny_qwen2"], n_ctx=512) as dec:
        a = list(dec.generate(segs, max_new_tokens=16, sampling=opts).result().token_ids)
        b = list(dec.generate(segs, max_new_tokens=16, sampling=opts).result().token_ids)
        greedy = list(dec.generate(segs, max_new_tokens=16).result().token_ids)
    assert a == b and a != greedy
    with pytest.raises(ConfigError, match="top_p"):
        SamplingOptions(top_p=0)


def test_repacked_weights_match_plain(tiny_qwen2_model, ggufs, tmp_path, caplog) -> None:
    """ggml's extra CPU buffer types (weights repacked for this CPU's SIMD; opt-in) change only
    the summation order: same greedy tokens, near-equal logits."""
    import logging

    import llama_cpp

    from mdl_edge.quantize.decoder import quantize_decoder

    from mdl_edge.runtime.decoder import extra_bufts_safe

    if "REPACK = 1" not in llama_cpp.llama_print_system_info().decode():
        pytest.skip("this llama.cpp build has no repacked CPU weights")
    if not extra_bufts_safe():
        with pytest.raises(ConfigError, match="issue #20824"):
            LlamaDecoder(ggufs["tiny_qwen2"], n_ctx=64, extra_bufts=True)
        pytest.skip("this llama.cpp build has AMX: extra buffer types are refused")
    m = tiny_qwen2_model
    ids, audio = _prompt(m)
    segs = split_prompt(ids, [audio], m.cfg.audio_token_id)
    path = quantize_decoder(ggufs["tiny_qwen2"], tmp_path / "Q4_0.gguf", "Q4_0")
    runs = {}
    for extra in (False, True):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="mdl_edge.llama_cpp"), LlamaDecoder(path, n_ctx=512, extra_bufts=extra) as dec:
            toks = list(dec.generate(segs, max_new_tokens=16).result().token_ids)
            dec.evaluate(segs)
            runs[extra] = (toks, dec.logits())
        repacked = any("CPU_REPACK model buffer" in r.getMessage() for r in caplog.records)
        assert repacked == extra, f"extra_bufts={extra}: CPU_REPACK buffer {'missing' if extra else 'used'}"
    (t0, l0), (t1, l1) = runs[False], runs[True]
    lp, lq = l0 - np.logaddexp.reduce(l0), l1 - np.logaddexp.reduce(l1)
    kl = float((np.exp(lp) * (lp - lq)).sum())
    print(f"repacked vs plain Q4_0: KL {kl:.2e}, max |logit diff| {np.abs(l0 - l1).max():.3g}")
    assert kl < 1e-3, f"KL {kl:.3g}"
    assert t0 == t1, f"plain {t0} vs repacked {t1}"


@pytest.mark.parametrize("which", ["tiny", "tiny_qwen2"])
def test_prompt_in_one_batch_gives_the_segmentwise_logits(which: str, request, ggufs) -> None:
    """Text rows fed as embeddings: the whole prompt in one llama_decode gives the logits of the
    three calls (text, audio, text) at every generated position (f32 decoder, parity mode)."""
    model = request.getfixturevalue(f"{which}_model")
    ids, audio = _prompt(model, seconds=3.0)
    segs = split_prompt(ids, [audio], model.cfg.audio_token_id)
    assert [s.embeddings is None for s in segs] == [True, False, True]
    runs = {}
    for one_batch in (False, True):
        with LlamaDecoder(ggufs[which], n_ctx=512, f32_kv=True, flash_attn=False, one_batch=one_batch) as dec:
            calls = []
            decode = dec._decode
            dec._decode = lambda seg, pos, want_logits: (calls.append(len(seg)), decode(seg, pos, want_logits))
            res = dec.generate(segs, max_new_tokens=12, stop_ids=[]).result()
            dec._decode = decode
            logits = []
            for k in range(len(res.token_ids) + 1):
                dec.evaluate(segs + [_tok(t) for t in res.token_ids[:k]])
                logits.append(dec.logits())
            # every generated token but a last one that ends the answer (not a stop token) takes one call
                runs[one_batch] = (res.token_ids, np.stack(logits), calls[: len(calls) - len(res.token_ids) + (res.stop_reason != "stop_token")])
    (t3, l3, c3), (t1, l1, c1) = runs[False], runs[True]
    assert c3 == [len(s) for s in segs] and c1 == [len(ids)], f"prompt calls: segmentwise {c3}, one batch {c1}"
    worst = float(np.abs(l1 - l3).max() / np.abs(l3).max())
    assert worst <= 1e-5, f"{which}: one batch vs three calls, relative max logit difference {worst:.2e}"
    assert t1 == t3


def test_token_rows_are_llama_cpps_lookup(tiny_qwen2_dir, ggufs, tmp_path) -> None:
    """A token's ``token_embd`` row, dequantized by mdl-edge, gives bit-identical logits to
    llama.cpp's own lookup of the token, for every stored type of the table."""
    from mdl_edge.quantize.decoder import quantize_decoder
    from mdl_edge.runtime.gguf_meta import TOKEN_EMBD, read_gguf_header

    toks = (11, 12, 13, 300, 14, 15, 16)
    paths = [ggufs["tiny_qwen2"]] + [quantize_decoder(ggufs["tiny_qwen2"], tmp_path / f"{v}.gguf", v) for v in ("F16", "Q8_0", "Q4_0")]
    types = set()
    for path in paths:
        types.add(read_gguf_header(path).tensors[TOKEN_EMBD].ggml_type)
        with LlamaDecoder(path, n_ctx=256, f32_kv=True) as dec:
            dec.evaluate([Segment(tokens=toks)])
            want = dec.logits()
            dec.reset()
            dec.evaluate([Segment(embeddings=dec._token_embd.rows(toks))])
            got = dec.logits()
        assert np.array_equal(got, want), f"{path.name}: max |diff| {np.abs(got - want).max():.2e}"
    assert len(types) >= 3, types
