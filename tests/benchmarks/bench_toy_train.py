"""Toy-model training speed: what each of the trainer's shortcuts saves, measured side by side.

    python tests/benchmarks/bench_toy_train.py [--steps 10] [--clips 300]

In one run, interleaved (the two variants of a row alternate step by step, so a host whose speed
drifts, as shared 2-core machines do, drifts for both):

- an encoder-phase step (48 clips): the batch padded to its longest clip vs four length-sorted
  sub-batches (``TrainPlan.encoder_groups``);
- a joint-phase step (16 clips, both tasks, forward, backward and the optimiser step): the plain
  formulation (``toy_train.plain_lm_loss``: one padded batch, every sequence in full,
  transformers' loss) vs the trainer's (length-sorted encoder sub-batches, each task's shared
  prompt prefix computed once and passed on as a KV cache, the vocabulary projection only where
  an answer token is predicted); ``tests/test_toy.py`` checks that both give the same loss and
  gradients;
- one espeak-ng word: the program per word vs the forking helper (``export/toy/espeak.py``).

The header names the CPU and its fp32 GEMM rate, measured before and after (a step's time is
comparable across hosts only beside it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mdl_edge.export.toy import espeak
from mdl_edge.export.toy import world as toyworld
from mdl_edge.export.toy import train as T
from mdl_edge.export.bench.machine import gemm_rate
from mdl_edge.export.reference.model import MiDashengLM
from mdl_edge.export.synthetic.checkpoint import write_synthetic_checkpoint
from mdl_edge.runtime.cpu import cpu_info


def interleaved(a, b, steps: int) -> tuple[float, float]:
    """Median seconds of ``a()`` and ``b()``, called alternately ``steps`` times each after one warm-up."""
    a(), b()
    ta, tb = [], []
    for _ in range(steps):
        for fn, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return float(np.median(ta)), float(np.median(tb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--clips", type=int, default=300, help="training clips to draw batches from")
    args = ap.parse_args()
    plan = T.TrainPlan()
    torch.set_num_threads(plan.threads)
    torch.use_deterministic_algorithms(True)
    gemm_before = gemm_rate(False, plan.threads)

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_checkpoint("toy", Path(tmp) / "ck", seed=0)
        model = MiDashengLM.from_pretrained(Path(tmp) / "ck")
    model.train()
    T.semantic_encoder(model).init_bn.eval()
    clips = list(toyworld.clips("train", args.clips, seed=1))
    inventory = T.phoneme_inventory(clips)
    train = T._examples(clips, model.prompt, plan.threads, int(model.cfg.encoder.acoustic_mels or 0), inventory)
    head = torch.nn.Linear(model.cfg.encoder.embed_dim, T.FRAME_CLASSES)
    phoneme_head = torch.nn.Linear(model.cfg.encoder.embed_dim, 1 + len(inventory))
    params = list(model.parameters()) + list(head.parameters()) + list(phoneme_head.parameters())

    def heads(encoded: list) -> torch.Tensor:
        return T.heads_loss(head, phoneme_head, encoded, plan.phoneme_weight)
    opt = torch.optim.AdamW(params, lr=1e-5)
    rng = np.random.default_rng(0)
    pad = model.prompt.special.end_of_text

    def step(loss_of, n: int):
        def run() -> None:
            batch = [train[int(i)] for i in rng.integers(0, len(train), n)]
            loss = loss_of(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    rows = []
    enc_plain, enc_fast = interleaved(step(lambda b: heads(T._encode_grouped(model, b, 1)), plan.encoder_batch),
                                      step(lambda b: heads(T._encode_grouped(model, b, plan.encoder_groups)), plan.encoder_batch),
                                      args.steps)
    rows.append(("encoder-phase step (48 clips)", "one padded batch", enc_plain, f"{plan.encoder_groups} length-sorted sub-batches", enc_fast))

    def plain_joint(b):
        return T.plain_lm_loss(model, b, pad) + plan.frame_weight * heads(T._encode_grouped(model, b, 1))

    def fast_joint(b):
        encoded = T._encode_grouped(model, b, plan.groups)
        return T._lm_loss(model, encoded, pad) + plan.frame_weight * heads(encoded)

    joint_plain, joint_fast = interleaved(step(plain_joint, plan.batch), step(fast_joint, plan.batch), args.steps)
    rows.append(("joint-phase step (16 clips, 2 tasks)", "plain (transformers' loss)", joint_plain,
                 "sub-batches + shared prompt prefix", joint_fast))

    words = [(toyworld.VOCAB[i % len(toyworld.VOCAB)], "en-us+m3", 150, 50) for i in range(20)]
    it = iter(range(10**9))
    program, helper = interleaved(lambda: espeak.synthesize(*words[next(it) % 20], use_helper=False),
                                  lambda: espeak.synthesize(*words[next(it) % 20]), args.steps * 2)
    rows.append(("one espeak-ng word", "the program per word", program, "forking helper", helper))
    gemm_after = gemm_rate(False, plan.threads)

    print(f"CPU: {cpu_info().describe()}")
    print(f"fp32 GEMM ({plan.threads} threads, ONNX Runtime): {gemm_before:.0f} GFLOP/s before, {gemm_after:.0f} after\n")
    print("| what | before | s | now | s | speed-up |")
    print("|---|---|---:|---|---:|---:|")
    for what, a, ta, b, tb in rows:
        print(f"| {what} | {a} | {ta:.4f} | {b} | {tb:.4f} | {ta / tb:.2f}x |")
    enc_s = plan.encoder_steps * (enc_plain - enc_fast)
    joint_s = plan.steps * (joint_plain - joint_fast)
    print(f"\nat these rates the plan's {plan.encoder_steps} encoder and {plan.steps} joint steps take "
          f"{plan.encoder_steps * enc_fast + plan.steps * joint_fast:.0f} s instead of "
          f"{plan.encoder_steps * enc_plain + plan.steps * joint_plain:.0f} s ({enc_s + joint_s:.0f} s saved); "
          f"speech for {plan.n_train} clips (about 2.4 words each) about {plan.n_train * 2.4 * (program - helper) / 2:.0f} s less on two workers")


if __name__ == "__main__":
    main()
