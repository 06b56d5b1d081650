"""Prompts: the checkpoint's chat template, tokenization, and audio-placeholder expansion (torch-free).

Product decisions 2-3: the prompt is the checkpoint's own chat template rendered with jinja2 the
way Hugging Face's ``apply_chat_template`` renders it (sandboxed), then every single ``<|AUDIO|>``
is expanded to one placeholder per audio token (spec §3.2). The expanded ids and the audio
embeddings become the decoder's input, text and audio :class:`Segment` runs (:func:`split_prompt`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import CheckpointError, ConfigError, OptionError, one_line

logger = logging.getLogger("mdl_edge")

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)

#: ChatML with audio items as ``<|audio_bos|><|AUDIO|><|audio_eos|>`` and no injected system turn.
#: Only a fallback for checkpoints that ship no template (and what synthetic checkpoints ship).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'audio' or 'audio' in item or 'audio_url' in item %}"
    "{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# Product decision 5: the prompts of the paper's evaluation (spec §5.5).
CAPTION_PROMPT = "Caption the audio."
TRANSCRIBE_PROMPT = "Transcribe the speech into text"
_LANGUAGE = re.compile(r"[a-z]{2,3}")  # the model's language tags are short codes: <|en|>, <|zh|>, <|yue|>


def transcribe_prompt(language: str | None = None) -> str:
    """The transcription prompt, with `` <|xx|>`` when a language code (``"en"``, ``"zh"``) is given."""
    if language is None:
        return TRANSCRIBE_PROMPT
    if not isinstance(language, str) or not _LANGUAGE.fullmatch(language):
        raise OptionError("language", f"must be a short language code such as en, zh or yue, got {language!r}")
    return f"{TRANSCRIBE_PROMPT} <|{language}|>"


def question_prompt(question: str) -> str:
    """A question as the prompt, refused when empty (the model would answer nothing in particular)."""
    if not isinstance(question, str) or not question.strip():
        raise OptionError("question", f"must be a non-empty question, got {question!r}")
    return question


def user_message(text: str, *, audio_first: bool = False) -> list[dict[str, Any]]:
    """The default conversation: one user turn ``[text, audio]`` (or ``[audio, text]``)."""
    items: list[dict[str, Any]] = [{"type": "text", "text": text}, {"type": "audio"}]
    if audio_first:
        items.reverse()
    return [{"role": "user", "content": items}]


def _compile(template: str) -> Any:
    """Compile a chat template in jinja2's immutable sandbox, with Hugging Face's helpers."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens a MiDashengLM prompt uses."""

    audio: int
    audio_bos: int
    audio_eos: int
    im_end: int
    end_of_text: int


