"""The temporary folder a demo owns: Gradio keeps the uploads there, drawn boxes are saved
there, and images are opened only from there. Created at start, removed at exit.

Gradio finds its upload folder in the ``GRADIO_TEMP_DIR`` environment variable, read at
each request, so one process runs one demo: ``activate()`` points the variable at this
folder and ``close()`` puts the previous value back.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from ..images import ImageLoadError, load_image
from .errors import DemoError
from .limits import DemoLimits

GRADIO_TEMP_ENV = "GRADIO_TEMP_DIR"


class UploadRefused(DemoError):
    """An uploaded file was refused: too large, too many pixels, not an image, outside the folder."""


class UploadFolder:
    """A fresh ``qwen-vl-demo-*`` folder under ``parent`` (default: the system's temporary folder)."""

    def __init__(self, limits: DemoLimits | None = None, parent: str | Path | None = None) -> None:
        self.limits = (limits or DemoLimits()).validate()
        self.root = Path(tempfile.mkdtemp(prefix="qwen-vl-demo-", dir=parent)).resolve()
        self.boxes = self.root / "boxes"  # drawn answers
        self.boxes.mkdir()
        self.policy = self.limits.policy(self.root)
        self._previous_env: str | None = None
        self._active = False
        atexit.register(self.close)

    def activate(self) -> UploadFolder:
        """Make this folder Gradio's upload folder (until ``close``)."""
        if not self._active:
            self._previous_env = os.environ.get(GRADIO_TEMP_ENV)
            os.environ[GRADIO_TEMP_ENV] = str(self.root)
            self._active = True
        return self

    def open(self, path: str | Path) -> Image.Image:
        """The image at ``path``, which must lie in this folder, under the demo's caps.

        Raises UploadRefused naming the file by its own name and the reason
        (never this folder's path).
        """
        name = Path(path).name
        try:
            return load_image(Path(path), self.policy)
        except ImageLoadError as e:
            raise UploadRefused(f"{name}: {e.public_reason}") from None

    @property
    def exists(self) -> bool:
        return self.root.is_dir()

    def close(self) -> None:
        """Remove the folder and everything in it; give ``GRADIO_TEMP_DIR`` its old value."""
        atexit.unregister(self.close)
        shutil.rmtree(self.root, ignore_errors=True)
        if self._active:
            self._active = False
            if self._previous_env is None:
                os.environ.pop(GRADIO_TEMP_ENV, None)
            else:
                os.environ[GRADIO_TEMP_ENV] = self._previous_env

    def __enter__(self) -> UploadFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
