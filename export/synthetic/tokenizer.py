"""A real byte-level BPE tokenizer for synthetic checkpoints, laid out like the Qwen tokenizers.

Trained with ``tokenizers`` on a generated English corpus (deterministic for a seed), with the
Qwen2 pre-tokenizer regex, NFC normalisation and the MiDashengLM special tokens. For full-size
vocabularies the BPE vocabulary is padded with unreachable filler entries so that the special
tokens sit at their official ids (151643...), as in the Qwen2.5-Omni tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ...runtime.prompt import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, END_OF_TEXT, FALLBACK_CHAT_TEMPLATE, IM_END, IM_START, SPECIAL_TOKENS

#: The Qwen2 / Qwen3 pre-tokenizer split pattern (the "qwen2" pre-tokenizer of llama.cpp).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WORDS = """
a an the this that these those some many few one two three four five six seven eight nine ten
dog dogs cat cats bird birds car cars engine train bell bells door doors rain wind water river sea
wave waves thunder storm fire siren alarm phone voice voices man woman child children people crowd
baby music song piano guitar violin drum drums bass singer choir orchestra beat melody rhythm noise
speech speaker speakers talk talking talks speaks speaking laughs laughing cries crying shouts barks
barking meows chirps chirping sings singing plays playing rings ringing runs running walks walking
footsteps clapping applause engine motor vehicle truck bus airplane helicopter street city traffic
forest park room kitchen office hall stadium background foreground distance loud loudly soft softly
quiet quietly while and or with without then after before during near far in on at from to of by
is are was were be being has have had does do did will would can could should may might
high low fast slow short long clear muffled distorted recording quality audio sound sounds heard
caption describe describes describing transcribe transcription language english chinese question
answer what which who where when why how gender instrument genre scene environment label labels
"""


def _corpus(seed: int, n_sentences: int) -> list[str]:
    rng = random.Random(seed)
    words = _WORDS.split()
    prompts = [
        "Caption the audio.",
        "Transcribe the speech into text",
        "What gender is the speaker?",
        "Which labels describe the sound?",
        "Write an audio caption describing the sound",
        "What is happening in this audio? Provide a brief caption within 15 words.",
    ]
    lines = list(prompts)
    for _ in range(n_sentences):
        n = rng.randint(4, 16)
        s = " ".join(rng.choice(words) for _ in range(n))
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ",", "?", "!"])
        if rng.random() < 0.1:
            s += f" {rng.randint(0, 9999)}"
        lines.append(s)
    return lines


def _filler_words(taken: set[str]):
    """Pseudo-words (" kalomi", ...) in byte-level form, none already in the vocabulary.

    They fill the id range up to the official special-token ids; no merge produces them, but a
    random model that samples them prints readable nonsense instead of placeholder markup."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    n = len(syllables)
    i = 0
    while True:
        word = "\u0120" + syllables[i % n] + syllables[(i // n) % n] + syllables[(i // n // n) % n] + ("" if i < n**3 else str(i // n**3))
        i += 1
        if word not in taken:
            yield word


def build_tokenizer(*, base_vocab: int, special_start: int, seed: int, corpus: tuple[str, ...] = ()):
    """Train the BPE (at most ``base_vocab`` entries) and place the specials from ``special_start``;
    ``corpus`` lines are added to the generated corpus (repeated, so their words become tokens).

    Returns a ``tokenizers.Tokenizer``. ``special_start >= base_vocab``; the gap, if any, is filled
    with filler vocabulary entries that no merge produces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, min_frequency=2
    )
    tok.train_from_iterator(_corpus(seed, 20_000) + list(corpus) * 20, trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    if len(vocab) > special_start:
        raise ValueError(f"trained vocabulary ({len(vocab)}) overlaps the special-token ids ({special_start})")
    for i, word in zip(range(len(vocab), special_start), _filler_words(set(vocab))):
        vocab[word] = i
    data["added_tokens"] = [
        {"id": special_start + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    ]
    out = Tokenizer.from_str(json.dumps(data))
    for i, t in enumerate(SPECIAL_TOKENS):
        if out.token_to_id(t) != special_start + i:
            raise AssertionError(f"{t} landed at id {out.token_to_id(t)}, not {special_start + i}")
    return out


def write_tokenizer_files(out_dir: Path, *, base_vocab: int, special_start: int, seed: int, model_max_length: int,
                          corpus: tuple[str, ...] = ()) -> None:
    """Write tokenizer.json, tokenizer_config.json, added_tokens.json, special_tokens_map.json, chat_template.jinja."""
    tok = build_tokenizer(base_vocab=base_vocab, special_start=special_start, seed=seed, corpus=corpus)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: special_start + i for i, t in enumerate(SPECIAL_TOKENS)}
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t, i in ids.items()
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS],
        "audio_token": AUDIO_TOKEN,
        "audio_bos_token": AUDIO_BOS,
        "audio_eos_token": AUDIO_EOS,
        "bos_token": None,
        "chat_template": FALLBACK_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": END_OF_TEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "added_tokens.json").write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
    special_map = {"eos_token": IM_END, "pad_token": END_OF_TEXT, "additional_special_tokens": config["additional_special_tokens"]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(FALLBACK_CHAT_TEMPLATE, encoding="utf-8")
