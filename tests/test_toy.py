"""The toy world and the toy model trained on it: a model that hears, so that tests can tell a
pipeline that hears from one that scrambles the audio, and quantization costs show in task
metrics. Its trained weights ship with the package (``export/toy/store.py``); a changed recipe
trains once per machine (minutes) and is cached."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mdl_edge.export.toy import world as toyworld
from mdl_edge.runtime.options import GenerationOptions
from mdl_edge.runtime.prompt import TRANSCRIBE_PROMPT

pytestmark = pytest.mark.skipif(not toyworld.espeak_available(), reason="needs espeak-ng (apt-get install espeak-ng)")

N_HELD_OUT = 60
N_CONNECTED = 40
# Floors the trained model clears with margin. The shipped model on these clips through the
# runtime: held-out (60) word accuracy 0.960, caption exact 0.917, elements 0.897 for fp32 + f32
# and int8 + Q4_K_M; connected speech (40) word accuracy 0.783 and phrase exact 0.575 for both;
# telephone speech (62 clips, int8 + Q4_K_M) word accuracy 0.909; speech over noise that starts
# after 0.3 s of quiet (20 clips) 0.883, where the weights before scored 0.133. A retraining on
# another CPU rounds differently and lands up to 5 points apart, hence the margins; scrambled
# audio falls far below (test_scrambled_audio_embeddings_are_not_heard).
FLOORS = {"fp32 + f32": {"word_accuracy": 0.80, "caption_exact": 0.72, "caption_elements": 0.75},
          "int8 + Q4_K_M": {"word_accuracy": 0.78, "caption_exact": 0.70, "caption_elements": 0.73}}
CONNECTED_FLOORS = {"word_accuracy": 0.65, "phrase_exact": 0.45}
TELEPHONE_FLOOR = 0.70
ONSET_FLOOR = 0.70


@pytest.fixture(scope="module")
def held_out() -> list[toyworld.Clip]:
    return list(toyworld.clips("held-out", N_HELD_OUT, seed=777))


def _runtime_answer(lm):
    options = GenerationOptions(max_new_tokens=48)
    return lambda wave, prompt: lm.generate(wave, prompt, options, sample_rate=toyworld.SR).text


# -- the generator ------------------------------------------------------------------------------
def test_generator_is_deterministic_for_a_seed() -> None:
    a = list(toyworld.clips("held-out", 6, seed=3))
    b = list(toyworld.clips("held-out", 6, seed=3))
    c = list(toyworld.clips("held-out", 6, seed=4))
    assert all(np.array_equal(x.wave, y.wave) and x.caption == y.caption and x.words == y.words for x, y in zip(a, b))
    assert [x.caption for x in a] != [x.caption for x in c]


def test_a_clip_does_not_depend_on_how_many_or_how_they_are_made() -> None:
    one_by_one = list(toyworld.clips("train", 8, seed=3, workers=1))
    parallel = list(toyworld.clips("train", 12, seed=3, workers=3))[:8]
    alone = toyworld.clip_at("train", 5, seed=3)
    assert all(np.array_equal(x.wave, y.wave) and x.caption == y.caption for x, y in zip(one_by_one, parallel))
    assert np.array_equal(alone.wave, one_by_one[5].wave) and alone.sounds == one_by_one[5].sounds


def test_espeak_helper_speaks_as_the_program_does() -> None:
    """The in-process helper must give the program's samples bit for bit, in any order and on
    repeats (the engine carries state between utterances; the helper's fork per word discards it)."""
    from mdl_edge.export.toy import espeak

    cases = [("seven", "en-us+f2", 190, 59), ("hello", "en-gb-scotland+m3", 130, 41), ("seven", "en-us+f2", 190, 59),
             ("purple", "en-029+m6", 160, 50), ("hello", "en-gb-scotland+m3", 130, 41)]
    for case in cases:
        ours, rate = espeak.synthesize(*case)[:2]
        program, program_rate = espeak.synthesize(*case, use_helper=False)[:2]
        assert rate == program_rate and ours.dtype == program.dtype == np.int16
        assert ours.shape == program.shape, f"{case}: {ours.shape} samples, the program gives {program.shape}"
        assert np.array_equal(ours, program), f"{case}: worst sample difference {np.abs(ours.astype(int) - program).max()}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_espeak_helper_is_not_shared_with_a_forked_process() -> None:
    """A process forked after the helper started must start its own (the inherited one talks on
    the parent's pipes); both then speak as the program does."""
    from mdl_edge.export.toy import espeak

    case = ("seven", "en-us+f2", 190, 59)
    want = espeak.synthesize(*case, use_helper=False)[0]
    assert np.array_equal(espeak.synthesize(*case)[0], want)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = all(np.array_equal(espeak.synthesize(*case)[0], want) for _ in range(3))
            ok = ok and any(h.owner == os.getpid() for h in espeak._started)  # its own helper
        finally:
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    answer = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert answer == b"1", "the forked process did not get the program's samples"
    assert np.array_equal(espeak.synthesize(*case)[0], want)


def test_espeak_errors_name_the_voice() -> None:
    from mdl_edge.export.toy import espeak
    from mdl_edge.runtime.errors import MdlEdgeError

    for use_helper in (True, False):
        with pytest.raises(MdlEdgeError, match="xx-nonexist"):
            espeak.synthesize("one", "xx-nonexist", 150, 50, use_helper=use_helper)
    assert espeak.synthesize("one", "en", 150, 50)[0].size > 1000  # the helper still serves after an error


def test_clips_are_what_their_captions_say() -> None:
    clips = list(toyworld.clips("train", 60, seed=1))
    for c in clips:
        assert 1.0 <= c.wave.size / toyworld.SR <= 10.0 and np.isfinite(c.wave).all()
        assert toyworld.caption_of(toyworld.caption_elements(c.caption)) == c.caption
        assert " ".join(w for w, _, _ in c.words if w in toyworld.VOCAB) == c.transcript  # filler words are not transcribed
        for w, a, b in c.words:  # each word lies inside the clip and is louder than the room
            seg = c.wave[int(a * toyworld.SR) : int(b * toyworld.SR)]
            assert 0 <= a < b <= c.wave.size / toyworld.SR and np.abs(seg).max() > 0.05, (w, a, b)
    kinds = {tuple("says" in e for e in c.events) for c in clips}
    assert (True,) in kinds and (False,) in kinds and (False, True) in kinds  # speech, events, event then speech
    assert any("over noise" in c.events for c in clips) and any(c.caption == toyworld.SILENCE for c in toyworld.clips("train", 200, seed=2))


def test_splits_differ_in_voice_speed_snr_and_word_order() -> None:
    train, held = toyworld._SPLITS["train"], toyworld._SPLITS["held-out"]
    for key in ("voices", "speeds", "snrs"):
        assert not set(train[key]) & set(held[key]), key
    for c in toyworld.clips("held-out", 80, seed=5):
        words = c.transcript.split()
        if len(words) > 1:  # every held-out phrase holds a word pair in an order training never has
            assert any(not toyworld._pair_seen_in_training(a, b) for a, b in zip(words, words[1:])), c.transcript
    for c in toyworld.clips("train", 80, seed=5):
        words = c.transcript.split()
        assert all(toyworld._pair_seen_in_training(a, b) for a, b in zip(words, words[1:])), c.transcript


def test_connected_split_shares_no_rendering_choice_with_training() -> None:
    train, conn = toyworld._SPLITS["train"], toyworld._SPLITS["connected"]
    accents = {v.split("+")[0] for v in train["voices"]}
    assert not accents & {v.split("+")[0] for v in conn["voices"]}  # accents training never hears
    assert not set(train["speeds"]) & set(conn["speeds"]) and not set(train["filler_words"]) & set(conn["filler_words"])
    assert not set(conn["filler_words"]) & set(toyworld.VOCAB) and not set(train["filler_words"]) & set(toyworld.VOCAB)
    clips = list(toyworld.clips("connected", 40, seed=4))
    assert all(c.transcript and c.caption.endswith(c.transcript) for c in clips)
    mixed = [c for c in clips if len(c.words) > len(c.transcript.split())]
    assert 5 <= len(mixed) <= 25  # about a third hold words outside the vocabulary
    assert all({w for w, _, _ in c.words} - set(toyworld.VOCAB) <= set(conn["filler_words"]) for c in mixed)


def test_connected_phrases_are_one_utterance_with_espeaks_word_places() -> None:
    """A phrase spoken in one go is espeak-ng's single rendering of the whole phrase (not words
    glued together); its word places come from espeak-ng's word events: in order, touching, each
    over audible speech."""
    words = ["seven", "blue", "door"]
    wave, spans, _ = toyworld.speak_phrase(words, "en-us+m3", 175, 50)
    assert np.array_equal(wave, toyworld.speak(" ".join(words), "en-us+m3", 175, 50))
    assert [w for w, _, _ in spans] == words and spans[0][1] == 0 and spans[-1][2] == wave.size
    for (_, a, b), (_, c, _) in zip(spans, spans[1:]):
        assert a < b == c
    for w, a, b in spans:
        assert np.abs(wave[a:b]).max() > 0.1 and (b - a) / toyworld.SR > 0.1, (w, a, b)
    # with no pauses between words it is shorter than the same words said one at a time
    apart, _, _ = toyworld.speak_words(words, "en-us+m3", 175, 50, np.random.default_rng(0))
    assert wave.size < apart.size


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_phonemes_come_from_espeaks_phoneme_events() -> None:
    """Each phrase carries espeak-ng's phonemes (its ASCII mnemonics) with their places, in both
    renderings: in order, touching, covering the words they make up, and the words' phonemes as
    espeak-ng transcribes them (``espeak-ng -x -v en-gb-x-rp``: "s'Ev@n bl'u: d'O@")."""
    words = ["seven", "blue", "door"]
    want = ["s", "E", "v", "@", "n", "b", "l", "u:", "d", "O@"]
    wave, spans, phonemes = toyworld.speak_phrase(words, "en-gb-x-rp+m3", 175, 50)
    assert [p for p, _, _ in phonemes if not p.startswith("_")] == want
    assert phonemes[0][1] <= spans[0][1] + 400 and phonemes[-1][2] == wave.size
    for (_, a, b), (_, c, _) in zip(phonemes, phonemes[1:]):
        assert a < b == c
    for w, a, b in spans:  # a word's phonemes start within it (espeak-ng's word event comes a little before its first phoneme)
        inside = [p for p, s, _ in phonemes if a <= s < b and not p.startswith("_")]
        assert inside == {"seven": want[:5], "blue": want[5:8], "door": want[8:]}[w], (w, inside)
    apart, spans, phonemes = toyworld.speak_words(words, "en-gb-x-rp+m3", 175, 50, np.random.default_rng(0))
    assert [p for p, _, _ in phonemes if not p.startswith("_")] == want
    for w, a, b in spans:  # said alone, a word's phonemes lie within it
        assert [p for p, s, e in phonemes if a <= s and e <= b and not p.startswith("_")] == \
            {"seven": want[:5], "blue": want[5:8], "door": want[8:]}[w]
    clip = next(c for c in toyworld.clips("train", 20, seed=1) if c.transcript)
    assert clip.phonemes and all(0 <= a < b <= clip.wave.size / toyworld.SR for _, a, b in clip.phonemes)


def test_phoneme_labels_name_the_phoneme_under_each_position() -> None:
    """The phoneme head's labels: at each 25 Hz position the phoneme under its centre, 0 where no
    one speaks (sound events, silence, pauses); a clip whose speech has no phoneme events is left
    out of that loss altogether."""
    from mdl_edge.export.toy import train as T
    from mdl_edge.runtime import constants as C

    clips = list(toyworld.clips("train", 30, seed=4))
    inventory = T.phoneme_inventory(clips)
    assert 30 <= len(inventory) <= 80 and "E" in inventory and not any(p.startswith("_") for p in inventory)
    hop = C.PATCH_HOP_SAMPLES / C.SAMPLE_RATE
    for c in clips:
        labels = T.phoneme_labels(c, inventory)
        assert labels.numel() == T.frame_labels(c).numel()
        for i in np.flatnonzero(labels.numpy()):
            centre = (i + 0.5) * hop
            under = [p for p, a, b in c.phonemes if a <= centre < b]
            assert under and inventory[int(labels[i]) - 1] == under[0], (c.caption, i)
        for name, a, b in c.sounds:  # no phoneme where only an event sounds
            inside = [i for i in range(labels.numel()) if a <= (i + 0.5) * hop < b and not any(s <= (i + 0.5) * hop < e for _, s, e in c.phonemes)]
            assert all(int(labels[i]) == 0 for i in inside), name
    said = next(c for c in clips if c.words)
    blind = toyworld.Clip(said.wave, said.caption, said.transcript, said.events, said.split, said.words, said.sounds, ())
    assert bool((T.phoneme_labels(blind, inventory) == -100).all())


def test_most_training_phrases_are_connected_some_with_filler_words() -> None:
    clips = [c for c in toyworld.clips("train", 150, seed=6) if c.transcript]
    def touching(c: toyworld.Clip) -> bool:
        return len(c.words) > 1 and all(abs(b - c2) < 1e-9 for (_, _, b), (_, c2, _) in zip(c.words, c.words[1:]))
    multi = [c for c in clips if len(c.words) > 1]
    share = np.mean([touching(c) for c in multi])
    assert 0.45 <= share <= 0.75, share  # the recipe says 0.6
    fillers = [c for c in clips if len(c.words) > len(c.transcript.split())]
    assert 0.25 <= len(fillers) / len(clips) <= 0.45, len(fillers) / len(clips)  # the recipe says 0.35


def _high_band_share(wave: np.ndarray) -> float:
    """The share of a clip's energy above 4.2 kHz (a telephone line carries none)."""
    power = np.abs(np.fft.rfft(wave)) ** 2
    return float(power[np.fft.rfftfreq(wave.size, 1 / toyworld.SR) > 4200].sum() / power.sum())


def test_telephone_speech_is_g711_at_8khz() -> None:
    """``telephone`` gives a clip as a G.711 line brings it: the same length, nothing above 4 kHz,
    and below it the same speech (within G.711's quantization noise)."""
    import soxr

    wave = toyworld.clip_at("held-out", 4).wave
    assert _high_band_share(wave) > 1e-3
    for seed in (0, 1):  # µ-law and A-law are drawn
        line = toyworld.telephone(wave, np.random.default_rng(seed))
        assert line.size == wave.size and line.dtype == np.float32
        assert _high_band_share(line) < 1e-8, _high_band_share(line)
        band = soxr.resample(soxr.resample(wave, toyworld.SR, 8000), 8000, toyworld.SR)[: wave.size]
        noise = float(np.sum((line - band) ** 2) / np.sum(band**2))
        assert noise < 10 ** (-25 / 10), f"G.711 noise {10 * np.log10(noise):.1f} dB"


def test_some_training_clips_come_over_a_telephone_line() -> None:
    """A share of training clips is band-limited telephone audio (so the model hears the Realtime
    API's 8 kHz G.711 input); no evaluation clip is. Told apart by speech clips' energy above
    4.2 kHz: below 1e-12 of the clip's over a line, at least 3e-5 otherwise (a low tone alone can
    have as little, so clips without speech are not counted)."""
    share = np.mean([_high_band_share(c.wave) < 1e-8 for c in toyworld.clips("train", 200, seed=8) if c.transcript])
    assert 0.08 <= share <= 0.25, share  # the recipe says 0.15
    for split in ("held-out", "connected"):
        assert all(_high_band_share(c.wave) > 1e-6 for c in toyworld.clips(split, 30, seed=8) if c.transcript), split


def _quiet_lead(wave: np.ndarray) -> float:
    """Seconds before a clip's level first rises above the quiet room's (1e-4 noise)."""
    loud = np.flatnonzero(np.abs(wave) > 2e-3)
    return loud[0] / toyworld.SR if loud.size else wave.size / toyworld.SR


def test_some_training_noise_starts_in_the_quiet_before_the_speech() -> None:
    """Half the training clips over noise hear the noise start (and stop) around the speech, as a
    live utterance opened on a noise's onset does; held-out clips keep their noise from the first
    sample (they are what they were before). Told apart by the quiet before the clip first
    rises: a clip whose noise starts with it has none."""
    def over_noise(split: str, n: int) -> list[toyworld.Clip]:
        return [c for c in toyworld.clips(split, n, seed=9) if "over noise" in c.caption]

    train = over_noise("train", 300)
    onset = [c for c in train if _quiet_lead(c.wave) > 0.02 and _quiet_lead(c.wave) < c.words[0][1] - 0.01]
    # the recipe says 0.5, an onset anywhere in the quiet before the speech: the earliest 20 ms are not told apart
    assert len(train) >= 20 and 0.15 <= len(onset) / len(train) <= 0.75, (len(onset), len(train))
    assert all(_quiet_lead(c.wave) < 0.01 for c in over_noise("held-out", 200))


def test_training_clips_are_mostly_speech_and_held_out_clips_an_even_mix() -> None:
    def speech_share(split: str) -> float:
        return float(np.mean([bool(c.transcript) for c in toyworld.clips(split, 200, seed=3)]))

    train, held = speech_share("train"), speech_share("held-out")
    # the mixes say 0.90 and 0.70; 200 draws land within about 0.07 of them
    assert train >= 0.83 and 0.6 <= held <= 0.8 and train > held + 0.1, (train, held)
    assert any("says" not in c.caption for c in toyworld.clips("train", 100, seed=3))  # events and silence still taught


def test_fast_training_losses_equal_the_plain_formulation(tmp_path) -> None:
    """Training computes its losses in length-sorted sub-batches and shares each task's prompt
    prefix through a KV cache; both must give the loss and the gradients of the whole batch
    padded to its longest clip with transformers' own loss (a speed-up, not a change of model)."""
    import torch

    from mdl_edge.export.toy import train as T
    from mdl_edge.export.reference.model import MiDashengLM
    from mdl_edge.export.synthetic.checkpoint import write_synthetic_checkpoint

    write_synthetic_checkpoint("toy", tmp_path / "ck", seed=0)
    model = MiDashengLM.from_pretrained(tmp_path / "ck")
    model.train()
    T.semantic_encoder(model).init_bn.eval()
    head = torch.nn.Linear(model.cfg.encoder.embed_dim, T.FRAME_CLASSES)
    clips = list(toyworld.clips("train", 12, seed=2))
    inventory = T.phoneme_inventory(clips)
    phoneme_head = torch.nn.Linear(model.cfg.encoder.embed_dim, 1 + len(inventory))
    batch = T._examples(clips, model.prompt, 1, int(model.cfg.encoder.acoustic_mels or 0), inventory)
    pad = model.prompt.special.end_of_text
    params = (dict(model.named_parameters()) | {f"head.{n}": p for n, p in head.named_parameters()}
              | {f"phoneme_head.{n}": p for n, p in phoneme_head.named_parameters()})

    def heads(encoded: list) -> torch.Tensor:
        return T.heads_loss(head, phoneme_head, encoded, 1.0)

    def loss_and_grads(loss: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        for p in params.values():
            p.grad = None
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    plain, g_plain = loss_and_grads(T.plain_lm_loss(model, batch, pad) + heads(T._encode_grouped(model, batch, 1)))
    encoded = T._encode_grouped(model, batch, 3)
    fast, g_fast = loss_and_grads(T._lm_loss(model, encoded, pad) + heads(encoded))
    assert abs(fast - plain) <= 1e-5 * abs(plain), f"loss {fast} vs plain {plain}"
    assert g_fast.keys() == g_plain.keys()
    rel = {n: float((g_fast[n] - g_plain[n]).abs().max() / (g_plain[n].abs().max() + 1e-12)) for n in g_plain}
    worst = max(rel, key=rel.get)
    assert rel[worst] < 1e-4, f"worst gradient difference {rel[worst]:.2e} relative, in {worst}"


def test_encoder_phase_crop_keeps_what_is_heard_and_its_labels_aligned() -> None:
    """The encoder phase sees clips cut to what is heard: every labelled patch kept, the log-mel
    cut on the same patch boundaries as the labels, 1..margin patches of surroundings each side
    (fewer only at the clip's edge), and a sample count that gives exactly the kept patches."""
    import torch

    from mdl_edge.export.toy import train as T
    from mdl_edge.runtime import constants as C
    from mdl_edge.runtime.mel import log_mel

    rng = np.random.default_rng(0)
    margin = 8
    clips = list(toyworld.clips("train", 40, seed=3))
    inventory = T.phoneme_inventory(clips)
    for c in clips:
        e = {"mel": torch.from_numpy(log_mel(c.wave)), "n": max(c.wave.size, C.MIN_SAMPLES), "frames": T.frame_labels(c),
             "phonemes": T.phoneme_labels(c, inventory)}
        cut = T._cropped(e, margin, rng)
        p = cut["frames"].numel()
        assert cut["mel"].shape[1] == p * C.PATCH_FRAMES and C.n_patches(cut["n"]) == p and C.n_valid_keys(cut["n"]) == p, c.caption
        starts = [a for a in range(e["frames"].numel() - p + 1)
                  if torch.equal(e["mel"][:, a * C.PATCH_FRAMES : (a + p) * C.PATCH_FRAMES], cut["mel"])]
        assert starts, f"{c.caption}: the cut log-mel is no patch-aligned slice of the clip's"
        a = starts[0]
        assert torch.equal(e["frames"][a : a + p], cut["frames"]) and torch.equal(e["phonemes"][a : a + p], cut["phonemes"]), c.caption
        heard = torch.nonzero(e["frames"]).flatten()
        if heard.numel():
            assert int((cut["frames"] != 0).sum()) == heard.numel(), f"{c.caption}: a heard patch was cut off"
            before, after = int(heard[0]) - a, a + p - 1 - int(heard[-1])
            assert 1 <= before <= margin or a == 0, (c.caption, before)
            assert 1 <= after <= margin or a + p == e["frames"].numel() or p == C.n_patches(C.MIN_SAMPLES), (c.caption, after)
        else:
            assert a == 0 and p <= C.SAMPLE_RATE // C.PATCH_HOP_SAMPLES, c.caption


def test_scoring() -> None:
    assert toyworld.word_accuracy("three blue", "three blue") == 1.0
    assert toyworld.word_accuracy("three", "three blue") == 0.5
    assert toyworld.word_accuracy("one two three four", "three") == 0.0
    assert toyworld.word_accuracy("", "") == 1.0
    clip = next(c for c in toyworld.clips("train", 50, seed=0) if len(c.events) == 2)
    first, second = clip.events
    m = toyworld.score([clip], [f"{first}, then something else"], [clip.transcript])
    assert m["caption_exact"] == 0.0 and m["caption_elements"] == 0.5


# -- the trained model ---------------------------------------------------------------------------
def test_transcript_scores_count_written_fillers_as_errors() -> None:
    said = [toyworld.Clip(np.zeros(16000, np.float32), "a man says: red go", "red go", ("a man says: red go",), "connected",
                          (("red", 0.1, 0.3), ("the", 0.3, 0.4), ("go", 0.4, 0.6))),
            toyworld.Clip(np.zeros(16000, np.float32), "a woman says: six", "six", ("a woman says: six",), "connected",
                          (("six", 0.1, 0.5),))]
    m = toyworld.score_transcripts(said, ["red go", "six"])
    assert m["word_accuracy"] == 1.0 and m["phrase_exact"] == 1.0 and m["mixed_clips"] == 1
    m = toyworld.score_transcripts(said, ["red two go", "six"])  # a word written for "the"
    assert m["mixed_word_accuracy"] == 0.5 and m["mixed_phrase_exact"] == 0.0 and m["phrase_exact"] == 0.5


def test_shipped_weights_are_the_recipes() -> None:
    """The package ships the weights the recipe trains; a change to what the recipe does (not
    to its comments) must come with weights trained by it (``mdl-edge train-toy --ship``)."""
    from mdl_edge.export.toy import store
    from mdl_edge.export.toy.train import TrainPlan

    assert store.shipped_key() == TrainPlan().key(), "the recipe changed: retrain and ship (mdl-edge train-toy --ship)"
    assert store.cached_toy_model(TrainPlan()) == (store.SHIPPED, True)


def test_recipe_key_follows_behaviour_not_comments() -> None:
    from mdl_edge.export.code_key import behaviour_text

    src = 'def f(x):\n    """Doc."""\n    return not x  # why\n'
    assert behaviour_text(src) == behaviour_text('def f(x):\n\n    # a comment\n    return not  x\n')
    assert behaviour_text(src) != behaviour_text('def f(x):\n    return x\n')
    assert behaviour_text('x = "a"\n') != behaviour_text('x = "b"\n')  # strings that are values count


@pytest.mark.slow
def test_recipe_reproduces_the_shipped_model(tmp_path) -> None:
    """The recipe, trained from scratch here (minutes), hears as well as the weights it shipped:
    on 200 held-out clips and 200 phrases of connected speech (PyTorch reference), within the
    spread of a retraining (0.03) of the shipped model's scores measured beside it."""
    from mdl_edge.export.reference.model import MiDashengLM
    from mdl_edge.export.toy import store
    from mdl_edge.export.toy.train import TrainPlan, train_toy

    def scores(model_dir) -> dict[str, dict[str, float]]:
        model = MiDashengLM.from_pretrained(model_dir)
        return toyworld.evaluate_both(lambda w, p: model.generate(w, p, max_new_tokens=48).text, 200, 200)

    shipped, present = store.cached_toy_model(TrainPlan())
    assert present and shipped == store.SHIPPED, "no shipped weights for this recipe (mdl-edge train-toy --ship)"
    fresh = scores(train_toy(tmp_path / "toy", TrainPlan(), progress=lambda m: print(m, flush=True)))
    want = scores(shipped)
    print("retrained:\n" + toyworld.format_scores(fresh) + "\nshipped:\n" + toyworld.format_scores(want))
    for split, key in (("held-out", "word_accuracy"), ("held-out", "caption_exact"), ("connected", "word_accuracy"),
                       ("connected", "phrase_exact")):
        assert fresh[split][key] >= want[split][key] - 0.03, (split, key, fresh[split][key], want[split][key])


def test_trained_checkpoint_is_an_ordinary_official_checkpoint(toy_dir, tmp_path) -> None:
    from mdl_edge.export.convert.checkpoint import Checkpoint
    from mdl_edge.export.synthetic.checkpoint import write_synthetic_checkpoint

    trained = Checkpoint(toy_dir)
    fresh = Checkpoint(write_synthetic_checkpoint("toy", tmp_path / "init"))
    assert {n: t.shape for n, t in trained.tensors.items()} == {n: t.shape for n, t in fresh.tensors.items()}
    assert trained.config.decoder.hidden_size >= 256  # k-quants get real 256-wide blocks
    cfg = json.loads((toy_dir / "config.json").read_text())
    from mdl_edge.export.toy.train import TrainPlan

    assert cfg["mdl_edge_synthetic"]["preset"] == "toy" and cfg["mdl_edge_synthetic"]["key"] == TrainPlan().key()


@pytest.mark.parametrize("pair", list(FLOORS))
def test_runtime_hears_held_out_clips(toy_bundle, held_out, pair) -> None:
    from mdl_edge.runtime.pipeline import AudioLM

    enc, dec = pair.split(" + ")
    with AudioLM(toy_bundle, encoder=enc, decoder=dec) as lm:
        m = toyworld.evaluate(_runtime_answer(lm), held_out)
    for key, floor in FLOORS[pair].items():
        assert m[key] >= floor, f"{pair}: {key} {m[key]:.3f} < {floor} ({m})"


@pytest.mark.parametrize("pair", list(FLOORS))
def test_runtime_hears_connected_speech(toy_bundle, pair) -> None:
    """Phrases spoken in one go, in accents and at speeds training never used, a third of them
    with words outside the vocabulary that must not be written."""
    from mdl_edge.runtime.pipeline import AudioLM

    enc, dec = pair.split(" + ")
    with AudioLM(toy_bundle, encoder=enc, decoder=dec) as lm:
        m = toyworld.evaluate_transcripts(_runtime_answer(lm), list(toyworld.clips("connected", N_CONNECTED, seed=777)))
    for key, floor in CONNECTED_FLOORS.items():
        assert m[key] >= floor, f"{pair}: {key} {m[key]:.3f} < {floor} ({m})"


def test_runtime_hears_telephone_speech(toy_bundle, held_out) -> None:
    """Speech as a G.711 telephone line brings it (8 kHz, 4 kHz of band), through the default
    variants: part of the recipe's training clips are such speech."""
    from mdl_edge.runtime.pipeline import AudioLM

    rng = np.random.default_rng(3)
    clips = [c for c in held_out + list(toyworld.clips("connected", 20, seed=777)) if c.transcript]
    with AudioLM(toy_bundle) as lm:
        answer = _runtime_answer(lm)
        heard = [answer(toyworld.telephone(c.wave, rng), TRANSCRIBE_PROMPT) for c in clips]
    acc = float(np.mean([toyworld.word_accuracy(h, c.transcript) for h, c in zip(heard, clips)]))
    print(f"telephone word accuracy {acc:.3f} on {len(clips)} clips")
    assert acc >= TELEPHONE_FLOOR, f"telephone word accuracy {acc:.3f} < {TELEPHONE_FLOOR} on {len(clips)} clips"


def test_runtime_hears_speech_over_noise_that_starts_after_quiet(toy_bundle, held_out) -> None:
    """Held-out clips over noise with 0.3 s of quiet before them, as a live utterance that opened
    on the noise's onset has them: a model never trained on such onsets wrote words for the onset
    (word accuracy 0.09 where the same clips whole scored 0.90)."""
    from mdl_edge.runtime.pipeline import AudioLM

    rng = np.random.default_rng(4)
    clips = [c for c in held_out + list(toyworld.clips("held-out", 120, seed=778)) if "over noise" in c.caption]
    with AudioLM(toy_bundle) as lm:
        answer = _runtime_answer(lm)
        heard = [answer(np.concatenate([(rng.standard_normal(toyworld.SR * 3 // 10) * 1e-4).astype(np.float32), c.wave]), TRANSCRIBE_PROMPT)
                 for c in clips]
    acc = float(np.mean([toyworld.word_accuracy(h, c.transcript) for h, c in zip(heard, clips)]))
    print(f"word accuracy over noise after quiet {acc:.3f} on {len(clips)} clips")
    assert acc >= ONSET_FLOOR, f"word accuracy over noise after quiet {acc:.3f} < {ONSET_FLOOR} on {len(clips)} clips"


@pytest.mark.parametrize("damage", ["shuffled in time", "dropped"])
def test_scrambled_audio_embeddings_are_not_heard(toy_bundle, held_out, monkeypatch, damage) -> None:
    """The same pipeline with the audio embeddings shuffled in time, or replaced by zeros, can no
    longer say what was said: the accuracy above comes from hearing. A shuffled 5 Hz embedding
    still carries a piece of a word, and the model still names some of them, in the wrong order:
    its word accuracy (order counts) falls to about half, its captions to almost none."""
    from mdl_edge.runtime.encoder import AudioEncoder
    from mdl_edge.runtime.pipeline import AudioLM

    embed_mel = AudioEncoder.embed_mel
    rng = np.random.default_rng(0)

    def damaged(self, *args, **kwargs):
        emb = embed_mel(self, *args, **kwargs)
        return emb[rng.permutation(emb.shape[0])] if damage == "shuffled in time" else np.zeros_like(emb)

    monkeypatch.setattr(AudioEncoder, "embed_mel", damaged)
    speech = [c for c in held_out if len(c.transcript.split()) >= 2]
    with AudioLM(toy_bundle, encoder="fp32", decoder="f32") as lm:
        m = toyworld.evaluate(_runtime_answer(lm), speech)
    limit = 0.6 if damage == "shuffled in time" else 0.3
    assert m["word_accuracy"] < limit and m["caption_exact"] < 0.3, m


def test_runtime_equals_reference_on_the_trained_model(toy_dir, toy_bundle, held_out) -> None:
    """Trained logits have real margins: fp32 ONNX + f32 GGUF give the reference's greedy tokens."""
    from mdl_edge.export.reference.model import MiDashengLM
    from mdl_edge.runtime.pipeline import AudioLM
    from mdl_edge.runtime.prompt import CAPTION_PROMPT

    ref = MiDashengLM.from_pretrained(toy_dir)
    options = GenerationOptions(max_new_tokens=48)
    with AudioLM(toy_bundle, encoder="fp32", decoder="f32") as lm:
        for c in held_out[:12]:
            for prompt in (CAPTION_PROMPT, TRANSCRIBE_PROMPT):
                want = ref.generate(c.wave, prompt, max_new_tokens=48)
                got = lm.generate(c.wave, prompt, options, sample_rate=toyworld.SR)
                assert got.token_ids == want.token_ids, f"{c.caption!r} [{prompt}]: {got.text!r} vs reference {want.text!r}"


def test_parity_report_shows_task_metrics(toy_dir, toy_bundle, capsys) -> None:
    from mdl_edge.runtime.cli import main

    assert main(["parity", str(toy_dir), "--bundle", str(toy_bundle), "--task-clips", "20", "--max-new-tokens", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    tasks = report["tasks"]
    assert set(tasks) == {"reference fp32 (PyTorch)", "fp32 + f32", "fp32 + Q4_K_M", "int8 + f32", "int8 + Q4_K_M"}
    ref = tasks["reference fp32 (PyTorch)"]
    for split in ("held-out", "connected"):
        assert tasks["fp32 + f32"][split]["word_accuracy"] == pytest.approx(ref[split]["word_accuracy"]), split
    assert all(0 <= v["held-out"]["caption_elements"] <= 1 and v["held-out"]["clips"] == 20 for v in tasks.values())
    assert all(0 <= v["connected"]["phrase_exact"] <= 1 and v["connected"]["clips"] == 20 for v in tasks.values())
