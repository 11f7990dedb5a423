"""An OpenAI-compatible HTTP server over the continuous-batching engine (``qwen-vl serve``).

``create_app(EngineService(model, tokenizer, name, ...), api_key)`` is the FastAPI
application; ``qwen_vl.cli.serve`` runs it with uvicorn. Importing this package needs
``fastapi`` (a dependency of qwen-vl).
"""

from .app import create_app
from .errors import APIError
from .limits import ImageAccess, ServerLimits
from .service import EngineService

__all__ = ["APIError", "EngineService", "ImageAccess", "ServerLimits", "create_app"]
