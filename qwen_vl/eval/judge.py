"""A language-model judge for open-ended answers (TouchStone-style), over any
OpenAI-compatible chat-completions endpoint.

For each item the judge reads a text description of the image (it does not see the
image), the question, a reference answer and the model's answer, and gives each answer
a score from 1 to 10; the reference is "Assistant 1", the model "Assistant 2". The
judge's first line should hold the two scores; ``parse_scores`` also reads labelled
scores (``Assistant 1: 8``), ``8/10`` forms and ``[[8, 7]]``.

The endpoint is ``{base_url}/chat/completions``; ``base_url``, ``model`` and ``api_key``
come from arguments or the environment (``QWEN_VL_JUDGE_BASE_URL`` or
``OPENAI_BASE_URL``, ``QWEN_VL_JUDGE_MODEL``, ``QWEN_VL_JUDGE_API_KEY`` or
``OPENAI_API_KEY``). Timeouts, connection errors, 429 and 5xx replies are retried with
exponential backoff (``Retry-After`` honoured); other errors fail at once.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of answers about images."
JUDGE_TEMPLATE = """[Image description]
{description}

[Question]
{question}

[Assistant 1]
{reference}
[End of Assistant 1]

[Assistant 2]
{answer}
[End of Assistant 2]

You cannot see the image; its description above is accurate. Rate the helpfulness, \
relevance, accuracy and level of detail of each assistant's answer to the question. \
Give each assistant an overall score from 1 to 10, where higher is better.
On the first line write only the two scores, for Assistant 1 and Assistant 2, separated \
by a space. From the second line on, explain your rating briefly and without bias from \
the order of the answers."""

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_SCORE = 10.0
_NUMBER = r"(\d+(?:\.\d+)?)(?:\s*/\s*10)?"
_LABELLED = re.compile(r"assistant\s*([12])\s*(?:'s)?\s*(?:score)?\s*[:=：]?\s*(?:is\s*)?" + _NUMBER, re.I)
_BRACKETED = re.compile(r"\[\[\s*" + _NUMBER + r"\s*,\s*" + _NUMBER + r"\s*\]\]")
_PAIR = re.compile(r"^\W*" + _NUMBER + r"\s*(?:,|\s|and|vs\.?)\s*" + _NUMBER + r"\b", re.I)


class JudgeError(RuntimeError):
    """The endpoint failed (after retries) or answered something that is not a chat completion."""


@dataclass(frozen=True)
class JudgeItem:
    """One open-ended question to judge."""

    id: str
    description: str
    question: str
    reference: str
    answer: str


@dataclass(frozen=True)
class JudgeScore:
    """The judge's scores (1..10) for the reference and the model's answer; ``None`` when its
    reply could not be read (``reply`` keeps the text)."""

    id: str
    reference_score: float | None
    answer_score: float | None
    reply: str


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to call the judge."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    temperature: float = 0.0
    max_tokens: int = 512

    @classmethod
    def from_env(
        cls,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        env: Mapping[str, str] | None = None,
        **options: Any,
    ) -> JudgeConfig:
        """A config from the arguments, falling back to the environment (see the module docstring)."""
        env = os.environ if env is None else env
        model = model or env.get("QWEN_VL_JUDGE_MODEL")
        if not model:
            raise ValueError("no judge model: pass model= or set QWEN_VL_JUDGE_MODEL")
        base_url = base_url or env.get("QWEN_VL_JUDGE_BASE_URL") or env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        api_key = api_key or env.get("QWEN_VL_JUDGE_API_KEY") or env.get("OPENAI_API_KEY")
        return cls(base_url=base_url, model=model, api_key=api_key, **options)


def judge_messages(item: JudgeItem) -> list[dict[str, str]]:
    """The chat messages sent to the judge for one item."""
    user = JUDGE_TEMPLATE.format(
        description=item.description.strip(),
        question=item.question.strip(),
        reference=item.reference.strip(),
        answer=item.answer.strip(),
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_scores(reply: str) -> tuple[float, float] | None:
    """``(Assistant 1's score, Assistant 2's score)`` from a judge's reply, or None.

    Read in this order: ``[[8, 7]]``; labelled scores (``Assistant 1: 8/10 ... Assistant 2
    score: 7``); the first line that starts with two numbers (``8 7``, ``8, 7``, ``8/10 and
    7/10``). Scores outside 0..10 make the reply unreadable.
    """
    pair: tuple[str, str] | None = None
    bracketed = _BRACKETED.search(reply)
    if bracketed:
        pair = (bracketed.group(1), bracketed.group(2))
    else:
        labelled: dict[str, str] = {}
        for match in _LABELLED.finditer(reply):
            labelled.setdefault(match.group(1), match.group(2))
        if len(labelled) == 2:
            pair = (labelled["1"], labelled["2"])
        else:
            for line in reply.splitlines():
                if line.strip():
                    match = _PAIR.match(line.strip())
                    pair = (match.group(1), match.group(2)) if match else None
                    break
    if pair is None:
        return None
    scores = (float(pair[0]), float(pair[1]))
    return scores if all(0 <= s <= MAX_SCORE for s in scores) else None


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value = error.headers.get("Retry-After") if error.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def chat_completion(
    config: JudgeConfig, messages: Sequence[Mapping[str, str]], sleep: Callable[[float], None] = time.sleep
) -> str:
    """The assistant text of one chat completion; retries as the module docstring says."""
    url = config.base_url.rstrip("/") + "/chat/completions"
    body = json.dumps(
        {
            "model": config.model,
            "messages": list(messages),
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
        }
    ).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    last = ""
    for attempt in range(config.retries + 1):
        wait = config.backoff * 2**attempt
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=config.timeout) as response:
                payload = response.read()
            return _content(payload, url)
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode("utf-8", "replace")
            last = f"HTTP {error.code} from {url}: {detail}"
            if error.code != 429 and error.code < 500:
                raise JudgeError(last) from None
            wait = _retry_after(error) or wait
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            last = f"cannot reach {url}: {getattr(error, 'reason', error)}"
        if attempt < config.retries:
            sleep(wait)
    raise JudgeError(f"{last} (gave up after {config.retries + 1} attempts)")


def _content(payload: bytes, url: str) -> str:
    try:
        data = json.loads(payload)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeError(f"{url} did not answer a chat completion: {payload[:300]!r}") from None
    if not isinstance(content, str):
        raise JudgeError(f"{url} answered a non-text message content: {content!r}")
    return content


def judge(
    items: Sequence[JudgeItem], config: JudgeConfig, sleep: Callable[[float], None] = time.sleep
) -> list[JudgeScore]:
    """The judge's scores for each item, in order."""
    scores = []
    for item in items:
        reply = chat_completion(config, judge_messages(item), sleep)
        parsed = parse_scores(reply)
        scores.append(JudgeScore(item.id, *(parsed if parsed else (None, None)), reply=reply))
    return scores


def summarize(scores: Sequence[JudgeScore]) -> dict[str, float | int]:
    """Means over the readable replies: ``answer`` and ``reference`` (1..10), ``relative``
    (``100 * sum(answer) / sum(reference)``), and the counts judged and unreadable."""
    read = [s for s in scores if s.answer_score is not None and s.reference_score is not None]
    answer = sum(s.answer_score for s in read)  # type: ignore[misc]
    reference = sum(s.reference_score for s in read)  # type: ignore[misc]
    return {
        "answer": answer / len(read) if read else 0.0,
        "reference": reference / len(read) if read else 0.0,
        "relative": 100 * answer / reference if reference else 0.0,
        "count": len(scores),
        "unreadable": len(scores) - len(read),
    }
