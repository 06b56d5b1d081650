"""The GGUF pair path against the PyTorch reference, on files this project did not write.

1. A MiDashengLM-0.6B-style checkpoint assembled from other people's modules, with their own random
   initialisation: the `dasheng` package's encoder as the semantic ViT (names of the public
   DashengTokenizer code: ``audio_encoder.model.init_bn.1.*``), torch's Conv2d + LayerNorm as the
   acoustic branch, transformers' ``Qwen3ForCausalLM`` as the decoder (saved by its own
   ``save_pretrained``), and the synthetic tokenizer.
2. Its text GGUF made by llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist
   on PyPI, the version installed here; its tokenizer-hash check is told the pre-tokenizer is
   ``qwen2``, as it would be for the real Qwen3 vocabulary), plus an mmproj with the fork's keys and
   names (``export/convert/mmproj.py``, F16 and F32).
3. ``mdl-edge export`` of that pair, compared with the PyTorch reference of the checkpoint on clips
   of 0.15-20 s: audio embeddings (relative to the largest value; goal 2e-3) and greedy tokens
   (decoder in parity mode: f32 KV cache, no flash attention).

    python tests/benchmarks/check_gguf_pair.py --work DIR [--size tiny|0.6b] [--llama-cpp SRC]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from mdl_edge.runtime import constants as C

SIZES = {  # semantic width, depth, heads, acoustic bins; decoder hidden, layers, heads, kv, head_dim, ffn
    "tiny": (64, 2, 4, 100, 64, 2, 4, 2, 16, 128),
    "0.6b": (768, 12, 12, 100, 1024, 28, 16, 8, 128, 3072),
}
CLIPS_S = (0.15, 0.2, 1.0, 3.0, 10.08, 10.09, 12.3, 20.0)


def converter(src: Path | None, work: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the installed llama-cpp-python's sdist."""
    if src is not None:
        return src / "convert_hf_to_gguf.py"
    import llama_cpp

    version = llama_cpp.__version__
    root = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
                        f"llama-cpp-python=={version}", "-d", str(work)], check=True)
        with tarfile.open(work / f"llama_cpp_python-{version}.tar.gz") as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                       ("/gguf-py/" in m.name or "/conversion/" in m.name or m.name.endswith("convert_hf_to_gguf.py"))]
            tar.extractall(work, members=members, filter="data")
    return root / "convert_hf_to_gguf.py"


