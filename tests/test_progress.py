"""The stderr progress bar: drawn on terminals only, and only when asked."""

import io

from mdl_edge.runtime.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_draws_on_a_terminal_and_clears() -> None:
    s = Tty()
    p = Progress(4, "files", stream=s)
    p.update(2, "clip.wav: chunk 3/30")
    assert "[" + "#" * 15 + " " * 15 + "] 2/4 clip.wav: chunk 3/30" in s.getvalue()
    p.close()
    assert s.getvalue().endswith("\r")


def test_silent_when_not_a_terminal_or_disabled() -> None:
    s = io.StringIO()
    Progress(3, "files", stream=s).update(1)
    t = Tty()
    Progress(3, "files", stream=t, enabled=False).update(1)
    assert s.getvalue() == "" and t.getvalue() == ""
