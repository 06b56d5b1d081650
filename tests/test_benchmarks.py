"""Every benchmark script runs, end to end, on tiny inputs.

The benchmarks carry the project's speed and memory claims, and they are scripts run by hand on
real-size models: nothing else imports them, so a change to the API they use would break them
unseen until the next measurement. Here each one runs as a user runs it (its own process, the
smallest settings) and must finish and print its tables; the numbers themselves mean nothing at
this size and are not checked.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent / "benchmarks"


def run_bench(script: str, *args: object, timeout: float = 300) -> str:
    """Run ``tests/benchmarks/SCRIPT`` with ``args``; its stdout (the test fails with its output
    when the script fails)."""
    cmd = [sys.executable, str(BENCH / script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def bench_bundle(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with every variant the benchmarks ask for (the runtime's default
    int8 + Q4_K_M among them)."""
    from mdl_edge.export.convert.bundle import export_bundle

    return export_bundle(tiny_dir, tmp_path_factory.mktemp("bench") / "b", encoders=["fp32", "int8", "int8-static"],
                         decoders=["f16", "Q8_0", "Q4_K_M"], progress=lambda *_: None)


def test_every_benchmark_script_is_covered_here() -> None:
    """A new benchmark script gets its run below."""
    covered = {"bench_decoder.py", "bench_encoder.py", "bench_prefill.py", "bench_mel.py", "bench_long.py", "bench_vad.py",
               "bench_server.py", "bench_cluster.py", "bench_toy_train.py", "bench_live.py", "check_gguf_pair.py",
               "bench_pauses.py"}
    scripts = {p.name for p in BENCH.glob("*.py")} - {"common.py"}
    assert scripts == covered, f"not run by tests/test_benchmarks.py: {sorted(scripts - covered)}; gone: {sorted(covered - scripts)}"


def test_bench_decoder(tiny_dir: Path, tmp_path: Path) -> None:
    out = run_bench("bench_decoder.py", "--model", tiny_dir, "--work", tmp_path, "--tokens", 4, "--repeats", 1, "--contexts", "8,40")
    assert "| llama.cpp Q4_K_M | 2 |" in out, out
    assert "Where a decoded token's time goes" in out and "| Q4_K_M |" in out, out
    assert "| 40 |" in out and "attention's cost per cached position" in out, out
    if shutil.which("cc"):  # the C baseline was built and run beside our loop
        assert "| - | - |" not in out.split("| llama.cpp f16 |")[1].splitlines()[0], out


def test_bench_encoder(tiny_dir: Path, bench_bundle: Path) -> None:
    out = run_bench("bench_encoder.py", "--onnx", bench_bundle, "--model", tiny_dir, "--repeats", 1)
    assert "ORT int8, full chunk" in out and "int8 vs fp32, 30 s clip" in out, out


def test_bench_prefill(bench_bundle: Path) -> None:
    out = run_bench("bench_prefill.py", bench_bundle / "decoder.Q4_K_M.gguf", "--positions", "8,16", "--repeats", 1)
    assert "| decoder.Q4_K_M.gguf |" in out, out


def test_bench_mel() -> None:
    out = run_bench("bench_mel.py", "--minutes", 0.1, "--repeats", 1)
    assert "C++, 2 threads" in out and "peak traced memory" in out, out


def test_bench_long(bench_bundle: Path) -> None:
    out = run_bench("bench_long.py", "--bundle", bench_bundle, "--minutes", 0.5, "--parallel", 2, "--tokens", 4)
    assert "| 0.5 min |" in out, out


def test_bench_vad() -> None:
    out = run_bench("bench_vad.py")
    assert "| webrtcvad mode 2 |" in out, out


def test_bench_server(bench_bundle: Path) -> None:
    pytest.importorskip("fastapi")
    out = run_bench("bench_server.py", "--bundle", bench_bundle, "--concurrency", "1,2", "--clips", 5, "--tokens", 4, "--requests", 4, "--soak", 3)
    assert "goal: soak" in out, out


def test_bench_cluster(bench_bundle: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs the cluster extra (ray)")
    out = run_bench("bench_cluster.py", "--bundle", bench_bundle, "--files", 3, "--seconds", 2, "--workers", 1, "--tokens", 4, "--parallel", 2,
                    "--work", tmp_path)
    assert "goal: identical greedy tokens per file: 3/3 -> met" in out, out
    job = next(line for line in out.splitlines() if line.startswith("| local job (--out) |"))
    assert job.rstrip().endswith("| 3/3 |"), job  # the job's rows carry the plain command's tokens


def test_bench_toy_train() -> None:
    from mdl_edge.export.toy import world as toyworld

    if not toyworld.espeak_available():
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    out = run_bench("bench_toy_train.py", "--steps", 1, "--clips", 40)
    assert "| joint-phase step" in out, out


def test_bench_pauses(toy_bundle: Path) -> None:
    pytest.importorskip("webrtcvad")
    out = run_bench("bench_pauses.py", "--toy", toy_bundle, "--phrases", 4, "--gaps", "8,14", "--repeats", 1)
    rows = {r.split(" | ")[1]: r.split(" | ") for r in out.splitlines() if r.startswith("| ") and r.split(" | ")[0] != "| segments"}
    kept, left_out = rows["every pause kept"], rows["pauses > 2 s left out"]
    assert float(left_out[2]) < float(kept[2]), out  # less audio answered


def test_bench_live(toy_bundle: Path) -> None:
    pytest.importorskip("webrtcvad")
    out = run_bench("bench_live.py", "--toy", toy_bundle, "--clips", 4, "--accuracy-clips", 2, "--minutes", 1)
    assert "| word accuracy live vs offline |" in out, out


@pytest.mark.slow
def test_check_gguf_pair(tmp_path: Path) -> None:
    """Slow: it downloads llama-cpp-python's sdist for llama.cpp's own converter."""
    out = run_bench("check_gguf_pair.py", "--work", tmp_path, "--size", "tiny", "--tokens", 4, timeout=900)
    assert "goal: embeddings within 2e-3 and the same greedy tokens (f32 files): met" in out, out
