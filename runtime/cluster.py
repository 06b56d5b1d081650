"""Captioning and transcription beyond one machine, on Ray Data (the ``cluster`` extra).

Ray Data is what the field runs offline batch inference on (``map_batches`` over a pool of
stateful actors): it schedules, streams, restarts a dead actor and retries its work, so this
module writes no scheduler of its own. Each actor loads the bundle once (its CPUs are its
threads) and answers its share of the files with :meth:`AudioLM.run` (the multi-sequence
decoder); a long recording is segmented as on one machine (:meth:`AudioLM.segments`). Rows come
back to the driver as they are produced and are appended to a JSON Lines file, one file's rows in
one write, so an interrupted job leaves a valid partial output and a rerun with the same output
answers only what is missing. ``.parquet`` outputs are journaled as JSON Lines beside them and
written when the job completes.

``ClusterOptions(engine="local")`` runs the same job in the caller's process, without Ray: the
same rows, the same resumption.

Every row names its file: ``{"file", "segment", "n_segments", "start", "end", "text",
"token_ids", "stop_reason", "n_audio_tokens", "timings", "worker"}``, or ``{"file", "error"}``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from .errors import ConfigError, MdlEdgeError, OptionError, one_line
from .options import DecoderOptions, EncoderOptions, GenerationOptions, available_cores, default_parallel, whole_number
from .segments import SegmentOptions, TimedSegment

if TYPE_CHECKING:
    from .pipeline import AudioLM, Result

logger = logging.getLogger("mdl_edge")

LIST_SUFFIXES = (".txt", ".lst", ".list")
ENGINES = ("local", "ray")
#: Batches an actor answers at once (their files share its decoder; see FileAnswerer).
CALLS_PER_ACTOR = 2


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    """How a job runs (validated here).

    ``engine``: ``"ray"`` (Ray Data) or ``"local"`` (this process, without Ray: the same rows
    and the same resumption; ``workers``, ``address``, ``batch_size``, ``retries`` and
    ``runtime_env`` are Ray's alone, and ``cpus_per_worker`` is the process's threads);
    ``workers``: actors, each with the bundle loaded once; ``cpus_per_worker``: CPUs Ray reserves
    for each (its threads; default: a local instance's CPUs shared out, else 1);
    ``address``: a running cluster (``"auto"``, ``"ray://host:10001"``; default: start a local
    instance); ``batch_size``: files per actor call; ``parallel``: sequences each actor's decoder
    decodes together; ``retries``: times a batch whose actor died is tried again (then its files
    get error rows); ``retry_errors``: a rerun also retries files whose row is an error;
    ``runtime_env``: Ray's runtime environment for the job (e.g. ``{"working_dir": ...}`` to ship
    a bundle with it).
    """

    engine: str = "ray"
    workers: int = 1
    cpus_per_worker: int | None = None
    address: str | None = None
    batch_size: int = 8
    parallel: int = field(default_factory=default_parallel)
    retries: int = 3
    retry_errors: bool = False
    runtime_env: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise OptionError("engine", f"must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        whole_number("workers", self.workers)
        if self.cpus_per_worker is not None:
            whole_number("cpus_per_worker", self.cpus_per_worker)
        whole_number("batch_size", self.batch_size)
        whole_number("parallel", self.parallel)
        whole_number("retries", self.retries, 0)


@dataclass(frozen=True)
class JobSummary:
    """What a job did: inputs, those already answered before it, files answered, error rows."""

    inputs: int
    skipped: int
    answered: int
    failed: int
    seconds: float
    out: Path

    @property
    def files_per_second(self) -> float:
        return (self.answered + self.failed) / self.seconds if self.seconds > 0 else 0.0


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files, folders (the audio files anywhere under them, sorted), globs (``**`` recursive) and
    list files (``.txt``/``.lst``/``.list``: one path per line, ``#`` comments; relative paths are
    relative to the list) -> paths, in order (a path given twice stays twice: the CLI answers it
    twice; a Ray job answers each file once)."""
    from .audio import AUDIO_SUFFIXES, audio_files_under

    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = audio_files_under(p)
            if not found:
                raise ConfigError(f"{item}: no audio files in this folder or under it (names ending {' '.join(sorted(AUDIO_SUFFIXES))})")
            out += [str(f) for f in found]
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(line if Path(line).is_absolute() else str(p.parent / line))
        elif not p.exists() and any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise ConfigError(f"{item}: no file matches this pattern")
            out += [m for m in matches if Path(m).is_file()]
        else:
            out.append(item)
    return out


