"""The parity report: the full-precision PyTorch reference against every variant of a bundle.

Per clip and variant: log-mel max error, encoder-feature and embedding cosine / relative error,
decoder logit KL divergence and top-1 agreement (teacher-forced on the reference's greedy
output, fed the reference's audio embeddings so only the decoder differs), and the end-to-end
greedy output of each encoder x decoder pair against the reference (exact match, first
divergence). Sizes on disk come from the bundle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...runtime import constants as C
from ...runtime.audio import demo_clip, load_audio
from ...runtime.bundle import Bundle
from ...runtime.prompt import Segment, split_prompt
from ...runtime.mel import log_mel
from ...runtime.options import DecoderOptions, EncoderOptions
from ...runtime.prompt import CAPTION_PROMPT, user_message
from .model import MiDashengLM

logger = logging.getLogger("mdl_edge")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


@dataclass
class ClipRef:
    name: str
    wave: np.ndarray
    mel: np.ndarray
    feats: np.ndarray
    emb: np.ndarray
    ids: list[int]
    tokens: list[int]
    logits: np.ndarray  # [len(tokens) + 1, vocab] at the positions that predict each output token


def default_clips() -> list[tuple[str, np.ndarray]]:
    """Generated clips of 3, 12 and 25 s (the longer ones cross 10.08 s chunk boundaries)."""
    return [(f"generated {s:g} s", demo_clip(s, seed=i)) for i, s in enumerate((3.0, 12.0, 25.0))]


def reference_clips(model: MiDashengLM, clips: list[tuple[str, np.ndarray]], max_new_tokens: int) -> list[ClipRef]:
    out = []
    for name, wave in clips:
        with torch.inference_mode():
            mel, lengths = model.log_mel([wave])
            feats = model.audio_encoder(mel, lengths)
            (emb,) = model.project(feats, lengths)
            ids = model.prompt.encode(user_message(CAPTION_PROMPT), [emb.shape[0]])
            embeds = model.embed_prompt(ids, [emb])
            tokens, _, _ = model.generate_from_embeds(embeds, max_new_tokens=max_new_tokens, stop_ids=model.prompt.stop_ids)
            full = torch.cat([embeds, model.decoder.get_input_embeddings()(torch.tensor(tokens, dtype=torch.long, device=embeds.device))])
            logits = model.decoder(inputs_embeds=full[None]).logits[0, len(ids) - 1 :].float().cpu().numpy()
        out.append(ClipRef(name, wave, mel[0].cpu().numpy(), feats[0].cpu().numpy(), emb.cpu().numpy(), ids, tokens, logits))
    return out


def is_toy_model(checkpoint_dir: str | Path) -> bool:
    """Whether a checkpoint is the toy model trained on the toy world (its tasks can be scored)."""
    import json

    try:
        cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (cfg.get("mdl_edge_synthetic") or {}).get("preset") == "toy" and "plan" in cfg["mdl_edge_synthetic"]


def task_metrics(checkpoint_dir: str | Path, bundle_dir: str | Path, *, n_clips: int = 100, threads: int | None = None,
                 device: str = "cpu", model: MiDashengLM | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """What each encoder x decoder pair costs in what users see, beside the reference: word
    accuracy, caption exact match and caption element accuracy on ``n_clips`` held-out toy-world
    clips, and word accuracy and phrase exact match on as many clips of connected speech
    (``{pair: {"held-out": ..., "connected": ...}}``)."""
    from ...runtime.options import GenerationOptions
    from ...runtime.pipeline import AudioLM
    from ..toy import world as toyworld

    model = model or MiDashengLM.from_pretrained(checkpoint_dir, device=device)
    out = {"reference fp32 (PyTorch)": toyworld.evaluate_both(lambda w, p: model.generate(w, p, max_new_tokens=48).text, n_clips, n_clips)}
    bundle = Bundle.open(bundle_dir)
    options = GenerationOptions(max_new_tokens=48)
    for ename in bundle.manifest.encoder.variants:
        for dname in bundle.manifest.decoder.variants:
            with AudioLM(bundle_dir, encoder=ename, decoder=dname, threads=threads) as lm:
                out[f"{ename} + {dname}"] = toyworld.evaluate_both(
                    lambda w, p: lm.generate(w, p, options, sample_rate=toyworld.SR).text, n_clips, n_clips)
    return out


def parity_report(checkpoint_dir: str | Path, bundle_dir: str | Path, *, device: str = "cpu", audio: list[str] | None = None,
                  max_new_tokens: int = 32, threads: int | None = None, task_clips: int | None = None) -> dict[str, Any]:
    """Compare the reference with every encoder and decoder variant of ``bundle_dir``; on the
    toy model (or with ``task_clips``) also score each pair's captions and transcripts."""
    bundle = Bundle.open(bundle_dir)
    model = MiDashengLM.from_pretrained(checkpoint_dir, device=device)
    clips = [(p, load_audio(p)) for p in audio] if audio else default_clips()
    refs = reference_clips(model, clips, max_new_tokens)
    audio_id = model.cfg.audio_token_id
    report: dict[str, Any] = {"device": device, "clips": [r.name for r in refs], "mel": [], "encoder": {}, "decoder": {}, "decoder_default": {}, "end_to_end": {}}
    acoustic_mels = int(model.cfg.encoder.acoustic_mels or 0)
    if acoustic_mels:
        report["acoustic_mel"] = []
    for r in refs:
        err = np.abs(log_mel(r.wave, acoustic_mels=acoustic_mels) - r.mel)
        report["mel"].append(float(err[: C.N_MELS].max()))
        if acoustic_mels:
            report["acoustic_mel"].append(float(err[C.N_MELS :].max()))
    encoders = {}
    for name, variant in bundle.manifest.encoder.variants.items():
        _, enc = bundle.load_encoder(EncoderOptions(variant=name), threads=threads)
        feats = [enc.encode_mels([enc.log_mel(r.wave)], [r.wave.size])[0] for r in refs]
        embs = [enc.project(f) for f in feats]
        fc = np.concatenate([_cos(f, r.feats) for f, r in zip(feats, refs)])
        ec = np.concatenate([_cos(e, r.emb) for e, r in zip(embs, refs)])
        report["encoder"][name] = {
            "feature_cosine_mean": float(fc.mean()), "feature_cosine_min": float(fc.min()),
            "feature_rel_max_error": max(float(np.abs(f - r.feats).max() / np.abs(r.feats).max()) for f, r in zip(feats, refs)),
            "embedding_cosine_mean": float(ec.mean()), "embedding_cosine_min": float(ec.min()),
            "bytes": _size(bundle.file(variant.file)),
        }
        encoders[name] = embs
    n_ctx = max(1024, max(len(r.ids) for r in refs) + max_new_tokens + 8)

    def drift(dec: Any) -> dict[str, float]:
        """Teacher-forced logit KL and top-1 agreement of a decoder against the reference."""
        kls, agree = [], []
        for r in refs:
            segs = split_prompt(r.ids, [r.emb], audio_id)
            for k in range(len(r.tokens) + 1):
                dec.evaluate(segs + [Segment(tokens=(t,)) for t in r.tokens[:k]])
                q = dec.logits()
                p = r.logits[k, : q.size]
                lp, lq = _log_softmax(p), _log_softmax(q)
                kls.append(float((np.exp(lp) * (lp - lq)).sum()))
                agree.append(bool(p.argmax() == q.argmax()))
        return {"logit_kl_mean": float(np.mean(kls)), "logit_kl_max": float(np.max(kls)), "top1_agreement": float(np.mean(agree)),
                "bytes": dec.path.stat().st_size, "prompt_by": "int8 engine" if dec.prefill is not None else "llama.cpp"}

    for dname in bundle.manifest.decoder.variants:
        # the runtime's default speed settings (f16 KV cache, flash attention) next to parity mode
        _, fast = bundle.load_decoder(DecoderOptions(variant=dname, n_ctx=n_ctx), threads=threads)
        with fast:
            fast_drift = drift(fast)
        _, dec = bundle.load_decoder(DecoderOptions(variant=dname, n_ctx=n_ctx, f32_kv=True), threads=threads)
        with dec:
            report["decoder"][dname] = drift(dec)  # parity mode: f32 KV, no flash attention
            report["decoder_default"][dname] = fast_drift
            for ename, embs in encoders.items():
                matches, firsts = [], []
                for r, emb in zip(refs, embs):
                    ids = model.prompt.encode(user_message(CAPTION_PROMPT), [emb.shape[0]])
                    res = dec.generate(split_prompt(ids, [emb], audio_id), max_new_tokens=max_new_tokens, stop_ids=model.prompt.stop_ids).result()
                    got = list(res.token_ids)
                    matches.append(got == r.tokens)
                    firsts.append(next((i for i, (a, b) in enumerate(zip(got, r.tokens)) if a != b), None if len(got) == len(r.tokens) else min(len(got), len(r.tokens))))
                report["end_to_end"][f"{ename} + {dname}"] = {"exact_match_rate": float(np.mean(matches)), "first_divergence": firsts}
    n_tasks = task_clips if task_clips is not None else (100 if is_toy_model(checkpoint_dir) else 0)
    if n_tasks:
        report["tasks"] = task_metrics(checkpoint_dir, bundle_dir, n_clips=n_tasks, threads=threads, model=model)
    return report


