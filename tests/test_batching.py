"""Continuous batching on the tiny model: several sequences in one llama.cpp context against
each sequence decoded alone (f32 decoder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import chirp
from mdl_edge.runtime import constants as C
from mdl_edge.runtime.batching import DecodeRequest, Failed, generate_many
from mdl_edge.runtime.decoder import LlamaDecoder
from mdl_edge.runtime.prompt import Segment, split_prompt
from mdl_edge.runtime.errors import ContextLengthError, MdlEdgeError
from mdl_edge.runtime.options import GenerationOptions as G
from mdl_edge.runtime.options import SamplingOptions
from mdl_edge.runtime.pipeline import AudioLM, Request
from mdl_edge.runtime.prompt import CAPTION_PROMPT, user_message
from mdl_edge.runtime.options import DecoderOptions

SECONDS = [0.5, 1.0, 2.5, 4.0, 7.0, 12.0]




@pytest.fixture(scope="module")
def prompts(tiny_qwen2_model) -> list[tuple[Segment, ...]]:
    m = tiny_qwen2_model
    out = []
    for k, s in enumerate(SECONDS):
        (emb,) = m.encode_audio([chirp(s, k)])
        ids = m.prompt.encode(user_message(CAPTION_PROMPT), [emb.shape[0]])
        out.append(tuple(split_prompt(ids, [emb.numpy()], m.cfg.audio_token_id)))
    return out


@pytest.fixture(scope="module")
def decoder(bundle) -> LlamaDecoder:
    with LlamaDecoder(Path(bundle) / "decoder.f32.gguf", f32_kv=True) as dec:
        yield dec


def _alone(dec: LlamaDecoder, segs, n: int = 16, sampling: SamplingOptions = SamplingOptions()) -> tuple[int, ...]:
    return dec.generate(list(segs), max_new_tokens=n, stop_ids=[], sampling=sampling).result().token_ids


def _run(dec: LlamaDecoder, requests, slots: int) -> dict:
    results, order = {}, []
    for ev in generate_many(dec, requests, slots=slots):
        if ev.done:
            order.append(ev.key)
            results[ev.key] = ev.result if ev.error is None else ev.error
    return results | {"_order": order}


def test_three_at_a_time_give_each_clip_its_tokens_alone(decoder, prompts) -> None:
    """6 clips of different lengths, 3 sequences at a time: each gets the greedy tokens it gets
    alone. (f32 weights: llama.cpp's batched kernels give the same sums here; were they to round
    differently, tokens could differ where two logits tie to 1e-6.)"""
    alone = [_alone(decoder, segs) for segs in prompts]
    got = _run(decoder, [DecodeRequest(segs, key=k, max_new_tokens=16) for k, segs in enumerate(prompts)], slots=3)
    for k in range(len(prompts)):
        assert got[k].token_ids == alone[k], f"clip {k} ({SECONDS[k]} s): batched {got[k].token_ids[:8]} vs alone {alone[k][:8]}"
        assert got[k].n_prompt == sum(len(s) for s in prompts[k])
    # the shared text before the audio was evaluated once for the sequences admitted together
    assert any(got[k].n_evaluated < got[k].n_prompt for k in range(1, 3))


def test_request_admitted_mid_generation_and_cancellation(decoder, prompts) -> None:
    """Slots=2 and 4 requests: the third and fourth are admitted while others generate; the
    second is cancelled after its first piece and the others finish with their tokens alone."""
    alone = {k: _alone(decoder, prompts[k], 24) for k in (0, 2, 3)}
    run = generate_many(decoder, [DecodeRequest(prompts[k], key=k, max_new_tokens=24) for k in range(4)], slots=2)
    done, cancelled = {}, False
    for ev in run:
        if ev.key == 1 and ev.text and not cancelled:
            run.cancel(1)
            cancelled = True
        if ev.done:
            done[ev.key] = ev
    assert isinstance(done[1].error, MdlEdgeError) and "cancelled" in str(done[1].error)
    for k in (0, 2, 3):
        assert done[k].result.token_ids == alone[k], f"request {k}"


def test_seeded_sampling_is_per_request(decoder, prompts) -> None:
    warm = SamplingOptions(temperature=0.9, seed=1234)
    alone = _alone(decoder, prompts[2], 16, warm)
    mixed = [DecodeRequest(prompts[k], key=k, max_new_tokens=16, sampling=warm if k == 2 else SamplingOptions(temperature=1.0, seed=k))
             for k in range(4)]
    got = _run(decoder, mixed, slots=4)
    assert got[2].token_ids == alone, "a seeded request samples the same tokens whatever runs beside it"


def test_failed_requests_pass_through_alone(decoder, prompts) -> None:
    too_long = DecodeRequest(prompts[0], key="long", max_new_tokens=10**6)
    got = _run(decoder, [DecodeRequest(prompts[0], key="a", max_new_tokens=8), Failed("bad.wav", MdlEdgeError("bad.wav: not audio")),
                         too_long, DecodeRequest(prompts[1], key="b", max_new_tokens=8)], slots=2)
    assert "bad.wav" in str(got["bad.wav"]) and "positions" in str(got["long"])
    assert isinstance(got["long"], ContextLengthError)  # a typed error: the server answers context_length_exceeded
    assert got["a"].token_ids == _alone(decoder, prompts[0], 8) and got["b"].token_ids == _alone(decoder, prompts[1], 8)


@pytest.mark.parametrize("overlap", [False, True])
def test_audiolm_run_many_files(bundle, tmp_path, overlap: bool) -> None:
    """AudioLM.run over files (one of them corrupt), clips encoded in turn or in a background
    thread: each result is the single-request result, text arrives per request, the bad file
    fails alone with its name."""
    import soundfile as sf

    paths = []
    for k, s in enumerate(SECONDS[:4]):
        p = tmp_path / f"clip{k}.wav"
        sf.write(p, chirp(s, k), C.SAMPLE_RATE)
        paths.append(p)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF0000WAVEnot really")
    paths.insert(2, bad)
    options = G(max_new_tokens=12)
    with AudioLM(bundle, encoder="fp32", decoder=DecoderOptions(variant="f32", f32_kv=True)) as lm:
        single = {p: lm.caption(p, options) for p in paths if p != bad}
        pieces: dict[Path, list[str]] = {p: [] for p in paths}
        reqs = [Request(audio=p, options=options, tag=p, on_text=pieces[p].append) for p in paths]
        out = list(lm.run(reqs, parallel=3, overlap=overlap))
    assert sorted(str(r.tag) for r, _ in out) == sorted(str(p) for p in paths)
    for req, res in out:
        if req.tag == bad:
            assert isinstance(res, MdlEdgeError) and "broken.wav" in str(res)
            continue
        assert res.token_ids == single[req.tag].token_ids, req.tag
        assert "".join(pieces[req.tag]) == res.text and res.n_audio_tokens == single[req.tag].n_audio_tokens


def test_long_prompts_prefill_in_pieces_between_decode_steps(bundle, prompts) -> None:
    """With 32-row batches, the 12 s clip's prompt (90 positions) is evaluated in pieces while the
    other sequences keep decoding; every sequence still gets its tokens alone."""
    with LlamaDecoder(Path(bundle) / "decoder.f32.gguf", f32_kv=True, n_batch=32) as dec:
        alone = {k: _alone(dec, prompts[k], 12) for k in (0, 1, 5)}
        run = generate_many(dec, [DecodeRequest(prompts[k], key=k, max_new_tokens=12) for k in (0, 1, 5)], slots=3)
        got = {ev.key: ev.result for ev in run if ev.done}
        assert run.stats["steps"] > run.stats["decode_steps"] > 0
    assert sum(len(s) for s in prompts[5]) > 64
    for k in (0, 1, 5):
        assert got[k].token_ids == alone[k], f"clip {k}"


def test_parallelism_is_bounded(decoder, prompts) -> None:
    from mdl_edge.runtime.errors import OptionError

    for bad in (0, 65, True):
        with pytest.raises(OptionError, match="parallel"):
            generate_many(decoder, [DecodeRequest(prompts[0])], slots=bad)


def test_text_pieces_end_at_stop_strings() -> None:
    from mdl_edge.runtime.sampling import TextPieces

    def run(pieces: list[bytes], stop: tuple[str, ...]) -> tuple[str, bool]:
        tp = TextPieces(stop)
        out = []
        for p in pieces:
            out.append(tp.push(p))
            if tp.stopped:
                break
        out.append(tp.flush())
        return "".join(out), tp.stopped

    assert run([b"Hello", b" wor", b"ld. Bye"], ("world",)) == ("Hello ", True)
    assert run([b"a ", b"wo", b"rk"], ("world",)) == ("a work", False)  # held back "wo", then released
    assert run([b"x\xe4", b"\xb8\xad END"], ("END",)) == ("x\u4e2d ", True)  # a character split across tokens
    assert run([b"no stops"], ()) == ("no stops", False)
    tp = TextPieces(("ab",))
    assert tp.push(b"xa") == "x" and tp.flush() == "a"  # the end of the answer releases what was held


def test_stop_strings_cancel_and_same_clip_prefix(bundle) -> None:
    """Stop strings end single and batched answers alike; a request whose cancelled() is true ends
    before any work; questions about one clip (audio first) share its decoded prompt start."""
    clip = chirp(3.0, 7)
    with AudioLM(bundle, encoder="fp32", decoder=DecoderOptions(variant="f32", f32_kv=True)) as lm:
        full = lm.generate(clip, "What is heard?", G(max_new_tokens=16), sample_rate=C.SAMPLE_RATE).text
        stop = full[6:9]
        assert stop.strip()
        cut = lm.generate(clip, "What is heard?", G(max_new_tokens=16, stop=(stop,)), sample_rate=C.SAMPLE_RATE)
        assert cut.text == full[: full.index(stop)] and cut.stop_reason == "stop_string"
        first = G(max_new_tokens=10, audio_first=True)
        alone = [lm.generate(clip, q, first, sample_rate=C.SAMPLE_RATE) for q in ("What is heard?", "Is anyone speaking?")]
        reqs = [Request(audio=clip, sample_rate=C.SAMPLE_RATE, prompt="What is heard?", options=G(max_new_tokens=16, stop=(stop,)), tag="stop"),
                Request(audio=clip, sample_rate=C.SAMPLE_RATE, prompt="x", tag="cancelled", cancelled=lambda: True)]
        reqs += [Request(audio=clip, sample_rate=C.SAMPLE_RATE, prompt=q, options=first, tag=q) for q in ("What is heard?", "Is anyone speaking?")]
        got = {r.tag: res for r, res in lm.run(reqs, parallel=4)}
    assert got["stop"].text == cut.text and got["stop"].stop_reason == "stop_string"
    assert isinstance(got["cancelled"], MdlEdgeError) and "cancelled" in str(got["cancelled"])
    a, b = got["What is heard?"], got["Is anyone speaking?"]
    assert (a.token_ids, b.token_ids) == (alone[0].token_ids, alone[1].token_ids)
    n_audio = a.n_audio_tokens
    # one of the two evaluated the template head and the clip; the other copied them
    assert min(a.n_evaluated, b.n_evaluated) <= a.n_prompt - n_audio, (a.n_evaluated, b.n_evaluated, a.n_prompt, n_audio)