# -- rows ----------------------------------------------------------------------------------------
def this_worker() -> str:
    """What a row's ``worker`` says: this host and process."""
    return f"{os.uname().nodename}:{os.getpid()}"


def segment_row(path: str, seg: TimedSegment, n_segments: int, n_audio_tokens: int | None, worker: str) -> dict[str, Any]:
    """The row of one answered segment (a file answered whole is its one segment)."""
    return {"file": path, "segment": seg.index, "n_segments": n_segments, "start": round(seg.start, 3), "end": round(seg.end, 3),
            "text": seg.text, "token_ids": list(seg.token_ids), "stop_reason": seg.stop_reason, "n_audio_tokens": n_audio_tokens,
            "timings": seg.timings, "worker": worker}


def answer_row(path: str, res: "Result | MdlEdgeError", worker: str) -> dict[str, Any]:
    """The row of a file answered whole (its one segment), or its error row."""
    if isinstance(res, MdlEdgeError):
        return error_row(path, res, worker)
    return segment_row(path, res.as_segment(), 1, res.n_audio_tokens, worker)


def recording_rows(lm: "AudioLM", path: str, prompt: str, options: GenerationOptions, worker: str, **segments: Any) -> list[dict[str, Any]]:
    """The rows of a recording answered segment by segment (``segments``: :meth:`AudioLM.segments`'
    options), or its one error row."""
    try:
        segs = list(lm.segments(path, prompt, options, **segments))
    except MdlEdgeError as e:
        return [error_row(path, e, worker)]
    return [segment_row(path, seg, len(segs), None, worker) for seg in segs]


def error_row(path: str, error: BaseException | str, worker: str = "") -> dict[str, Any]:
    return {"file": path, "error": error if isinstance(error, str) else one_line(error), "worker": worker}


def answered_files(out: Path, *, retry_errors: bool = False) -> set[str]:
    """Files an earlier run already answered in ``out`` (JSON Lines): all their segments are
    there (or, unless ``retry_errors``, their error row). A torn last line is ignored."""
    if not out.is_file():
        return set()
    seen: dict[str, set[int]] = {}
    need: dict[str, int] = {}
    done: set[str] = set()
    with out.open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by an interrupted write
            path = row.get("file")
            if not isinstance(path, str):
                continue
            if "error" in row:
                if not retry_errors:
                    done.add(path)
                continue
            seen.setdefault(path, set()).add(int(row.get("segment", 0)))
            need[path] = int(row.get("n_segments", 1))
    done |= {p for p, segs in seen.items() if len(segs) >= need[p]}
    return done


