"""Reading an official-layout checkpoint folder: find the weight files, check every tensor by
name and shape against the layout table, and stream tensors out one at a time.

Weights are read from safetensors only: pickle files (``.bin``/``.pt``) can execute code and
are refused (product decision 7).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ...runtime.config import ModelConfig
from ...runtime.errors import CheckpointError, ConfigError
from ...runtime.mel import front_end_buffers
from .layout import ENCODER_PREFIX, NAME_LAYOUTS, TOKENIZER_SEMANTIC_PREFIX, NameLayout, front_end_buffer_names, official_tensors

if TYPE_CHECKING:
    import torch

_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file
    nbytes: int = 0
    key: str = ""  # the name it is stored under (a layout may spell it otherwise)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse the JSON header of a safetensors file (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for {name!r}") from e
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if end > size - 8 - n or begin > end:
            raise CheckpointError(f"{path}: tensor {name!r} lies beyond the end of the file (truncated download?)")
        out[name] = TensorInfo(path, dtype, shape, 8 + n + begin, end - begin, name)
    return out


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: from the shard index, or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index: {e}") from e
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: the shard index lists files that are missing: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{model_dir}: only pickle weight files found ({', '.join(pickles[:3])}); mdl-edge loads safetensors only, "
            "because pickle files can run code"
        )
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json found")


def _layout_problems(cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> list[str]:
    """Missing, unexpected and mis-shaped tensors of canonically named ``tensors`` against ``cfg``."""
    specs = {s.name: s for s in official_tensors(cfg)}
    missing = [n for n, s in specs.items() if not s.optional and n not in tensors]
    unexpected = [i.key for n, i in tensors.items() if n not in specs]
    misshaped = [
        f"{i.key}: stored {list(i.shape)}, config implies {list(specs[n].shape)}"
        for n, i in tensors.items()
        if n in specs and i.shape != specs[n].shape
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = "\n  ".join(items[:20]) + (f"\n  ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"{len(items)} {title} tensor(s):\n  {shown}")
    return problems


def _resolve_encoder(cfg: ModelConfig, stored: dict[str, TensorInfo]) -> ModelConfig:
    """The encoder variant from ``audio_encoder_config`` and the tensors: a DashengTokenizer-style
    module tree (``audio_encoder.model.*``) makes one even where the config does not say so, and
    its acoustic bin count comes from the config or else from the acoustic conv's shape."""
    tokenizer_tree = any(n.startswith(TOKENIZER_SEMANTIC_PREFIX) for n in stored)
    enc = cfg.encoder
    if enc.variant == "dasheng" and not tokenizer_tree:
        return cfg
    if enc.acoustic_mels:
        return cfg
    conv = stored.get(ENCODER_PREFIX + "patch_embed.weight")
    if conv is None or len(conv.shape) != 4:
        # No way to size the acoustic branch: check against a nominal one so the missing
        # tensors are named.
        return cfg.with_encoder(enc.with_acoustic_mels(1))
    try:
        return cfg.with_encoder(enc.with_acoustic_mels(conv.shape[2]))
    except ConfigError as e:
        raise CheckpointError(f"{conv.file}: {ENCODER_PREFIX}patch_embed.weight {list(conv.shape)}: {e}") from e