def _size(onnx_path: Path) -> int:
    data = onnx_path.with_name(onnx_path.name + ".data")
    return onnx_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables of a parity report."""
    lines = [f"reference: PyTorch fp32 on {report['device']}; clips: {', '.join(report['clips'])}",
             f"log-mel (C++) max |error| vs reference: {max(report['mel']):.2e} dB"
             + (f"; acoustic mel {max(report['acoustic_mel']):.2e} (natural log)" if "acoustic_mel" in report else ""), "",
             "| encoder | feature cosine mean / min | feature rel. max error | embedding cosine mean / min | size MB |",
             "|---|---|---:|---|---:|"]
    for k, v in report["encoder"].items():
        lines.append(f"| {k} | {v['feature_cosine_mean']:.6f} / {v['feature_cosine_min']:.6f} | {v['feature_rel_max_error']:.2e} | "
                     f"{v['embedding_cosine_mean']:.6f} / {v['embedding_cosine_min']:.6f} | {v['bytes'] / 1e6:.1f} |")
    lines += ["", "| decoder | logit KL mean / max (parity mode: f32 KV, no flash attention) | top-1 agreement | "
              "logit KL mean / max (default: f16 KV, flash attention) | top-1 agreement | default prompt pass | size MB |",
              "|---|---|---:|---|---:|---|---:|"]
    for k, v in report["decoder"].items():
        f = report.get("decoder_default", {}).get(k)
        fast = f"{f['logit_kl_mean']:.2e} / {f['logit_kl_max']:.2e} | {f['top1_agreement']:.3f} | {f.get('prompt_by', 'llama.cpp')}" if f else "- | - | -"
        lines.append(f"| {k} | {v['logit_kl_mean']:.2e} / {v['logit_kl_max']:.2e} | {v['top1_agreement']:.3f} | {fast} | {v['bytes'] / 1e6:.1f} |")
    lines += ["", "| encoder + decoder | greedy exact match | first divergence per clip |", "|---|---:|---|"]
    for k, v in report["end_to_end"].items():
        lines.append(f"| {k} | {v['exact_match_rate']:.2f} | {', '.join('-' if f is None else str(f) for f in v['first_divergence'])} |")
    if "tasks" in report:
        first = next(iter(report["tasks"].values()))
        h, c = first["held-out"], first["connected"]
        lines += ["", f"Tasks on {h['clips']} held-out toy-world clips ({h['speech_clips']} with speech) and {c['clips']} phrases of "
                  f"connected speech ({c['mixed_clips']} with words outside the vocabulary):", "",
                  "| model | held-out word accuracy (1 - WER) | caption exact match | caption elements | connected word accuracy "
                  "| connected phrase exact |", "|---|---:|---:|---:|---:|---:|"]
        for k, v in report["tasks"].items():
            h, c = v["held-out"], v["connected"]
            lines.append(f"| {k} | {h['word_accuracy']:.3f} | {h['caption_exact']:.3f} | {h['caption_elements']:.3f} "
                         f"| {c['word_accuracy']:.3f} | {c['phrase_exact']:.3f} |")
    return "\n".join(lines)