# -- the actor -------------------------------------------------------------------------------------
class FileAnswerer:
    """One Ray actor (also usable alone): loads the bundle once and answers batches of files.
    ``__call__`` takes ``{"path": [...]}`` and returns ``{"row": [json, ...]}``: one row per
    segment of each file (one for a file answered whole), or one error row.

    Its files go to one :class:`~mdl_edge.runtime.engine.Engine` (continuous batching), and Ray
    runs :data:`CALLS_PER_ACTOR` calls at once: while one batch's last files decode, the next
    batch's join them, so batch boundaries leave no idle decoder slots.
    """

    def __init__(self, model: str, *, prompt: str, task: str, options: GenerationOptions, segmenting: SegmentOptions,
                 parallel: int, threads: int, encoder: EncoderOptions = EncoderOptions(), decoder: DecoderOptions = DecoderOptions(),
                 crash_once: tuple[str, str] | None = None) -> None:
        from .engine import Engine
        from .pipeline import AudioLM

        self.lm = AudioLM(model, threads=threads, encoder=encoder, decoder=decoder)
        self.engine = Engine(self.lm, parallel=parallel)
        self.prompt, self.task, self.options, self.segmenting, self.parallel = prompt, task, options, segmenting, parallel
        self.mode = segmenting.resolved(task)
        self.worker = this_worker()
        # Fault injection for the tests: die (as a killed process does) the first time this file
        # comes, once per marker file, so that Ray's restart and retry are exercised for real.
        self._crash_once = crash_once

    def _long(self, path: str) -> bool:
        from .audio import expected_samples

        return self.segmenting.cuts(self.mode, expected_samples(path))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        paths = [str(p) for p in batch["path"]]
        if self._crash_once is not None:
            name, marker = self._crash_once
            if any(Path(p).name == name for p in paths) and not Path(marker).exists():
                Path(marker).write_text(self.worker)
                os._exit(1)
        rows: dict[str, list[dict[str, Any]]] = {}
        whole = [p for p in paths if not self._long(p)]
        for path in paths:
            if path not in whole:
                rows[path] = self._segments(path)
        rows.update(self._whole(whole))
        return {"row": [json.dumps(r, ensure_ascii=False) for p in paths for r in rows[p]]}

    def _whole(self, paths: list[str]) -> dict[str, list[dict[str, Any]]]:
        from .pipeline import Request

        tickets = {p: self.engine.submit(Request(audio=p, prompt=self.prompt, options=self.options)) for p in paths}
        out: dict[str, list[dict[str, Any]]] = {}
        for path, ticket in tickets.items():
            res = ticket.wait()
            assert res is not None
            out[path] = [answer_row(path, res, self.worker)]
        return out

    def _segments(self, path: str) -> list[dict[str, Any]]:
        return recording_rows(self.lm, path, self.prompt, self.options, self.worker, mode=self.mode, segmenting=self.segmenting,
                              runner=self.engine.runner)


# -- the driver ------------------------------------------------------------------------------------
def answer_files(
    inputs: Sequence[str] | Any,
    model: str | Path,
    *,
    out: str | Path,
    prompt: str,
    task: str = "caption",
    options: GenerationOptions = GenerationOptions(),
    segmenting: SegmentOptions = SegmentOptions(),
    cluster: ClusterOptions = ClusterOptions(),
    encoder: EncoderOptions = EncoderOptions(),
    decoder: DecoderOptions = DecoderOptions(),
    on_row: Callable[[dict[str, Any]], None] | None = None,
    crash_once: tuple[str, str] | None = None,
) -> JobSummary:
    """Answer ``prompt`` about every input, rows appended to ``out`` as they come; on Ray, or
    with ``cluster.engine == "local"`` in this process, without Ray (files answered as the CLI
    answers them, each file's rows written when it is done).

    ``inputs``: paths, folders, globs and list files (see :func:`expand_inputs`), or on Ray a Ray
    Dataset with a ``path`` column. ``model``: a bundle folder every worker can read (shared
    storage, or shipped with ``cluster.runtime_env``). ``encoder`` / ``decoder``: each worker's
    load options. Inputs already answered in ``out`` are skipped, so a rerun after an
    interruption answers only what is missing. ``on_row`` sees each row as it is written.
    Ctrl-C stops the job and leaves ``out`` valid."""
    here = cluster.engine == "local"
    out, journal = _journal(out)
    if (cluster.address is None or here) and not Path(model).is_dir():
        raise ConfigError(f"{model}: not a folder (expected a bundle made by `mdl-edge export`)")
    t0 = time.perf_counter()
    done = answered_files(journal, retry_errors=cluster.retry_errors)
    is_dataset = hasattr(inputs, "select_columns") and hasattr(inputs, "iter_rows")
    if is_dataset and here:
        raise OptionError("engine", "a Ray Dataset of inputs runs on Ray: give paths for a local job")
    if not is_dataset:
        paths = list(dict.fromkeys(expand_inputs(inputs)))  # rows are keyed by file
        if all(p in done for p in paths):  # nothing to do: no cluster to start
            return _finish(out, journal, paths, [], 0, 0, t0)
    if here:
        todo = [p for p in paths if p not in done]
        rows = _rows_here(todo, model, prompt=prompt, task=task, options=options, segmenting=segmenting, parallel=cluster.parallel,
                          threads=cluster.cpus_per_worker, encoder=encoder, decoder=decoder)
        try:
            answered, failed = _append_rows(rows, journal, todo, "it was not answered", on_row)
        finally:
            rows.close()  # the model is freed here, also when the job stops early
        return _finish(out, journal, paths, todo, answered, failed, t0)
    import ray

    _start_ray(cluster)
    if is_dataset:
        paths = list(dict.fromkeys(str(r["path"]) for r in inputs.select_columns(["path"]).iter_rows()))
    todo = [p for p in paths if p not in done]
    answered = failed = 0
    if todo:
        cpus = cluster.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // cluster.workers)
        actor_kwargs = dict(model=str(model), prompt=prompt, task=task, options=options, segmenting=segmenting,
                            parallel=cluster.parallel, threads=cpus, encoder=encoder, decoder=decoder, crash_once=crash_once)
        ds = _answering_dataset(todo, cluster, cpus, actor_kwargs)
        batches = ds.iter_batches(batch_size=None, batch_format="numpy")
        answered, failed = _append_rows(batches, journal, todo, f"its worker failed {cluster.retries + 1} times", on_row)
    return _finish(out, journal, paths, todo, answered, failed, t0)