class Checkpoint:
    """An official-layout checkpoint folder, validated on open.

    ``config`` is the checkpoint's configuration with the encoder variant the tensors show;
    ``layout`` the :class:`NameLayout` its names follow; ``tensors`` is keyed by canonical name.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise ConfigError(f"{self.dir}: not a folder")
        config = ModelConfig.from_dir(self.dir)
        stored: dict[str, TensorInfo] = {}
        for f in weight_files(self.dir):
            for name, info in read_safetensors_header(f).items():
                if name in stored:
                    raise CheckpointError(f"{self.dir}: tensor {name!r} is stored twice ({stored[name].file.name}, {f.name})")
                stored[name] = info
        self.config = _resolve_encoder(config, stored)
        self.layout, self.tensors = self._match_layout(stored)
        self._check_front_end_buffers()

    def _match_layout(self, stored: dict[str, TensorInfo]) -> tuple[NameLayout, dict[str, TensorInfo]]:
        """The name layout under which the stored tensors are exactly the config's, or an error
        naming what is wrong under the closest one."""
        best: tuple[int, list[str]] | None = None
        for layout in (row for row in NAME_LAYOUTS if row.variant == self.config.encoder.variant):
            tensors: dict[str, TensorInfo] = {}
            for name, info in stored.items():
                canon = layout.canonical(name)
                if canon in tensors:
                    raise CheckpointError(f"{self.dir}: tensors {tensors[canon].key!r} and {name!r} are the same tensor ({canon!r})")
                tensors[canon] = info
            problems = _layout_problems(self.config, tensors)
            if not problems:
                return layout, tensors
            size = sum(int(p.split()[0]) for p in problems)
            if best is None or size < best[0]:
                best = (size, problems)
        assert best is not None
        variant = self.config.encoder.variant
        raise CheckpointError(
            f"{self.dir}: does not match the MiDashengLM layout of its config.json ({variant} encoder)\n" + "\n".join(best[1])
        )

    def _check_front_end_buffers(self) -> None:
        """Front-end buffers a checkpoint carries must hold the spec's window and filterbank (as
        float32 or bf16-rounded values): anything else means another front end than ours."""
        for name, acoustic_mels in front_end_buffer_names(self.config).items():
            if name not in self.tensors:
                continue
            window, fb = front_end_buffers(acoustic_mels=acoustic_mels)
            want = window if name.endswith("window") else fb
            got = self.read_numpy(name)
            worst = float(np.max(np.abs(got - want) - 2.0**-8 * np.abs(want)))
            if worst > 1e-6:
                raise CheckpointError(
                    f"{self.tensors[name].file}: {self.tensors[name].key} differs from the spec's "
                    f"{'window' if name.endswith('window') else 'mel filterbank'} by up to {worst + 2.0**-8:.3g}: "
                    "this checkpoint's front end is not the one MiDashengLM uses"
                )

    def read_numpy(self, name: str) -> np.ndarray:
        """One small float tensor as float32 numpy (no torch), e.g. a front-end buffer."""
        info = self.tensors[name]
        dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
        if info.dtype not in dtypes:
            raise CheckpointError(f"{info.file}: tensor {info.key!r} has dtype {info.dtype}, not a float type")
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.nbytes)
        if len(raw) != info.nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading {info.key!r}")
        x = np.frombuffer(raw, dtype=dtypes[info.dtype])
        if info.dtype == "BF16":
            x = (x.astype(np.uint32) << 16).view(np.float32)
        return x.astype(np.float32).reshape(info.shape)

    def source_hash(self) -> str:
        """A fingerprint of the checkpoint: config.json, every safetensors header, and 64 KiB
        samples at 16 places in each file's data. Distinguishes checkpoints that differ only in
        their weights (e.g. two seeds) without reading gigabytes."""
        h = hashlib.blake2b(digest_size=16)
        h.update((self.dir / "config.json").read_bytes())
        for f in sorted({i.file for i in self.tensors.values()}):
            size = f.stat().st_size
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fh.read(n))
                data = size - 8 - n
                for k in range(16):
                    fh.seek(8 + n + data * k // 16)
                    h.update(fh.read(65536))
        return h.hexdigest()

    def read(self, name: str) -> "torch.Tensor":
        """One tensor read with plain file I/O (no memory map): converting a large checkpoint
        tensor by tensor then keeps only the current tensor resident."""
        import torch

        info = self.tensors[name]
        name = info.key
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, "I64": torch.int64}
        if info.dtype not in dtypes:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, not a float type")
        buf = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            if f.readinto(buf) != info.nbytes:
                raise CheckpointError(f"{info.file}: truncated while reading {name!r}")
        return torch.frombuffer(buf, dtype=dtypes[info.dtype]).reshape(info.shape) if info.nbytes else torch.zeros(info.shape, dtype=dtypes[info.dtype])

    def load(self, prefix: str, *, dtype: "torch.dtype | None" = None) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Yield ``(canonical name without prefix, tensor)`` for every tensor under ``prefix``, file by file."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name, info in self.tensors.items():
            if name.startswith(prefix):
                by_file.setdefault(info.file, []).append(name)
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as st:
                for name in names:
                    t = st.get_tensor(self.tensors[name].key)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    yield name[len(prefix):], t

