"""Chat-template rendering, placeholder expansion and the template sandbox."""

from __future__ import annotations

import json
import shutil

import pytest

from mdl_edge.runtime.errors import CheckpointError
from mdl_edge.runtime.prompt import FALLBACK_CHAT_TEMPLATE, PromptFormat, SpecialIds, expand_audio_placeholders, user_message

S = SpecialIds(audio=9, audio_bos=7, audio_eos=8, im_end=2, end_of_text=0)


def test_default_message_renders_chatml(tiny_dir) -> None:
    fmt = PromptFormat.from_dir(tiny_dir)
    text = fmt.render(user_message("Caption the audio."))
    assert text == "<|im_start|>user\nCaption the audio.<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n<|im_start|>assistant\n"
    assert fmt.render(user_message("Q?", audio_first=True)).startswith("<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Q?")


def test_renders_like_transformers_apply_chat_template(tiny_dir) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tiny_dir / "tokenizer.json"))
    messages = [{"role": "system", "content": "Be brief."}, *user_message("What sound is heard?")]
    ours = PromptFormat.from_dir(tiny_dir).render(messages)
    assert ours == hf.apply_chat_template(messages, chat_template=FALLBACK_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)


def test_encode_expands_the_placeholder(tiny_dir) -> None:
    fmt = PromptFormat.from_dir(tiny_dir)
    ids = fmt.encode(user_message("Caption the audio."), [7])
    sp = fmt.special
    i = ids.index(sp.audio_bos)
    assert ids[i + 1 : i + 8] == [sp.audio] * 7 and ids[i + 8] == sp.audio_eos and ids.count(sp.audio) == 7
    assert fmt.decode(ids).startswith("user\nCaption the audio.")


@pytest.mark.parametrize(
    "ids,n,expected",
    [
        ([1, 7, 9, 8, 2], [3], [1, 7, 9, 9, 9, 8, 2]),  # already wrapped: kept
        ([1, 9, 2], [2], [1, 7, 9, 9, 8, 2]),  # bare: wrapped
        ([7, 9, 3], [1], [7, 9, 3]),  # bos only: not wrapped again
        ([9, 8], [2], [9, 9, 8]),  # eos only
        ([9, 5, 9], [1, 2], [7, 9, 8, 5, 7, 9, 9, 8]),  # two clips in order
    ],
)
def test_expand_rule(ids, n, expected) -> None:
    assert expand_audio_placeholders(ids, n, S) == expected


def test_placeholder_count_must_match() -> None:
    with pytest.raises(ValueError, match="1 audio placeholder.*2 audio clip"):
        expand_audio_placeholders([9], [1, 1], S)


def test_template_from_tokenizer_config_and_sandbox(tiny_dir, tmp_path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0]['content'] }}!"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert PromptFormat.from_dir(d).render([{"role": "user", "content": "hi"}]) == "hi!"
    # a template reaching for Python internals is stopped (cf. CVE-2024-34359)
    cfg["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsafe"):
        PromptFormat.from_dir(d).render([{"role": "user", "content": "hi"}])


def test_tokenizer_without_audio_tokens_is_refused(tiny_dir, tmp_path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|AUDIO|>"]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match=r"no <\|AUDIO\|> token"):
        PromptFormat.from_dir(d)


def test_missing_tokenizer_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.json: not found"):
        PromptFormat.from_dir(tmp_path)


def test_prompts_use_the_decoders_vocabulary_where_it_agrees(bundle, caplog) -> None:
    """A bundle opened as AudioLM tokenizes prompts with llama.cpp's own vocabulary (one
    vocabulary in memory, not two), giving the tokenizer.json ids on the probe texts and on real
    prompts; a vocabulary that disagrees on any probe leaves tokenizer.json in place."""
    import logging

    from mdl_edge.runtime.pipeline import AudioLM
    from mdl_edge.runtime.prompt import VOCAB_PROBE, LlamaVocabTokenizer, question_prompt, transcribe_prompt

    with AudioLM(bundle, threads=1) as lm:
        fmt, original = lm.prompt, PromptFormat.from_dir(bundle)
        assert isinstance(fmt.tokenizer, LlamaVocabTokenizer) and lm.bundle.prompt is fmt
        assert (fmt.special, fmt.stop_ids) == (original.special, original.stop_ids)
        texts = [*VOCAB_PROBE, "Tiếng Việt, Ελληνικά, עברית, हिन्दी 1234567 --- ..."]
        for text in texts:
            assert fmt.tokenizer.encode(text).ids == original.tokenizer.encode(text, add_special_tokens=False).ids, text
        for prompt in ("Caption the audio.", transcribe_prompt("en"), question_prompt("Is it raining?  Twice!")):
            assert fmt.encode(user_message(prompt), [5]) == original.encode(user_message(prompt), [5]), prompt
        ids = original.tokenizer.encode("a dog barks, 3 times", add_special_tokens=False).ids
        assert fmt.decode(ids) == original.decode(ids) == "a dog barks, 3 times"

        class Odd:  # a vocabulary that splits digits one by one
            def tokenize(self, text: str, *, special: bool = True) -> list[int]:
                ids = lm.decoder.tokenize(text, special=special)
                return ids + [0] if any(c.isdigit() for c in text) else ids

            def piece(self, token: int) -> bytes:
                return lm.decoder.piece(token)

        with caplog.at_level(logging.INFO, logger="mdl_edge"):
            assert original.on_llama_vocab(Odd()) is original
        assert "prompts keep tokenizer.json" in caplog.text
    # the vocabulary went with the model: a closed AudioLM says so instead of reading freed memory
    from mdl_edge.runtime.errors import MdlEdgeError

    with pytest.raises(MdlEdgeError, match="the decoder is closed"):
        lm.prompt.encode(user_message("Caption the audio."), [5])
