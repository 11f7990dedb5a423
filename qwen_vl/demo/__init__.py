"""The web demo (``qwen-vl demo``): a Gradio chat about uploaded pictures on the shared engine.

``DemoService`` holds the model, its continuous-batching ``Engine`` (one background
thread for every browser session) and the ``UploadFolder`` the app owns; ``ChatHandlers``
are the events as plain functions; ``ui.build_demo`` (which imports ``gradio``) wires them
into the app. Everything but ``ui`` works without gradio installed.
"""

from .conversation import Conversation, Picture, Turn
from .errors import DemoError
from .handlers import ChatHandlers
from .limits import DemoLimits
from .service import DemoService
from .settings import GenerationSettings
from .uploads import UploadFolder, UploadRefused

__all__ = [
    "ChatHandlers",
    "Conversation",
    "DemoError",
    "DemoLimits",
    "DemoService",
    "GenerationSettings",
    "Picture",
    "Turn",
    "UploadFolder",
    "UploadRefused",
]