def _rows_here(todo: list[str], model: str | Path, *, prompt: str, task: str, options: GenerationOptions, segmenting: SegmentOptions,
               parallel: int, threads: int | None, encoder: EncoderOptions, decoder: DecoderOptions) -> Iterator[dict[str, Any]]:
    """A local job's rows, one batch per file as each is done: the files answered whole decoded
    together (:meth:`AudioLM.run`), then each long recording segment by segment."""
    from .audio import expected_samples
    from .pipeline import AudioLM, Request

    mode, worker = segmenting.resolved(task), this_worker()
    with AudioLM(model, threads=threads, encoder=encoder, decoder=decoder) as lm:
        long = {p for p in todo if segmenting.cuts(mode, expected_samples(p))}
        requests = (Request(audio=p, prompt=prompt, options=options, tag=p) for p in todo if p not in long)
        for req, res in lm.run(requests, parallel=parallel):
            yield {"row": [json.dumps(answer_row(req.tag, res, worker), ensure_ascii=False)]}
        for path in (p for p in todo if p in long):
            rows = recording_rows(lm, path, prompt, options, worker, mode=mode, segmenting=segmenting, parallel=parallel)
            yield {"row": [json.dumps(r, ensure_ascii=False) for r in rows]}


def _journal(out: str | Path) -> tuple[Path, Path]:
    """(the output, the JSON Lines file rows are appended to: the output itself, or for a
    ``.parquet`` output a journal beside it, written as Parquet when the job completes)."""
    out = Path(out)
    return out, out.with_name(out.name + ".jsonl") if out.suffix.lower() == ".parquet" else out


def _finish(out: Path, journal: Path, paths: list[str], todo: list[str], answered: int, failed: int, t0: float) -> JobSummary:
    """The job's summary, once its rows are all in the journal (reached only when the job was not
    interrupted: a ``.parquet`` output is written from the journal here)."""
    if out != journal and paths:
        _write_parquet(journal, out)
    return JobSummary(len(paths), len(paths) - len(todo), answered, failed, time.perf_counter() - t0, out)


#: Held while a batch of rows is written and flushed: whoever ends the process early (the CLI on
#: Ctrl-C) takes it first, so the output never ends in a partial line.
OUTPUT_LOCK = threading.Lock()


