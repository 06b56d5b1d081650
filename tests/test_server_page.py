"""The server's page in a real browser: Debian's chromium, headless, driven by Selenium through
chromium-driver. A person's path: pick a file, choose a task, press Run, read the answer as it
streams; long files show timed segments; errors show the API's message. The trained toy model
answers, so the screenshots (kept in tests/artifacts/) show what it heard."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="the dev extra is not installed")

import soundfile as sf  # noqa: E402

from mdl_edge.runtime import constants as C  # noqa: E402
from mdl_edge.runtime.pipeline import AudioLM  # noqa: E402
from mdl_edge.runtime.segments import SegmentOptions  # noqa: E402
from mdl_edge.runtime.server import Server, ServerOptions  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts"
LM = dict(threads=2, encoder="int8", decoder="Q4_K_M")


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900", "--disable-gpu"):
        opts.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    b.set_page_load_timeout(30)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def served(toy_bundle):
    with Server(toy_bundle, ServerOptions(port=0, parallel=2), **LM) as s:
        yield s


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    from mdl_edge.export.toy import world as toyworld

    d = tmp_path_factory.mktemp("page")
    clip = next(c for c in toyworld.clips("held-out", 20, seed=3) if c.transcript)
    sf.write(d / "spoken.wav", clip.wave, C.SAMPLE_RATE, subtype="PCM_16")
    # a recording longer than 30 s: the page asks for timed segments
    parts = [c.wave for c in toyworld.clips("held-out", 40, seed=4) if c.transcript][:8]
    pause = np.zeros(C.SAMPLE_RATE, np.float32)
    long = np.concatenate([x for p in parts for x in (p, pause)])
    while long.size < 32 * C.SAMPLE_RATE:
        long = np.concatenate([long, long])
    sf.write(d / "long.wav", long, C.SAMPLE_RATE, subtype="PCM_16")
    (d / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt this is not audio at all" * 3)
    return d, clip


def _run(browser, url: str, path: Path, task: str, question: str = ""):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.CSS_SELECTOR, f"input[name=task][value={task}]").click()
    if question:
        q = browser.find_element(By.ID, "question")
        q.clear()
        q.send_keys(question)
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "go").is_enabled())
    if task == "transcribe":  # the duration decides between streamed text and timed segments
        WebDriverWait(browser, 10).until(lambda b: "s" in b.find_element(By.ID, "filename").text.split(",")[-1])
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 180).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    return (browser.find_element(By.ID, "answer").text, browser.find_element(By.ID, "error").text,
            [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#segments tbody tr")])


def test_page_captions_transcribes_and_shows_errors(browser, served, toy_files, toy_bundle) -> None:
    d, clip = toy_files
    ARTIFACTS.mkdir(exist_ok=True)
    with AudioLM(toy_bundle, **LM) as lm:
        caption = lm.caption(d / "spoken.wav").text
        transcript = lm.transcribe(d / "spoken.wav").text
        segments = list(lm.transcribe_segments(d / "long.wav", segmenting=SegmentOptions(), parallel=2))

    answer, error, _ = _run(browser, served.url, d / "spoken.wav", "caption")
    assert (answer, error) == (caption.strip(), "")
    answer, error, _ = _run(browser, served.url, d / "spoken.wav", "transcribe")
    assert (answer, error) == (transcript.strip(), "")
    browser.save_screenshot(str(ARTIFACTS / "server-page-transcribe.png"))
    print(f"page transcript {answer!r}; spoken: {clip.transcript!r}")

    answer, error, rows = _run(browser, served.url, d / "long.wav", "transcribe")
    assert error == "" and len(rows) == len(segments) > 1, (rows, segments)
    # the server's segments, at the same times; their text as decoded beside other segments, which
    # llama.cpp's batched kernels round otherwise than the same decode here (docs/cluster.md): a
    # word may differ, the rest must not
    from mdl_edge.export.toy.world import word_accuracy

    def seconds(hms: str) -> float:  # the page's "HH:MM:SS.cc"
        h, m, sec = hms.split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)

    times = [tuple(seconds(t) for t in r.split(" ", 2)[:2]) for r in rows]
    assert all(abs(a - s.start) <= 0.011 and abs(b - s.end) <= 0.011 for (a, b), s in zip(times, segments)), (times, segments)
    shown = " | ".join(r.split(" ", 2)[2] if r.count(" ") >= 2 else "" for r in rows)
    want = " | ".join(s.text.strip() for s in segments)
    assert word_accuracy(shown, want) >= 0.9, (shown, want)
    browser.save_screenshot(str(ARTIFACTS / "server-page-segments.png"))

    answer, error, _ = _run(browser, served.url, d / "broken.wav", "ask", "What is heard?")
    assert error.startswith("HTTP 400: audio part 1") and answer == "", error
    browser.save_screenshot(str(ARTIFACTS / "server-page-error.png"))
