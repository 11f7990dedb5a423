"""Drawing a grounded answer's boxes and labels on the conversation's latest picture."""

from __future__ import annotations

from pathlib import Path

from ..cli.annotate import latest_image_ref, save_boxes
from ..cli.image_store import ImageStore
from .conversation import Conversation
from .uploads import UploadFolder


def draw_answer(conversation: Conversation, folder: UploadFolder) -> Path | None:
    """The last answer's boxes drawn on the newest picture of the conversation (as the official
    ``draw_bbox_on_latest_picture`` picks it) and saved as PNG in ``folder.boxes``; None when
    the answer has no box or the conversation no picture. Labels in Chinese use the CJK font
    ``qwen_vl.grounding`` finds."""
    if not conversation.turns:
        return None
    response = conversation.turns[-1].response
    queries = [t.query for t in conversation.turns]
    ref = latest_image_ref(response, queries)
    picture = next((p for p in reversed(conversation.pictures()) if p.ref == ref), None)
    if picture is None:
        return None
    store = ImageStore(folder.policy)
    store.images[ref] = folder.open(picture.path)
    return save_boxes(response, queries, store, folder.boxes)
