"""Voice activity detectors on real speech with known pauses: which one cuts long recordings.

    python tests/benchmarks/bench_vad.py [--silero PATH/silero_vad.onnx]

Speech: espeak-ng sentences joined by pauses of 0.5-2 s, mixed with white noise at 30, 15 and
8 dB SNR (the test recording of tests/test_segments.py). Per detector: the fraction of pauses
found (a silence run of >= 0.3 s inside the pause, what a cut needs), false pauses (silence runs
of >= 0.3 s inside a sentence, where a cut would split words) and the time per hour of audio.
Silero's ONNX model runs on the onnxruntime we ship; its file comes from the ``silero-vad``
wheel (``pip download --no-deps silero-vad``), whose package itself requires torch.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SR = 16000


def runs(speech: np.ndarray, hop: float, lo: float, hi: float) -> float:
    """Longest silence run (seconds) among frames whose centre lies in (lo, hi)."""
    t = (np.arange(speech.size) + 0.5) * hop
    best = run = 0
    for v in ~speech[(t > lo) & (t < hi)]:
        run = run + 1 if v else 0
        best = max(best, run)
    return best * hop


def webrtc(x: np.ndarray, mode: int) -> tuple[np.ndarray, float]:
    from mdl_edge.runtime.segments import VAD_FRAME, VoiceActivity

    return VoiceActivity(mode).frames(x), VAD_FRAME / SR


def silero(x: np.ndarray, path: str, threshold: float = 0.5) -> tuple[np.ndarray, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    s = ort.InferenceSession(path, opts)
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(SR, np.int64)
    out = []
    context = np.zeros(64, np.float32)
    for i in range(0, x.size - 511, 512):
        chunk = np.concatenate([context, x[i : i + 512]])[None]
        prob, state = s.run(None, {"input": chunk, "state": state, "sr": sr})
        context = x[i + 512 - 64 : i + 512]
        out.append(float(prob[0, 0]) > threshold)
    return np.array(out), 512 / SR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--silero", help="path of silero_vad.onnx")
    args = ap.parse_args()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from test_segments import spoken_recording  # the recording of the tests

    from mdl_edge.runtime.cpu import cpu_info

    mixes, pauses, sentences = spoken_recording()
    seconds = next(iter(mixes.values())).size / SR
    detectors = {f"webrtcvad mode {m}": (lambda x, m=m: webrtc(x, m)) for m in (1, 2, 3)}
    if args.silero:
        detectors["silero ONNX (threshold 0.5)"] = lambda x: silero(x, args.silero)
    print(f"CPU: {cpu_info().describe()}\n{len(pauses)} pauses x 3 SNRs; {seconds:.0f} s of audio per SNR\n")
    print("| detector | pauses found (>= 0.3 s silence inside) | false pauses inside sentences | seconds per hour of audio |")
    print("|---|---:|---:|---:|")
    for name, fn in detectors.items():
        found, false, secs = [], 0, 0.0
        for x in mixes.values():
            t = time.perf_counter()
            speech, hop = fn(x)
            secs += time.perf_counter() - t
            found += [runs(speech, hop, a, b) >= 0.3 for a, b in pauses]
            false += sum(runs(speech, hop, a + 0.15, b - 0.15) >= 0.3 for a, b in sentences)
        per_hour = secs / (3 * seconds) * 3600
        print(f"| {name} | {np.mean(found):.3f} | {false} of {3 * len(sentences)} sentences | {per_hour:.1f} |")


if __name__ == "__main__":
    main()