def _start_ray(cluster: ClusterOptions) -> None:
    """Connect to ``cluster.address``, or start a local instance with room for the workers."""
    import ray

    if ray.is_initialized():
        return
    init: dict[str, Any] = {"address": cluster.address, "runtime_env": cluster.runtime_env, "log_to_driver": False,
                            "include_dashboard": False, "logging_level": logging.WARNING}
    if cluster.address is None:
        init["num_cpus"] = max(available_cores(), cluster.workers * (cluster.cpus_per_worker or 1))
    ray.init(**{k: v for k, v in init.items() if v is not None})


def _answering_dataset(todo: list[str], cluster: ClusterOptions, cpus: int, actor_kwargs: dict[str, Any]) -> Any:
    """A Ray Dataset of ``todo``'s rows, answered by a pool of :class:`FileAnswerer` actors."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.max_errored_blocks = -1  # a batch that fails beyond its retries loses only its own files
    ctx.enable_progress_bars = False
    n_blocks = -(-len(todo) // cluster.batch_size)
    ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=n_blocks)
    with warnings.catch_warnings():
        # Ray Data retries a dead actor's batch without end unless max_task_retries says
        # otherwise, and takes that only as a remote argument (deprecated, kept until Ray
        # 2.64): the extra pins ray below 2.64.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(
            FileAnswerer, batch_size=cluster.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(size=cluster.workers, max_tasks_in_flight_per_actor=CALLS_PER_ACTOR,
                                      max_concurrent_calls_per_actor=CALLS_PER_ACTOR, enable_true_multi_threading=True),
            fn_constructor_kwargs=actor_kwargs, num_cpus=cpus, max_restarts=-1, max_task_retries=cluster.retries,
            udf_modifying_row_count=True,
        )


def _append_rows(batches: Iterable[dict[str, Any]], journal: Path, todo: list[str], lost_why: str,
                 on_row: Callable[[dict[str, Any]], None] | None) -> tuple[int, int]:
    """Append the rows of ``batches`` (``{"row": [json, ...]}`` each) to ``journal`` as they come
    (each batch flushed whole), and an error row saying ``lost_why`` for each file of ``todo`` that
    got none (on Ray: its batch failed beyond its retries): ``(answered, failed)``."""
    seen: set[str] = set()
    answered = failed = 0
    journal.parent.mkdir(parents=True, exist_ok=True)
    with journal.open("a", encoding="utf-8") as f:
        try:
            for batch in batches:
                with OUTPUT_LOCK:
                    f.write("".join(line + "\n" for line in batch["row"]))  # as the actor wrote them
                    f.flush()
                for r in (json.loads(r) for r in batch["row"]):
                    if r["file"] not in seen:
                        seen.add(r["file"])
                        answered, failed = (answered, failed + 1) if "error" in r else (answered + 1, failed)
                    if on_row:
                        on_row(r)
        finally:
            # files whose batch failed beyond its retries: say so instead of leaving them out
            if len(seen) < len(todo) and not _interrupted():
                lost = [p for p in todo if p not in seen]
                with OUTPUT_LOCK:
                    f.write("".join(json.dumps(error_row(p, lost_why), ensure_ascii=False) + "\n"
                                    for p in lost))
                    f.flush()
                failed += len(lost)
    return answered, failed


def _interrupted() -> bool:
    import sys

    return isinstance(sys.exc_info()[1], KeyboardInterrupt)


def _write_parquet(journal: Path, out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    if journal.is_file():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            row["timings"] = json.dumps(row.get("timings")) if row.get("timings") is not None else None
            rows.append(row)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(out)


def rows_in(out: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a job's output (JSON Lines or Parquet)."""
    out = Path(out)
    if out.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(out).to_pylist()
        return
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue


__all__ = ["ClusterOptions", "FileAnswerer", "JobSummary", "answer_files", "answered_files", "expand_inputs", "rows_in"]
