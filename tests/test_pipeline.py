"""End to end on the tiny model: bundle export, AudioLM vs the PyTorch reference, the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from mdl_edge.runtime import constants as C
from mdl_edge.runtime.cli import main
from mdl_edge.runtime.errors import CheckpointError, ConfigError, ContextLengthError
from mdl_edge.runtime.options import GenerationOptions as G
from mdl_edge.runtime.pipeline import AudioLM
from mdl_edge.runtime.options import DecoderOptions


def _clip(n: int) -> np.ndarray:
    t = np.arange(n) / C.SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + np.random.default_rng(n).standard_normal(n) * 0.05).astype(np.float32)


@pytest.mark.parametrize("seconds", [0.2, 1.0, 3.0, 10.07, 10.09, 12.0, 25.0])
def test_runtime_greedy_equals_reference(bundle, tiny_qwen2_model, seconds: float) -> None:
    """fp32 ONNX encoder + f32 GGUF decoder in parity mode (f32 KV cache, no flash attention):
    the same tokens as the PyTorch reference."""
    wave = _clip(int(seconds * C.SAMPLE_RATE))
    ref = tiny_qwen2_model.generate(wave, "Caption the audio.", max_new_tokens=24)
    with AudioLM(bundle, encoder="fp32", decoder=DecoderOptions(variant="f32", f32_kv=True)) as lm:
        got = lm.generate(wave, "Caption the audio.", G(max_new_tokens=24), sample_rate=C.SAMPLE_RATE)
    assert got.n_audio_tokens == ref.n_audio_tokens == C.n_audio_tokens(wave.size)
    assert got.token_ids == ref.token_ids, f"{seconds} s: runtime {got.token_ids[:10]} vs reference {ref.token_ids[:10]}"
    assert got.text == ref.text and got.stop_reason == ref.stop_reason


def test_result_fields_streaming_and_questions(bundle) -> None:
    wave = _clip(3 * C.SAMPLE_RATE)
    with AudioLM(bundle) as lm:
        assert (lm.encoder_variant, lm.decoder_variant) == ("int8", "Q8_0")  # the manifest defaults
        res = lm.caption(wave, G(max_new_tokens=8), sample_rate=C.SAMPLE_RATE)
        streamed = "".join(lm.stream(wave, "Caption the audio.", G(max_new_tokens=8), sample_rate=C.SAMPLE_RATE))
        for key in ("decode_audio", "mel", "encoder", "projector", "prefill", "decode", "time_to_first_token", "total"):
            assert key in res.timings
        assert streamed == res.text and res.audio_seconds == pytest.approx(3.0)
        a = lm.ask(wave, "What sound is heard?", G(max_new_tokens=4, audio_first=True), sample_rate=C.SAMPLE_RATE)
        b = lm.ask(wave, "Is it loud?", G(max_new_tokens=4, audio_first=True), sample_rate=C.SAMPLE_RATE)
        assert b.timings["encoder"] == 0.0  # the second question reused the clip's encoding
        assert lm.decoder.evaluate(lm.decoder._cached) == len(lm.decoder._cached[-1])  # and the KV prefix
        assert a.n_audio_tokens == b.n_audio_tokens == 15
        lm.clear_cache()
        c = lm.ask(wave, "Is it loud?", G(max_new_tokens=4, audio_first=True), sample_rate=C.SAMPLE_RATE)
        assert c.timings["encoder"] > 0.0 and c.token_ids == b.token_ids  # encoded again, the same answer
        assert lm.transcribe(wave, G(max_new_tokens=2), language="en", sample_rate=C.SAMPLE_RATE).n_audio_tokens == 15


def test_context_grows_to_fit_and_fixed_context_is_enforced(bundle) -> None:
    """The automatic context starts small (KV memory) and grows for long audio; the tokens are
    those of a large fixed context. A fixed context too small for the request is refused."""
    from mdl_edge.runtime.decoder import AUTO_CTX_STEP

    wave = _clip(210 * C.SAMPLE_RATE)  # 1050 audio tokens: more than one step
    with AudioLM(bundle, encoder="fp32", decoder="f32") as lm:
        assert lm.decoder.n_ctx == AUTO_CTX_STEP
        short = lm.caption(wave[: 2 * C.SAMPLE_RATE], G(max_new_tokens=6), sample_rate=C.SAMPLE_RATE)
        assert lm.decoder.n_ctx == AUTO_CTX_STEP
        grown = lm.caption(wave, G(max_new_tokens=6), sample_rate=C.SAMPLE_RATE)
        assert grown.n_audio_tokens == C.n_audio_tokens(wave.size) == 1050
        # the smallest whole number of steps that holds the prompt and the new tokens
        assert lm.decoder.n_ctx % AUTO_CTX_STEP == 0 and 1050 < lm.decoder.n_ctx < 1050 + 6 + 64 + AUTO_CTX_STEP
        again = lm.caption(wave[: 2 * C.SAMPLE_RATE], G(max_new_tokens=6), sample_rate=C.SAMPLE_RATE)
    assert again.token_ids == short.token_ids  # a resized context starts from an empty cache
    with AudioLM(bundle, encoder="fp32", decoder=DecoderOptions(variant="f32", n_ctx=4096)) as lm:
        assert lm.caption(wave, G(max_new_tokens=6), sample_rate=C.SAMPLE_RATE).token_ids == grown.token_ids
    with AudioLM(bundle, decoder=DecoderOptions(variant="f32", n_ctx=512)) as lm, pytest.raises(ContextLengthError, match="context holds 512"):
        lm.caption(wave, G(max_new_tokens=6), sample_rate=C.SAMPLE_RATE)
    with pytest.raises(ConfigError, match="n_ctx: must be a whole number >= 64"):
        DecoderOptions(n_ctx=8)


def test_swapped_decoder_is_refused(bundle, tiny_dir, tmp_path) -> None:
    from mdl_edge.export.convert.gguf_decoder import export_decoder_gguf

    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    export_decoder_gguf(tiny_dir, d / "decoder.Q8_0.gguf", out_type="f32")  # another checkpoint's decoder
    with pytest.raises(CheckpointError, match="made from another checkpoint"):
        AudioLM(d)


def test_bad_bundles(bundle, tiny_dir, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="run `mdl-edge export` on it first"):
        AudioLM(tiny_dir)
    with pytest.raises(ConfigError, match="no decoder variant 'Q2_K'; this bundle has f32, Q8_0"):
        AudioLM(bundle, decoder="Q2_K")
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    (d / "decoder.f32.gguf").unlink()
    with pytest.raises(CheckpointError, match="decoder.f32.gguf is listed in the manifest but missing"):
        AudioLM(d, decoder="f32")


def test_cli_json_and_failures(bundle, tmp_path, capsys) -> None:
    good = tmp_path / "good.wav"
    sf.write(good, _clip(2 * C.SAMPLE_RATE), C.SAMPLE_RATE)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF garbage")
    code = main(["caption", str(good), str(bad), str(good), "--model", str(bundle), "--json", "--max-new-tokens", "4", "--parallel", "2"])
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]  # as each finishes: the bad file first
    assert code == 1 and len(lines) == 3
    assert lines[0]["file"] == str(bad) and "error" in lines[0] and "bad.wav" in lines[0]["error"]
    assert lines[1]["file"] == lines[2]["file"] == str(good) and lines[1]["n_audio_tokens"] == 10 and "timings" in lines[1]
    assert lines[2]["text"] == lines[1]["text"]
    assert "1 of 3 file(s) failed" in out.err
    # text output keeps the input order, whatever finishes first; same answers as one at a time
    short = tmp_path / "short.wav"
    sf.write(short, _clip(C.SAMPLE_RATE // 2), C.SAMPLE_RATE)
    files = [str(good), str(short), str(bad), str(good)]
    for parallel in ("1", "3"):
        assert main(["caption", *files, "--model", str(bundle), "--max-new-tokens", "6", "--parallel", parallel]) == 1
        text = capsys.readouterr().out.splitlines()
        assert [t.split(": ")[0] for t in text] == [str(good), str(short), str(good)], text
        if parallel == "1":
            one_at_a_time = text
    assert text == one_at_a_time
    assert main(["caption", str(good), "--model", str(bundle), "--parallel", "0"]) == 2
    assert "argument --parallel: must be a whole number >= 1" in capsys.readouterr().err
    assert main(["ask", str(good), "-q", "Is it music?", "--model", str(bundle), "--stream", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith(f"{good}: ")
    long = tmp_path / "long.wav"
    # 300 audio tokens: more than llama.cpp's smallest context (it rounds 64 up to 256)
    sf.write(long, _clip(60 * C.SAMPLE_RATE), C.SAMPLE_RATE)
    assert main(["caption", str(long), "--model", str(bundle), "--n-ctx", "64", "--json", "--segment", "none"]) == 1
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "but the context holds 256 (raise n_ctx)" in line["error"]


def test_parity_report(bundle, tiny_qwen2_dir, capsys) -> None:
    code = main(["parity", str(tiny_qwen2_dir), "--bundle", str(bundle), "--json", "--max-new-tokens", "12"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and len(report["clips"]) == 3
    assert max(report["mel"]) <= 1e-3
    assert report["encoder"]["fp32"]["feature_rel_max_error"] <= 1e-4
    assert report["encoder"]["int8"]["feature_cosine_mean"] >= 0.99
    assert report["decoder"]["f32"]["logit_kl_mean"] <= 1e-8 and report["decoder"]["f32"]["top1_agreement"] == 1.0
    # the default speed settings (f16 KV cache, flash attention) drift by round-off, and are shown
    fast = report["decoder_default"]["f32"]
    assert 0 < fast["logit_kl_mean"] <= 1e-4 and fast["top1_agreement"] >= 0.95, fast
    # the default column is what users get: the quantized decoder's prompt on the int8 engine where it pays
    from mdl_edge.runtime.cpu import cpu_info

    assert report["decoder_default"]["f32"]["prompt_by"] == "llama.cpp"
    assert report["decoder_default"]["Q8_0"]["prompt_by"] == ("int8 engine" if cpu_info().fast_int8 else "llama.cpp")
    assert report["end_to_end"]["fp32 + f32"]["exact_match_rate"] == 1.0
    assert set(report["end_to_end"]) == {"fp32 + f32", "int8 + f32", "fp32 + Q8_0", "int8 + Q8_0"}


def test_bench_command(bundle, tiny_qwen2_dir, tmp_path, capsys) -> None:
    args = ["bench", "--model", str(tiny_qwen2_dir), "--bundle", str(bundle), "--work", str(tmp_path), "--clips", "3,30", "--tokens", "4"]
    assert main(args) == 2  # the default pairs need f16 / Q4_K_M, which this bundle lacks: refused before any run
    assert "no decoder variant 'f16'" in capsys.readouterr().err
    assert main(args + ["--repeats", "0"]) == 2
    assert "repeats: must be a whole number >= 1" in capsys.readouterr().err
    assert main(args + ["--repeats", "2", "--parallel", "1"]) == 2
    assert "not to --parallel" in capsys.readouterr().err
    out = tmp_path / "bench.json"
    assert main(args + ["--variants", "fp32+f32,int8+Q8_0", "--json", str(out), "--repeats", "2"]) == 0
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    # each clip twice in a row, its row the median of the two runs
    assert all(r["repeats"] == 2 and all(len(c["ttft_runs"]) == 2 and min(c["ttft_runs"]) <= c["ttft"] <= max(c["ttft_runs"])
                                         for c in r["clips"]) for r in results)
    assert "each clip 2 times in a row" in table
    assert [r["config"] for r in results][:3] == ["reference fp32 (PyTorch)", "runtime fp32 + f32", "runtime int8 + Q8_0"]
    # the quantized pair runs its prompt on the bundle's prompt engine, and again on llama.cpp beside it
    assert results[3]["config"] == "runtime int8 + Q8_0, prompt in llama.cpp"
    assert results[4]["config"].startswith("runtime int8 + Q8_0, legacy") and len(results) == 5
    from mdl_edge.runtime.cpu import cpu_info

    engine = "onnx" if cpu_info().fast_int8 else "llama"  # the default where int8 dot products make it pay
    assert [r.get("prompt_by") for r in results] == [None, "llama", engine, "llama", "llama"]
    from mdl_edge.runtime.decoder import extra_bufts_safe

    # weights repacked where the engine runs the prompt (and the build repacks safely), and said so
    repack = engine == "onnx" and extra_bufts_safe()
    assert [r.get("repacked") for r in results] == [None, False, repack, False, False]
    assert f"repacked for this CPU (ggml's extra buffer types): {'runtime int8 + Q8_0' if repack else 'none'}" in table
    assert all(len(r["clips"]) == 2 and all(c["peak_rss_gb"] > 0 for c in r["clips"]) for r in results)
    # every runtime clip starts from an empty KV cache: it evaluates the whole prompt, as the reference does
    ref_positions = [c["positions"] for c in results[0]["clips"]]
    assert all([c["positions"] for c in r["clips"]] == ref_positions for r in results[1:]), [[c["positions"] for c in r["clips"]] for r in results]
    assert table.startswith("CPU: ") and "fp32 GEMM" in table.splitlines()[1] and "memory read" in table.splitlines()[1]
    assert "each the highest of 2 measurements, before and after the runs" in table.splitlines()[1]
    # the goals name the configuration they judge (int8 + Q4_K_M when timed, else the last one)
    assert "goal (runtime int8 + Q8_0, 3 s clip): total" in table and "time to first token" in table
    assert "goal (runtime int8 + Q8_0, 30 s clip): peak RSS" in table
    # each stage against the rate its goal names
    stages = next(line for line in table.splitlines() if line.startswith("goal (runtime int8 + Q8_0, 3 s clip): encoder"))
    assert "of the faster GEMM rate (>= 80%" in stages and "prompt" in stages and "of the fp32 GEMM rate (>= 70%" in stages, stages
    assert "decoding" in stages and "of read bandwidth (>= 50%" in stages, stages
    assert "vs legacy, 3 s clip" in table and "runtime int8 + Q8_0 vs prompt in llama.cpp, 3 s clip: time to first token" in table
    row = next(line for line in table.splitlines() if line.startswith("| runtime int8 + Q8_0 | 3 s"))
    assert row.count("%") == 3, row  # encoder, prompt and decoding each as a fraction of the machine's rate


def test_machine_peaks_keep_the_higher_of_two_measurements() -> None:
    """A stage's fraction of the machine's rate is taken against the higher reading of each rate,
    so a host that slowed down while it was measured does not flatter the stages."""
    from mdl_edge.export.bench.machine import MachinePeaks
    from mdl_edge.runtime.cpu import cpu_info

    before = MachinePeaks(cpu_info(), 2, fp32_gflops=150.0, int8_gops=700.0, read_gbs=32.0)
    after = MachinePeaks(cpu_info(), 2, fp32_gflops=190.0, int8_gops=650.0, read_gbs=46.0)
    both = before.higher(after)
    assert (both.fp32_gflops, both.int8_gops, both.read_gbs, both.samples) == (190.0, 700.0, 46.0, 2)
    assert "highest of 2 measurements" in both.header() and "highest" not in before.header()


def test_bench_parallel_table(bundle, tiny_qwen2_dir, tmp_path, capsys) -> None:
    args = ["bench", "--model", str(tiny_qwen2_dir), "--bundle", str(bundle), "--work", str(tmp_path), "--clips", "1,5",
            "--parallel", "1,4", "--parallel-tokens", "4", "--variants", "int8+Q8_0", "--json", str(tmp_path / "p.json")]
    assert main(args) == 0
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "p.json").read_text())
    assert [(r["decoder"], r["parallel"], r["overlap"]) for r in results] == [("Q8_0", 1, False), ("Q8_0", 4, False), ("Q8_0", 4, True)]
    assert [r["files"] for r in results[1]["rows"]] == [8, 16]  # 2 x 4 one-second clips, the goal's 16 five-second ones
    assert all(r["decode_tok_s"] > 0 and r["files_per_s"] > 0 for res in results for r in res["rows"])
    assert table.startswith("CPU: ") and "| Q8_0 | 5 s | 4 | 4 | 16 |" in table
    assert "encoder overlapped with decoding (Q8_0, 4 sequences, 8 clips of 1 s, 4 tokens)" in table


def test_cli_repacks_weights_for_batched_decoding_where_safe(bundle, tmp_path, monkeypatch) -> None:
    """--extra-bufts by default: on when several sequences decode together and the build can
    repack safely, else left to DecoderOptions (unset); explicit --[no-]extra-bufts wins."""
    from mdl_edge.runtime import decoder, pipeline

    seen: list[bool | None] = []

    class Stop(Exception):
        pass

    def fake(path, **kw):  # noqa: ANN001, ANN202
        seen.append(kw["decoder"].extra_bufts)
        raise Stop

    monkeypatch.setattr(pipeline, "AudioLM", fake)
    wav = tmp_path / "a.wav"
    sf.write(wav, _clip(C.SAMPLE_RATE), C.SAMPLE_RATE)
    two = [str(wav), str(wav), "--model", str(bundle)]
    for safe, args, want in ((True, two, True), (True, two + ["--parallel", "1"], None), (True, [str(wav), "--model", str(bundle)], None),
                             (False, two, False), (False, two + ["--extra-bufts"], True), (True, two + ["--no-extra-bufts"], False)):
        monkeypatch.setattr(decoder, "extra_bufts_safe", lambda safe=safe: safe)
        with pytest.raises(Stop):
            main(["caption", *args])
        assert seen.pop() is want, (safe, args)


def test_decoder_cost_counts_the_kv_cache_a_token_reads(bundle, tiny_qwen2_dir) -> None:
    """Decoding's fraction of read bandwidth counts what a token reads: the weights and the f16
    keys and values of every cached position (layers x KV heads x head size x 2, for K and V)."""
    from mdl_edge.export.bench.machine import KV_ELEMENT_BYTES, decoder_cost
    from mdl_edge.runtime.bundle import Bundle

    text = json.loads((tiny_qwen2_dir / "config.json").read_text())["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    want = text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 2 * KV_ELEMENT_BYTES
    cost = decoder_cost(str(Bundle.open(bundle).variant("decoder", "f32")[1]))
    assert cost.kv_bytes_per_position == want, (cost.kv_bytes_per_position, want)
    assert cost.bytes_read(0) == cost.bytes_per_token and cost.bytes_read(10) == cost.bytes_per_token + 10 * want
