"""The Qwen-VL tokenizer: tiktoken BPE over ``qwen.tiktoken`` plus Qwen-VL's tags.

Behaviour follows the official ``QWenTokenizer`` token for token:

* text is NFC-normalised, then BPE-encoded by tiktoken with the Qwen pre-tokenizer;
* special-token strings typed in the text become special ids by default
  (``allowed_special="all"``); pass a smaller ``allowed_special`` to keep them text;
* the content of an ``<img>...</img>`` span is not BPE-encoded: it becomes its UTF-8
  bytes as ids 0-255, padded with ``<imgpad>`` to 256 ids, and ``decode`` turns such a
  span back into ``<img>path</img>``.

BPE tokens are ``bytes`` and special tokens ``str`` wherever tokens (not ids) appear.
"""

from __future__ import annotations

import base64
import json
import os
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

if TYPE_CHECKING:
    from PIL import Image

    from qwen_vl.images import ImagePolicy

#: Pre-tokenizer regex of the official vocabulary.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
#: Special tokens that precede the image tags, in id order.
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND, *EXTRAS)
#: Ids between ``<img>`` and ``</img>``: path bytes plus ``<imgpad>`` padding.
IMG_TOKEN_SPAN = 256

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

_TAG_DEFAULTS = {
    "image_start_tag": "<img>",
    "image_end_tag": "</img>",
    "image_pad_tag": "<imgpad>",
    "ref_start_tag": "<ref>",
    "ref_end_tag": "</ref>",
    "box_start_tag": "<box>",
    "box_end_tag": "</box>",
    "quad_start_tag": "<quad>",
    "quad_end_tag": "</quad>",
}

Token = bytes | str


