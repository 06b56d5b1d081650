"""The engine thread: requests submitted from other threads decode together; cancellation,
runners for segments, and the decoder handed back on close."""

from __future__ import annotations

import threading

import pytest

from conftest import chirp
from mdl_edge.runtime import constants as C
from mdl_edge.runtime.engine import Engine
from mdl_edge.runtime.errors import MdlEdgeError
from mdl_edge.runtime.options import GenerationOptions as G
from mdl_edge.runtime.pipeline import AudioLM, Request
from mdl_edge.runtime.options import DecoderOptions




@pytest.fixture(scope="module")
def lm(bundle):
    with AudioLM(bundle, encoder="fp32", decoder=DecoderOptions(variant="f32", f32_kv=True), threads=2) as m:
        yield m


def test_submitted_from_threads_equal_alone_and_cancel(lm) -> None:
    opts = G(max_new_tokens=10)
    clips = [chirp(1.0 + k, k) for k in range(4)]
    alone = [lm.generate(c, "What is heard?", opts, sample_rate=C.SAMPLE_RATE).token_ids for c in clips]
    with Engine(lm, parallel=2) as engine:
        pieces: dict[int, list[str]] = {k: [] for k in range(4)}
        tickets: list = [None] * 4

        def submit(k: int) -> None:
            tickets[k] = engine.submit(Request(audio=clips[k], sample_rate=C.SAMPLE_RATE, prompt="What is heard?", options=opts),
                                       on_text=pieces[k].append)

        threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # a fifth that is cancelled before it runs: no work, an error outcome
        doomed = engine.submit(Request(audio=clips[0], sample_rate=C.SAMPLE_RATE, options=G(max_new_tokens=200)))
        doomed.cancel()
        outcomes = [t.wait(60) for t in tickets]
        assert isinstance(doomed.wait(60), MdlEdgeError) and "cancelled" in str(doomed.outcome)
        for k, res in enumerate(outcomes):
            assert not isinstance(res, MdlEdgeError) and res.token_ids == alone[k], k
            assert "".join(pieces[k]) == res.text and tickets[k].first_text is not None
        # a runner (what AudioLM.segments takes): results in completion order, each request back
        reqs = [Request(audio=clips[k], sample_rate=C.SAMPLE_RATE, prompt="What is heard?", options=opts, tag=k) for k in range(4)]
        got = {req.tag: res.token_ids for req, res in engine.runner(reqs, ahead=3)}
        assert got == dict(enumerate(alone))
        status = engine.status()
        assert status.active == 0 and status.finished >= 8 and status.failed >= 1
    # closed: the decoder is free for direct calls again
    assert lm.generate(clips[1], "What is heard?", opts, sample_rate=C.SAMPLE_RATE).token_ids == alone[1]
    with pytest.raises(MdlEdgeError, match="closed"):
        engine.submit(Request(audio=clips[0], sample_rate=C.SAMPLE_RATE))
