"""Decoder loading, embedding merge and greedy generation against transformers' own forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mdl_edge.runtime import constants as C

from conftest import assert_close


def independent_decoder(model_dir: Path):
    """transformers' model built the ordinary way (random init, then load_state_dict) from the
    decoder.* tensors and text_config, without any mdl-edge code."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    text = json.loads((model_dir / "config.json").read_text())["text_config"]
    kwargs = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "rope_scaling", "torch_dtype")}
    qwen3 = text["model_type"] == "qwen3"
    model = (Qwen3ForCausalLM if qwen3 else Qwen2ForCausalLM)((Qwen3Config if qwen3 else Qwen2Config)(**kwargs))
    state = {k[len("decoder."):]: v for k, v in load_file(model_dir / "model.safetensors").items() if k.startswith("decoder.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("which", ["tiny", "tiny_qwen2"])
def test_logits_equal_transformers_inputs_embeds(which: str, request) -> None:
    model = request.getfixturevalue(f"{which}_model")
    ref = independent_decoder(request.getfixturevalue(f"{which}_dir"))
    wave = (np.random.default_rng(3).standard_normal(3 * C.SAMPLE_RATE) * 0.1).astype(np.float32)
    (audio,) = model.encode_audio([wave])
    ids = model.prompt.encode([{"role": "user", "content": [{"type": "text", "text": "Caption the audio."}, {"type": "audio"}]}], [audio.shape[0]])
    with torch.inference_mode():
        # the merge written out independently: embedding rows, audio rows in placeholder order
        ids_t = torch.tensor(ids)
        emb = ref.get_input_embeddings()(ids_t).clone()
        emb[ids_t == model.cfg.audio_token_id] = audio
        expected = ref(inputs_embeds=emb[None]).logits[0]
        got = model.decoder(inputs_embeds=model.embed_prompt(ids, [audio])[None]).logits[0]
    assert (ids_t == model.cfg.audio_token_id).sum() == audio.shape[0] == 15
    assert_close(got, expected, atol=1e-5, rtol=1e-5, what=f"{which} decoder logits")


def test_tied_and_untied_heads(tiny_model, tiny_qwen2_model) -> None:
    assert tiny_model.decoder.lm_head.weight.data_ptr() == tiny_model.decoder.model.embed_tokens.weight.data_ptr()
    assert tiny_qwen2_model.decoder.lm_head.weight.data_ptr() != tiny_qwen2_model.decoder.model.embed_tokens.weight.data_ptr()
    # Qwen2 carries q/k/v biases, Qwen3 q/k norms
    assert tiny_qwen2_model.decoder.model.layers[0].self_attn.q_proj.bias is not None
    assert hasattr(tiny_model.decoder.model.layers[0].self_attn, "q_norm")


def _clip(seconds: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(5).standard_normal(int(seconds * C.SAMPLE_RATE)) * 0.1).astype(np.float32)


def test_greedy_generation_is_deterministic(tiny_qwen2_model) -> None:
    a = tiny_qwen2_model.generate(_clip(), "Caption the audio.", max_new_tokens=12)
    b = tiny_qwen2_model.generate(_clip(), "Caption the audio.", max_new_tokens=12)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.n_audio_tokens == 10


def test_greedy_equals_full_recompute(tiny_qwen2_model) -> None:
    """The KV-cached loop picks the argmax of a fresh full forward at every step."""
    m = tiny_qwen2_model
    res = m.generate(_clip(), "Caption the audio.", max_new_tokens=8)
    (audio,) = m.encode_audio([_clip()])
    ids = list(res.prompt_ids)
    with torch.inference_mode():
        for tok in res.token_ids:
            emb = m.embed_prompt(ids, [audio])
            assert int(m.decoder(inputs_embeds=emb[None]).logits[0, -1].argmax()) == tok
            ids.append(tok)


def test_stops_on_a_stop_token(tiny_qwen2_model) -> None:
    m = tiny_qwen2_model
    free = m.generate(_clip(), "Caption the audio.", max_new_tokens=10)
    assert free.stop_reason == "max_new_tokens" and len(free.token_ids) == 10
    k = next(i for i in range(1, 10) if free.token_ids[i] not in free.token_ids[:i])
    (audio,) = m.encode_audio([_clip()])
    emb = m.embed_prompt(list(free.prompt_ids), [audio])
    tokens, reason, _ = m.generate_from_embeds(emb, max_new_tokens=10, stop_ids=[free.token_ids[k]])
    assert reason == "stop_token" and tuple(tokens) == free.token_ids[:k]


@pytest.mark.parametrize("stop", ["<|im_end|>", "<|endoftext|>"])
def test_default_stop_tokens(tiny_qwen2_model, stop: str) -> None:
    """Force the stop token's logit at step 3: generation ends there, without emitting it."""
    m = tiny_qwen2_model
    stop_id = m.prompt.tokenizer.token_to_id(stop)
    free = m.generate(_clip(), "Caption the audio.", max_new_tokens=6)
    calls = {"n": 0}

    def boost(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 4:  # prefill + 2 decode steps -> the 4th call picks token 3
            output[..., stop_id] += 1e4
        return output

    handle = m.decoder.lm_head.register_forward_hook(boost)
    try:
        res = m.generate(_clip(), "Caption the audio.", max_new_tokens=6)
    finally:
        handle.remove()
    assert res.stop_reason == "stop_token"
    assert res.token_ids == free.token_ids[:3]