def load_tiktoken_bpe(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file: one ``base64(token) rank`` pair per line."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    ranks: dict[bytes, int] = {}
    for line in lines:
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _closed_spans(ids: Sequence[int], end_of: dict[int, int]) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` of each tagged span, ``ids[start]`` and ``ids[end]`` being its tags.

    ``end_of`` maps each opening tag id to its closing tag id. Spans are found left to right;
    an opening tag without its closing tag raises ``ValueError("Unclosed image token")``.
    """
    pos, n = 0, len(ids)
    only = next(iter(end_of)) if len(end_of) == 1 else None
    while pos < n:
        if only is not None:
            start = _index(ids, only, pos)
        else:
            start = next((i for i in range(pos, n) if ids[i] in end_of), -1)
        if start < 0:
            return
        end = _index(ids, end_of[ids[start]], start + 1)
        if end < 0:
            raise ValueError("Unclosed image token")
        yield start, end
        pos = end + 1


def _index(ids: Sequence[int], value: int, start: int) -> int:
    try:
        return ids.index(value, start)
    except ValueError:
        return -1


def _as_set(tokens: Any) -> Any:
    """Accept lists/tuples where tiktoken wants a set; keep ``"all"`` (and sets) as they are."""
    if isinstance(tokens, (list, tuple)):
        return set(tokens)
    return tokens


class QWenTokenizer(PreTrainedTokenizer):
    """Tokenizer of Qwen-VL (``qwen.tiktoken`` vocabulary, 151860 ids)."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> QWenTokenizer:
        """The tokenizer of a local checkpoint folder (``"demo"``: the bundled demo model's)."""
        from .bundled import resolve_model_dir

        return super().from_pretrained(resolve_model_dir(pretrained_model_name_or_path), *args, **kwargs)

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        errors: str = "replace",
        image_start_tag: str = "<img>",
        image_end_tag: str = "</img>",
        image_pad_tag: str = "<imgpad>",
        ref_start_tag: str = "<ref>",
        ref_end_tag: str = "</ref>",
        box_start_tag: str = "<box>",
        box_end_tag: str = "</box>",
        quad_start_tag: str = "<quad>",
        quad_end_tag: str = "</quad>",
        **kwargs: Any,
    ) -> None:
        self.vocab_file = str(vocab_file)
        self.errors = errors
        self.image_start_tag = image_start_tag
        self.image_end_tag = image_end_tag
        self.image_pad_tag = image_pad_tag
        self.ref_start_tag = ref_start_tag
        self.ref_end_tag = ref_end_tag
        self.box_start_tag = box_start_tag
        self.box_end_tag = box_end_tag
        self.quad_start_tag = quad_start_tag
        self.quad_end_tag = quad_end_tag
        #: Image and grounding tags, in id order.
        self.IMAGE_ST = (
            ref_start_tag,
            ref_end_tag,
            box_start_tag,
            box_end_tag,
            quad_start_tag,
            quad_end_tag,
            image_start_tag,
            image_end_tag,
            image_pad_tag,
        )

        self.mergeable_ranks = load_tiktoken_bpe(vocab_file)
        first = len(self.mergeable_ranks)
        self.special_tokens = {tok: first + i for i, tok in enumerate(SPECIAL_TOKENS + self.IMAGE_ST)}
        self._build_encoding()

        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        self.img_start_id = self.special_tokens[image_start_tag]
        self.img_end_id = self.special_tokens[image_end_tag]
        self.img_pad_id = self.special_tokens[image_pad_tag]
        self.ref_start_id = self.special_tokens[ref_start_tag]
        self.ref_end_id = self.special_tokens[ref_end_tag]
        self.box_start_id = self.special_tokens[box_start_tag]
        self.box_end_id = self.special_tokens[box_end_tag]
        self.quad_start_id = self.special_tokens[quad_start_tag]
        self.quad_end_id = self.special_tokens[quad_end_tag]
        #: Tags that ``decode(..., skip_special_tokens=True, keep_image_special=True)`` keeps.
        self.image_special_tokens = {
            self.ref_start_id,
            self.ref_end_id,
            self.box_start_id,
            self.box_end_id,
            self.quad_start_id,
            self.quad_end_id,
        }

        # The official files name no pad token; padding uses <|endoftext|> unless told otherwise.
        kwargs.setdefault("pad_token", ENDOFTEXT)
        kwargs.pop("tokenizer_file", None)
        super().__init__(**kwargs)

    # ----- construction and pickling -------------------------------------
    def _build_encoding(self) -> None:
        self.tokenizer = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        if self.tokenizer.n_vocab != len(self.mergeable_ranks) + len(self.special_tokens):
            raise ValueError(f"{self.vocab_file}: ranks and special tokens do not form a dense vocabulary")
        self.decoder: dict[int, Token] = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})

    def _non_default_tags(self) -> dict[str, str]:
        return {k: getattr(self, k) for k, v in _TAG_DEFAULTS.items() if getattr(self, k) != v}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["tokenizer"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.tokenizer = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )

    # ----- vocabulary ------------------------------------------------------
    def __len__(self) -> int:
        return self.tokenizer.n_vocab

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (151860)."""
        return self.tokenizer.n_vocab

    def get_vocab(self) -> dict[Token, int]:
        """Token → id for every id: BPE tokens as ``bytes``, special tokens as ``str``."""
        return {**self.mergeable_ranks, **self.special_tokens}

    def convert_tokens_to_ids(self, tokens: Token | Iterable[Token]) -> int | None | list[int | None]:
        """Id of one token or of each token in a list (``None`` for unknown tokens)."""
        if isinstance(tokens, (str, bytes)):
            return self._lookup(tokens)
        return [self._lookup(t) for t in tokens]

    def _lookup(self, token: Token) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.mergeable_ranks.get(token)

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> Token | list[Token]:
        """Token of one id or of each id (``ValueError`` for ids outside the vocabulary)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            return self._convert_id_to_token(ids)
        return [self._convert_id_to_token(int(i)) for i in ids if not (skip_special_tokens and int(i) >= self.eod_id)]

    def _convert_id_to_token(self, index: int) -> Token:
        if index in self.decoder:
            return self.decoder[index]
        raise ValueError("unknown ids")

    def _convert_token_to_id(self, token: Token) -> int:
        token_id = self._lookup(token)
        if token_id is None:
            raise ValueError("unknown token")
        return token_id

    def _add_tokens(self, new_tokens: list[str] | list[AddedToken], special_tokens: bool = False) -> int:
        """The vocabulary is fixed: only the existing special tokens may be 'added' (a no-op)."""
        if new_tokens and not special_tokens:
            raise ValueError("Adding regular tokens is not supported")
        for token in new_tokens:
            surface = token.content if isinstance(token, AddedToken) else token
            if surface not in self.special_tokens:
                raise ValueError("Adding unknown special tokens is not supported")
        return 0

    # ----- saving ------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write ``qwen.tiktoken`` (ranks in ascending order)."""
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "qwen.tiktoken")
        with open(path, "wb") as f:
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                f.write(base64.b64encode(token) + b" " + str(rank).encode("ascii") + b"\n")
        return (path,)

    def save_pretrained(
        self, save_directory: str | os.PathLike, filename_prefix: str | None = None, **kwargs: Any
    ) -> tuple[str, ...]:
        """Write ``qwen.tiktoken`` and a ``tokenizer_config.json`` in the official layout.

        The config holds ``model_max_length``, ``tokenizer_class`` and, when the loaded one had it,
        ``auto_map``; settings that differ from the defaults (``errors``, padding side, pad token,
        tag names) are added after those keys.
        """
        if kwargs.get("push_to_hub"):
            raise NotImplementedError("push_to_hub is not supported; upload the saved folder instead")
        save_directory = str(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        prefix = filename_prefix + "-" if filename_prefix else ""
        config_path = os.path.join(save_directory, prefix + TOKENIZER_CONFIG_FILE)
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(self._config_to_save(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        return (config_path, *self.save_vocabulary(save_directory, filename_prefix))

    def _config_to_save(self) -> dict[str, Any]:
        config: dict[str, Any] = {}
        if self.model_max_length < int(1e20):
            config["model_max_length"] = self.model_max_length
        config["tokenizer_class"] = type(self).__name__
        if "auto_map" in self.init_kwargs:
            config["auto_map"] = self.init_kwargs["auto_map"]
        if self.errors != "replace":
            config["errors"] = self.errors
        for side in ("padding_side", "truncation_side"):
            if getattr(self, side) != "right":
                config[side] = getattr(self, side)
        pad = self._special_tokens_map.get("pad_token")
        if pad is None or str(pad) != ENDOFTEXT:
            config["pad_token"] = None if pad is None else str(pad)
        config.update(self._non_default_tags())
        return config

    # ----- encoding ----------------------------------------------------------
    def _encode_text(
        self, text: str, allowed_special: Collection[str] | str = "all", disallowed_special: Collection[str] | str = ()
    ) -> list[int]:
        """NFC + tiktoken, then each ``<img>...</img>`` span rewritten as path bytes + padding."""
        text = unicodedata.normalize("NFC", text)
        ids = self.tokenizer.encode(
            text, allowed_special=_as_set(allowed_special), disallowed_special=_as_set(disallowed_special)
        )
        if self.img_start_id not in ids:
            return ids
        out: list[int] = []
        pos = 0
        for start, end in _closed_spans(ids, {self.img_start_id: self.img_end_id}):
            out.extend(ids[pos:start])
            out.extend(self._image_span_ids(ids[start + 1 : end]))
            pos = end + 1
        out.extend(ids[pos:])
        return out

    def _image_span_ids(self, content: list[int]) -> list[int]:
        for i, token_id in enumerate(content):
            if token_id >= self.eod_id:
                # The same error the reference raises when joining a special (str) token into the path bytes.
                raise TypeError(f"sequence item {i}: expected a bytes-like object, str found")
        path = b"".join(self.decoder[t] for t in content)
        if len(path) > IMG_TOKEN_SPAN:
            raise ValueError(f"The content in {self.image_start_tag}..{self.image_end_tag} is too long")
        # Byte value b becomes the id whose rank is b.
        return [self.img_start_id, *path, *[self.img_pad_id] * (IMG_TOKEN_SPAN - len(path)), self.img_end_id]

    def tokenize(
        self,
        text: str,
        allowed_special: Collection[str] | str = "all",
        disallowed_special: Collection[str] | str = (),
        **kwargs: Any,
    ) -> list[Token]:
        """Tokens of ``text``: ``bytes`` for BPE tokens, ``str`` for special tokens."""
        return [self.decoder[i] for i in self._encode_text(text, allowed_special, disallowed_special)]

    def encode(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding: Any = False,
        truncation: Any = None,
        max_length: int | None = None,
        stride: int = 0,
        padding_side: str | None = None,
        return_tensors: Any = None,
        *,
        allowed_special: Collection[str] | str = "all",
        disallowed_special: Collection[str] | str = (),
        **kwargs: Any,
    ) -> list[int]:
        """Ids of ``text``.

        ``allowed_special``: special-token strings that become special ids (``"all"`` by default;
        a set such as ``set(tokenizer.IMAGE_ST)`` keeps the others as plain text).
        ``disallowed_special``: strings that raise ``ValueError`` when found (none by default).
        """
        plain = (
            isinstance(text, str)
            and text_pair is None
            and padding is False
            and truncation in (None, False)
            and max_length is None
            and return_tensors is None
            and not kwargs
        )
        if plain:
            ids = self._encode_text(text, allowed_special, disallowed_special)
            self._eventual_warn_about_too_long_sequence(ids, None, True)
            return ids
        return super().encode(
            text,
            text_pair=text_pair,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            stride=stride,
            padding_side=padding_side,
            return_tensors=return_tensors,
            allowed_special=allowed_special,
            disallowed_special=disallowed_special,
            **kwargs,
        )

    def _tokenize(self, text: str, **kwargs: Any) -> list[Token]:
        return self.tokenize(text, **kwargs)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Qwen adds no special tokens around a sequence (earlier transformers 5 releases
        default to [CLS] ... [SEP], which this tokenizer does not have)."""
        return token_ids_0 + (token_ids_1 or [])

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 for special ids already in the sequence, 0 elsewhere (none are added)."""
        ids = token_ids_0 + (token_ids_1 or [])
        return [1 if i >= self.eod_id else 0 for i in ids]

    # ----- decoding ----------------------------------------------------------
    def convert_tokens_to_string(self, tokens: Iterable[Token]) -> str:
        """Join tokens; runs of ``bytes`` are UTF-8 decoded with ``self.errors``."""
        parts: list[str] = []
        pending = b""
        for t in tokens:
            if isinstance(t, bytes):
                pending += t
            elif isinstance(t, str):
                if pending:
                    parts.append(pending.decode("utf-8", errors=self.errors))
                    pending = b""
                parts.append(t)
            else:
                raise TypeError("token should only be of type bytes or str")
        if pending:
            parts.append(pending.decode("utf-8", errors=self.errors))
        return "".join(parts)

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        errors: str | None = None,
        keep_image_special: bool = False,
        **kwargs: Any,
    ) -> str | list[str]:
        """Text of ``token_ids`` (an int, a list, a tensor or an array; a batch gives a list).

        Image spans come back as ``<img>path</img>``. ``skip_special_tokens`` drops every special
        id (an image path stays as text); with ``keep_image_special`` the ``<ref>``/``<box>``/
        ``<quad>`` tags are kept. ``errors`` is the UTF-8 error policy (default ``self.errors``).
        """
        return super().decode(
            token_ids,
            skip_special_tokens=skip_special_tokens,
            errors=errors,
            keep_image_special=keep_image_special,
            **kwargs,
        )

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        errors: str | None = None,
        keep_image_special: bool = False,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if self.img_start_id in token_ids:
            token_ids = self._restore_image_spans(token_ids)
        if skip_special_tokens:
            keep = self.image_special_tokens if keep_image_special else ()
            token_ids = [i for i in token_ids if i < self.eod_id or i in keep]
        return self.tokenizer.decode(token_ids, errors=errors or self.errors)

    def _restore_image_spans(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        pos = 0
        for start, end in _closed_spans(ids, {self.img_start_id: self.img_end_id}):
            out.extend(ids[pos:start])
            content = ids[start + 1 : end]
            path = bytes(content[: content.index(self.img_pad_id)]).decode("utf-8")
            out.extend([self.img_start_id, *self.tokenizer.encode(path), self.img_end_id])
            pos = end + 1
        out.extend(ids[pos:])
        return out

    # ----- list format -------------------------------------------------------
    def from_list_format(self, list_format: Iterable[dict[str, Any]]) -> str:
        """Build a prompt from elements ``{"image": path}``, ``{"text": str}``, ``{"box": [...], "ref"?: str}``.

        Images are numbered ``Picture 1: <img>path</img>\\n``; box coordinates are written with ``%d``.
        Keys are looked up in the order image, text, box; any other element raises ``ValueError``.
        """
        text = ""
        num_images = 0
        for ele in list_format:
            if "image" in ele:
                num_images += 1
                text += f"Picture {num_images}: {self.image_start_tag}{ele['image']}{self.image_end_tag}\n"
            elif "text" in ele:
                text += ele["text"]
            elif "box" in ele:
                if "ref" in ele:
                    text += self.ref_start_tag + ele["ref"] + self.ref_end_tag
                for box in ele["box"]:
                    # %d truncates floats and rejects strings, as the reference does.
                    coords = "(%d,%d),(%d,%d)" % (box[0], box[1], box[2], box[3])  # noqa: UP031
                    text += self.box_start_tag + coords + self.box_end_tag
            else:
                raise ValueError("Unsupport element: " + str(ele))
        return text

    def to_list_format(self, text: str) -> list[dict[str, str]]:
        """Split a prompt into ``{"text"|"image"|"ref"|"box"|"quad": str}`` elements.

        Only the image/grounding tags and ``<|endoftext|>`` may appear; any other special-token
        string raises tiktoken's ``ValueError``.
        """
        text = unicodedata.normalize("NFC", text)
        ids = self.tokenizer.encode(text, allowed_special=set(self.IMAGE_ST) | {ENDOFTEXT})
        keys = {
            self.img_start_id: "image",
            self.ref_start_id: "ref",
            self.box_start_id: "box",
            self.quad_start_id: "quad",
        }
        end_of = {
            self.img_start_id: self.img_end_id,
            self.ref_start_id: self.ref_end_id,
            self.box_start_id: self.box_end_id,
            self.quad_start_id: self.quad_end_id,
        }
        out: list[dict[str, str]] = []
        pos = 0
        for start, end in _closed_spans(ids, end_of):
            if start > pos:
                out.append({"text": self._ids_to_text(ids[pos:start])})
            out.append({keys[ids[start]]: self._ids_to_text(ids[start + 1 : end])})
            pos = end + 1
        if pos < len(ids):
            out.append({"text": self._ids_to_text(ids[pos:])})
        return out

    def _ids_to_text(self, ids: list[int]) -> str:
        return b"".join(
            t.encode("utf-8") if isinstance(t, str) else t for t in map(self.decoder.__getitem__, ids)
        ).decode("utf-8")

    # ----- grounding ---------------------------------------------------------
    def draw_bbox_on_latest_picture(
        self,
        response: str,
        history: Sequence[Sequence[Any]] | None = None,
        *,
        policy: ImagePolicy | None = None,
    ) -> Image.Image | None:
        """The latest picture of the conversation (``response`` first, then the queries of
        ``history`` from the newest turn back) with the boxes of ``response`` drawn on it;
        None without a picture or without boxes. The picture is opened under ``policy``
        (default ``ImagePolicy()``). See ``qwen_vl.grounding.draw_bbox_on_latest_picture``."""
        from qwen_vl.grounding import draw_bbox_on_latest_picture

        return draw_bbox_on_latest_picture(response, history, self, policy=policy)
