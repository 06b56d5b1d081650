"""One generation as a cancellable stream of text pieces with a result at its end (torch-free)."""

from __future__ import annotations

from typing import Generator, Generic, TypeVar

from .errors import MdlEdgeError

R = TypeVar("R")


class Stream(Generic[R]):
    """One generation in progress: iterate it for text pieces as they are produced; when the
    iteration ends, :meth:`result` gives the whole answer (token ids, stop reason, timings).

    Closing it early (``close()``, leaving a ``with`` block, or breaking out of a ``for`` loop
    over it, after which CPython finalizes it at once) stops the generation before the next
    token and frees the decoder for the next call.
    """

    def __init__(self, gen: Generator[str, None, R]) -> None:
        self._gen = gen
        self._result: R | None = None
        self._state = "running"

    def __iter__(self) -> "Stream[R]":
        return self

    def __next__(self) -> str:
        if self._state != "running":
            raise StopIteration
        try:
            return next(self._gen)
        except StopIteration as stop:
            self._result, self._state = stop.value, "done"
            raise StopIteration from None
        except BaseException:
            self._state = "failed"
            raise

    def result(self) -> R:
        """Run the generation to its end (if the caller has not) and return its result."""
        for _ in self:
            pass
        if self._state != "done":
            raise MdlEdgeError(f"the stream was {'closed' if self._state == 'closed' else 'stopped by an error'} before it finished; it has no result")
        return self._result  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the generation (idempotent)."""
        if self._state == "running":
            self._state = "closed"
        self._gen.close()

    def __enter__(self) -> "Stream[R]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
