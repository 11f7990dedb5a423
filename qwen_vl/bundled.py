"""Models that ship inside the package and load offline by name."""

from __future__ import annotations

from pathlib import Path

from .model.loading import CheckpointError, weight_files

#: The demo model: Qwen-VL's architecture at a laptop's size, trained on the synthetic
#: shapes world (recipes/demo_model/).
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
BUNDLED = {"demo": DEMO_MODEL_DIR}


def bundled_model_dir(name: str | Path) -> Path | None:
    """The bundled model called ``name``, unless a local folder of that name exists."""
    if str(name) in BUNDLED and not Path(name).exists():
        return BUNDLED[str(name)]
    return None


def resolve_model_dir(name: str | Path) -> Path:
    """``name`` as a folder: a bundled model's folder for its name (``"demo"``), else the path itself."""
    bundled = bundled_model_dir(name)
    return bundled if bundled is not None else Path(name)


def has_weights(model_dir: Path) -> bool:
    """True when ``model_dir`` holds weights in one of the official layouts (the bundled
    folder may ship without them)."""
    try:
        weight_files(model_dir)
    except CheckpointError:
        return False
    return True