class PromptFormat:
    """Tokenizer + chat template of one checkpoint: messages and audio lengths in, token ids out."""

    def __init__(self, tokenizer: Any, chat_template: str, *, stop_ids: Sequence[int] = (), source: str = "tokenizer") -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.source = source
        ids = {}
        for tok in SPECIAL_TOKENS:
            i = tokenizer.token_to_id(tok)
            if i is None:
                raise CheckpointError(f"{source}: the tokenizer has no {tok} token (not a MiDashengLM tokenizer?)")
            ids[tok] = i
        self.special = SpecialIds(ids[AUDIO_TOKEN], ids[AUDIO_BOS], ids[AUDIO_EOS], ids[IM_END], ids[END_OF_TEXT])
        self.stop_ids = tuple(dict.fromkeys([self.special.im_end, self.special.end_of_text, *stop_ids]))
        try:
            self._template = _compile(chat_template)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise CheckpointError(f"{source}: the chat template does not compile: {one_line(e)}") from e

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "PromptFormat":
        """Load ``tokenizer.json``, the chat template and eos ids from a Hugging Face model folder.

        The template is looked up in ``chat_template.jinja``, then ``chat_template.json``, then
        ``tokenizer_config.json``; the built-in ChatML fallback is used only if none has one.
        """
        from tokenizers import Tokenizer

        d = Path(model_dir)
        tok_path = d / "tokenizer.json"
        if not tok_path.is_file():
            raise CheckpointError(f"{tok_path}: not found (the model folder needs a Hugging Face tokenizer.json)")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:
            raise CheckpointError(f"{tok_path}: not a valid tokenizers file: {one_line(e)}") from e
        template = _find_chat_template(d)
        stop_ids: list[int] = []
        gen_path = d / "generation_config.json"
        if gen_path.is_file():
            eos = _read_json(gen_path).get("eos_token_id")
            eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else []
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_list):
                raise CheckpointError(f"{gen_path}: eos_token_id must be an int or a list of ints, got {eos!r}")
            stop_ids += eos_list
        return cls(tokenizer, template, stop_ids=stop_ids, source=str(d))

    def check(self) -> None:
        """Render the default conversation once, so that a template that fails, or loses the
        audio placeholder, is refused when a model is opened rather than on every request."""
        try:
            self.encode(user_message("probe"), [1])
        except ConfigError as e:
            raise CheckpointError(f"{self.source}: the chat template does not render the default conversation: {one_line(e)}") from e

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (text, with one ``<|AUDIO|>`` per audio item)."""
        import jinja2

        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token="",
                eos_token=IM_END,
                pad_token=END_OF_TEXT,
                audio_token=AUDIO_TOKEN,
                audio_bos_token=AUDIO_BOS,
                audio_eos_token=AUDIO_EOS,
            )
        except jinja2.exceptions.SecurityError as e:
            raise CheckpointError(f"{self.source}: the chat template tried an unsafe operation and was stopped: {one_line(e)}") from e
        except jinja2.exceptions.TemplateError as e:
            raise CheckpointError(f"{self.source}: the chat template failed to render: {one_line(e)}") from e
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError) as e:
            # the sandbox refuses some operations with plain Python errors (an over-long range()
            # raises OverflowError); a template is data, so any of them is the template's fault
            raise CheckpointError(f"{self.source}: the chat template failed to render: {type(e).__name__}: {one_line(e)}") from e

    def encode(self, messages: Sequence[dict[str, Any]], n_audio_tokens: Sequence[int], *, add_generation_prompt: bool = True) -> list[int]:
        """Render, tokenize and expand each ``<|AUDIO|>`` to ``n_audio_tokens[i]`` placeholders."""
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return expand_audio_placeholders(ids, n_audio_tokens, self.special)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids to text, special tokens skipped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def on_llama_vocab(self, vocab: Any) -> "PromptFormat":
        """This format tokenizing with a llama.cpp model's own vocabulary (``vocab``: see
        :class:`LlamaVocabTokenizer`) where that gives the same ids as this tokenizer on
        :data:`VOCAB_PROBE` and the same special tokens; otherwise this format itself.

        A runtime whose decoder is llama.cpp then holds one vocabulary, not two (the
        ``tokenizers`` one is ~20-50 MB resident)."""
        theirs = LlamaVocabTokenizer(vocab)
        for text in VOCAB_PROBE:
            ours = self.tokenizer.encode(text, add_special_tokens=False).ids
            if theirs.encode(text).ids != ours:
                logger.info("%s: llama.cpp's vocabulary tokenizes %r otherwise; prompts keep tokenizer.json", self.source, text[:40])
                return self
        try:
            other = PromptFormat(theirs, self.chat_template, stop_ids=self.stop_ids, source=self.source)
        except CheckpointError:
            return self
        return other if (other.special, other.stop_ids) == (self.special, self.stop_ids) else self


# Texts a llama.cpp vocabulary must tokenize exactly as the checkpoint's tokenizer before it
# replaces it (:meth:`PromptFormat.on_llama_vocab`): every class of the Qwen pre-tokenizer's
# pattern (letters, digits in threes, contractions, punctuation, whitespace runs and newlines,
# accents, CJK, emoji) and the special tokens a prompt holds.
VOCAB_PROBE = (
    "Caption the audio.",
    "Transcribe the speech into text <|en|>",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "What sound is heard?<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n<|im_start|>assistant\n",
    "A dog barks twice, then a car passes by in the rain... 12345 6.78 1,000,000 3rd 2024-05-06",
    "  leading spaces\tand tabs\n\n\nnewlines   \r\n trailing ",
    "Unicode: café naïve Ünïcödé 北京 汉字 日本語の音声 한국어 😀👍🏽 — “quotes” «guillemets» and 'apostrophes' it's we're I'LL",
    "MIXED case WORDS, punctuation!?;: (brackets) [more] {braces} <tags> a/b\\c @#$%^&*_+=|~`",
    "<|endoftext|><|im_end|> spoken:\u00a0non-breaking\u2009thin space",
)


class LlamaVocabTokenizer:
    """A llama.cpp model's own vocabulary behind the few calls :class:`PromptFormat` makes of a
    ``tokenizers`` tokenizer (``token_to_id``, ``encode(...).ids``, ``decode``). ``vocab``: an
    object with llama.cpp's ``tokenize(text, special=True)`` and ``piece(id)``
    (:class:`~mdl_edge.runtime.decoder.LlamaDecoder`)."""

    @dataclass(frozen=True)
    class Encoding:
        ids: list[int]

    def __init__(self, vocab: Any) -> None:
        self.vocab = vocab

    def token_to_id(self, token: str) -> int | None:
        ids = self.vocab.tokenize(token, special=True)
        return ids[0] if len(ids) == 1 else None

    def encode(self, text: str, add_special_tokens: bool = False) -> "LlamaVocabTokenizer.Encoding":
        return self.Encoding(self.vocab.tokenize(text, special=True))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.vocab.piece(int(i)) for i in ids).decode("utf-8", errors="replace")


def expand_audio_placeholders(ids: Sequence[int], n_audio_tokens: Sequence[int], special: SpecialIds) -> list[int]:
    """Replace the i-th ``<|AUDIO|>`` with ``n_audio_tokens[i]`` copies (HF processor rule, spec §3.2).

    A placeholder with neither an adjacent ``<|audio_bos|>`` before it nor ``<|audio_eos|>`` after it
    is wrapped in the pair; otherwise the existing markers are kept as they are.
    """
    positions = [i for i, t in enumerate(ids) if t == special.audio]
    if len(positions) != len(n_audio_tokens):
        raise ConfigError(f"the prompt has {len(positions)} audio placeholder(s) but {len(n_audio_tokens)} audio clip(s) were given")
    out: list[int] = []
    start = 0
    for pos, n in zip(positions, n_audio_tokens):
        if n < 0:
            raise ConfigError(f"audio token count must be >= 0, got {n}")
        out += ids[start:pos]
        wrap = not (pos > 0 and ids[pos - 1] == special.audio_bos) and not (pos + 1 < len(ids) and ids[pos + 1] == special.audio_eos)
        out += ([special.audio_bos] if wrap else []) + [special.audio] * n + ([special.audio_eos] if wrap else [])
        start = pos + 1
    return out + list(ids[start:])


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model folder's file (tokenizer_config, generation_config, ...)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not readable as JSON: {one_line(e)}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got a {type(obj).__name__}")
    return obj


def _find_chat_template(d: Path) -> str:
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = d / name
        if path.is_file():
            template = _read_json(path).get("chat_template")
            if isinstance(template, str):
                return template
            if template is not None:
                raise CheckpointError(f"{path}: chat_template must be a string, got {type(template).__name__}")
    return FALLBACK_CHAT_TEMPLATE


# -- the prompt as the decoder takes it: text and audio segments ------------------------------------
@dataclass(frozen=True)
class Segment:
    """A run of prompt input: text token ids, or audio embeddings ``[n, hidden]``."""

    tokens: tuple[int, ...] = ()
    embeddings: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens) if self.embeddings is None else int(self.embeddings.shape[0])


def split_prompt(ids: Sequence[int], audio: Sequence[np.ndarray], audio_token_id: int) -> list[Segment]:
    """Prompt ids with ``<|AUDIO|>`` runs -> alternating token and embedding segments.

    The i-th run of placeholders takes ``audio[i]``; its length must match."""
    segments: list[Segment] = []
    run: list[int] = []
    k = 0
    i = 0
    while i < len(ids):
        if ids[i] != audio_token_id:
            run.append(ids[i])
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == audio_token_id:
            j += 1
        if k >= len(audio):
            raise ConfigError("the prompt has more audio placeholder runs than audio clips")
        emb = np.ascontiguousarray(audio[k], dtype=np.float32)
        if emb.shape[0] != j - i:
            raise ConfigError(f"audio clip {k} has {emb.shape[0]} embeddings but its placeholder run has {j - i} tokens")
        if run:
            segments.append(Segment(tokens=tuple(run)))
            run = []
        segments.append(Segment(embeddings=emb))
        k += 1
        i = j
    if run:
        segments.append(Segment(tokens=tuple(run)))
    if k != len(audio):
        raise ConfigError(f"{len(audio)} audio clips given but the prompt has {k} placeholder runs")
    return segments


def same_segment(a: Segment, b: Segment) -> bool:
    """Whether two prompt segments put the same rows in the KV cache: the same text tokens, or
    the same clip's embeddings."""
    if (a.embeddings is None) != (b.embeddings is None):
        return False
    if a.embeddings is None:
        return a.tokens == b.tokens
    return a.embeddings is b.embeddings or (a.embeddings.shape == b.embeddings.shape and bool(np.array_equal(a.embeddings, b.embeddings)))