def foreign_checkpoint(size: str, out: Path) -> Path:
    """The checkpoint, assembled from modules nobody here wrote."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mdl_edge.export.synthetic.checkpoint import OFFICIAL_SPECIAL_START
    from mdl_edge.export.synthetic.tokenizer import write_tokenizer_files

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from test_reference_encoder import import_dasheng

    d, depth, heads, n_ac, hidden, layers, qh, kv, hd, ffn = SIZES[size]
    torch.manual_seed(0)
    semantic = import_dasheng()(embed_dim=d, depth=depth, num_heads=heads, patch_size=(64, 4), patch_stride=(64, 4), target_length=1008)
    with torch.no_grad():  # log-mel statistics of real audio, so activations have their usual scale
        semantic.init_bn[1].running_mean.fill_(-45.0)
        semantic.init_bn[1].running_var.fill_(14.0**2)
    conv, norm = torch.nn.Conv2d(1, d, (n_ac, 4), (n_ac, 4)), torch.nn.LayerNorm(d)
    projector = torch.nn.Sequential(torch.nn.Linear(5 * d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    vocab = 151936 if size == "0.6b" else 1024
    special = OFFICIAL_SPECIAL_START if size == "0.6b" else 1000
    text = Qwen3Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=qh, num_key_value_heads=kv, head_dim=hd,
                       intermediate_size=ffn, vocab_size=vocab, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=40960)
    decoder = Qwen3ForCausalLM(text)
    out.mkdir(parents=True, exist_ok=True)
    hf = out / "qwen3"  # the decoder alone, as transformers saves it, for llama.cpp's converter
    decoder.save_pretrained(hf, safe_serialization=True)
    write_tokenizer_files(hf, base_vocab=8000 if size == "0.6b" else 1000, special_start=special, seed=0, model_max_length=40960)
    ckpt = out / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    write_tokenizer_files(ckpt, base_vocab=8000 if size == "0.6b" else 1000, special_start=special, seed=0, model_max_length=40960)
    state = {f"audio_encoder.model.{k}": v for k, v in semantic.state_dict().items() if not k.startswith("outputlayer.")}
    state.update({f"audio_encoder.patch_embed.{k}": v for k, v in conv.state_dict().items()})
    state.update({f"audio_encoder.norm.{k}": v for k, v in norm.state_dict().items()})
    state.update({f"audio_projector.net.{k}": v for k, v in projector.state_dict().items()})
    state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items() if k != "lm_head.weight"})
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"))
    config = {
        "architectures": ["MiDashengLMModel"], "model_type": "midashenglm", "subsample_factor": 5, "audio_token_id": special + 3,
        "audio_encoder_config": {"model_type": "dashengtokenizer", "embed_dim": d, "depth": depth, "num_heads": heads,
                                 "n_mels_patch": n_ac, "hop_length": 160},
        "text_config": {**text.to_dict(), "model_type": "qwen3"},
    }
    (ckpt / "config.json").write_text(json.dumps(config, indent=1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree with convert_hf_to_gguf.py (default: the sdist from PyPI)")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    from mdl_edge.export.convert.bundle import export_bundle
    from mdl_edge.export.convert.checkpoint import Checkpoint
    from mdl_edge.export.convert.mmproj import write_mmproj
    from mdl_edge.export.reference.model import MiDashengLM, load_audio_tower
    from mdl_edge.runtime.audio import demo_clip
    from mdl_edge.runtime.cpu import cpu_info
    from mdl_edge.runtime.options import DecoderOptions, GenerationOptions
    from mdl_edge.runtime.pipeline import AudioLM

    work = args.work.resolve()
    root = foreign_checkpoint(args.size, work / args.size)
    ckpt = root / "checkpoint"
    script = converter(args.llama_cpp, work)
    rows = []
    model = MiDashengLM.from_pretrained(ckpt)
    for mm_type in ("f32", "f16"):
        pair = root / f"pair-{mm_type}"
        pair.mkdir(exist_ok=True)
        run = ("import sys, runpy; sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); "
               "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tok: 'qwen2'; runpy.run_path(sys.argv[0], run_name='__main__')")
        subprocess.run([sys.executable, "-c", run, str(script), str(root / "qwen3"), "--outtype", "f32", "--outfile", str(pair / "text-f32.gguf")],
                       check=True, env={**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}, capture_output=True)
        enc, proj = load_audio_tower(Checkpoint(ckpt))
        write_mmproj(enc, proj, pair / f"mmproj-{mm_type}.gguf", dtype=mm_type)
        bundle = export_bundle(pair, root / f"bundle-{mm_type}", encoders=["fp32", "int8"], decoders=["f32"], progress=lambda *_: None)
        options = GenerationOptions(max_new_tokens=args.tokens)
        with AudioLM(bundle, encoder="fp32", decoder=DecoderOptions(variant="f32", f32_kv=True, flash_attn=False)) as lm:
            for s in CLIPS_S:
                wave = demo_clip(s, seed=int(s * 100))[: int(s * C.SAMPLE_RATE)]
                emb, _ = lm.embed(wave, sample_rate=C.SAMPLE_RATE)
                want = model.encode_audio([wave])[0].numpy()
                err = float(np.abs(emb - want).max() / np.abs(want).max())
                ref = model.generate(wave, "Caption the audio.", max_new_tokens=args.tokens)
                got = lm.caption(wave, options, sample_rate=C.SAMPLE_RATE)
                same = list(got.token_ids) == list(ref.token_ids)
                rows.append((mm_type, s, emb.shape[0], err, same, len(ref.token_ids)))
    info = cpu_info()
    print(f"CPU: {info.model} ({info.machine}; {' '.join(info.features)}); size {args.size}; text GGUF by llama.cpp's convert_hf_to_gguf.py")
    print("\n| mmproj | clip (s) | audio tokens | embedding rel. max error (goal <= 2e-3) | greedy tokens equal | tokens |")
    print("|---|---:|---:|---:|---|---:|")
    for mm_type, s, n, err, same, k in rows:
        print(f"| {mm_type} | {s:g} | {n} | {err:.2e} | {'yes' if same else 'NO'} | {k} |")
    ok = all(r[3] <= 2e-3 for r in rows) and all(r[4] for r in rows if r[0] == "f32")
    print(f"\ngoal: embeddings within 2e-3 and the same greedy tokens (f32 files): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
