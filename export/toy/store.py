"""Where a trained toy model comes from: the weights shipped with the package, the cache, or a
training run now.

The package ships the checkpoint the default recipe trained (``export/toy/trained/``, about
14 MB), so the demo and the tests hear from the first minute instead of after a first training.
It is used only while its recorded recipe key equals the recipe's (:meth:`TrainPlan.key`, which
follows what the code does, not its comments): a changed recipe trains again, into the cache
(``$MDL_EDGE_CACHE``, else ``~/.cache/mdl-edge``), and ``mdl-edge train-toy --ship`` records
the new weights in the package.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from .train import TrainPlan, train_toy

#: The shipped checkpoint (official layout) and the recipe key it was trained under.
SHIPPED = Path(__file__).with_name("trained")
KEY_FILE = "recipe-key"


def default_cache() -> Path:
    """Where trained toy checkpoints are kept (``$MDL_EDGE_CACHE``, else ``~/.cache/mdl-edge``)."""
    return Path(os.environ.get("MDL_EDGE_CACHE") or Path.home() / ".cache" / "mdl-edge")


def shipped_key() -> str | None:
    """The recipe key of the shipped weights (None when the package has none)."""
    f = SHIPPED / KEY_FILE
    if not (f.is_file() and (SHIPPED / "config.json").is_file() and (SHIPPED / "model.safetensors").is_file()):
        return None
    return f.read_text(encoding="utf-8").strip()


def cached_toy_model(plan: TrainPlan = TrainPlan(), *, cache: Path | None = None) -> tuple[Path, bool]:
    """Where ``plan``'s checkpoint is (the shipped one when its key matches, else the cache's
    folder for it), and whether it is there yet."""
    key = plan.key()
    if shipped_key() == key:
        return SHIPPED, True
    out = (cache or default_cache()) / f"toy-{key}"
    return out, (out / "config.json").is_file()


def toy_model(plan: TrainPlan = TrainPlan(), *, cache: Path | None = None, progress: Callable[[str], None] = print) -> Path:
    """The trained toy checkpoint for ``plan``: shipped, cached, or trained now (minutes) and cached."""
    out, present = cached_toy_model(plan, cache=cache)
    return out if present else train_toy(out, plan, progress=progress)


def ship(model_dir: str | Path, plan: TrainPlan = TrainPlan()) -> Path:
    """Record ``model_dir`` (trained by ``plan``) as the package's shipped weights."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir}: not a trained toy checkpoint (config.json and model.safetensors expected)")
    tmp = SHIPPED.with_name(SHIPPED.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    (tmp / KEY_FILE).write_text(plan.key() + "\n", encoding="utf-8")
    shutil.rmtree(SHIPPED, ignore_errors=True)
    tmp.replace(SHIPPED)
    return SHIPPED
