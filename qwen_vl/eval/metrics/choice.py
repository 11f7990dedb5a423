"""Multiple choice (ScienceQA-IMG, SEED-Bench, AI2D): answer letters and likelihood selection.

Generation mode: ``parse_choice`` reads the option letter from a free-form reply;
``choice_accuracy = mean over items of [parsed letter == answer letter]``.

Likelihood mode (what Qwen-VL's scripts use for ScienceQA and SEED-Bench): every option
is scored by the model's average token loss on it and ``select_by_loss`` picks the
lowest (the first one on ties); no text is parsed.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Sequence

from qwen_vl.eval.metrics.scores import Scores, check_lengths, scores_of

#: Letters used when the options are not given.
DEFAULT_LETTERS = "ABCDE"

# A letter: "(b)", a capital standing alone, or a small letter closed by ")", ".", ":", "," or the end.
_LETTER = r"(?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z])|([a-z])(?=[).:,]|\s*$))"
_MARKED = (
    # "The answer is B", "Answer: b) ...", "the correct option is (C)", "answer would be D."
    r"(?i:answer|option|choice)\s*(?:is|would be|should be)?\s*[:：]?\s*" + _LETTER,
    # "答案是B", "答案：C", "选B"
    r"(?:答案\s*(?:是|为)?|选择?)\s*[:：]?\s*" + _LETTER,
)
_WHOLE = re.compile(r"\(?([a-z])\)?[.:)]?", re.IGNORECASE)
_LEADING = re.compile(r"\(?([A-Z])(?:\)|[.:,]\s|[.:]$)")
_STANDALONE = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z'])")
# "A" followed by one of these words is the letter, not the article ("A is correct").
_VERBS_AFTER_LETTER = frozenset({"is", "was", "seems", "would", "should", "because", "and", "or"})


def _letters(options: Sequence[str] | None, letters: str | None) -> str:
    if letters is not None:
        return letters.upper()
    if options is not None:
        if len(options) > len(string.ascii_uppercase):
            raise ValueError(f"at most 26 options are supported, got {len(options)}")
        return string.ascii_uppercase[: len(options)]
    return DEFAULT_LETTERS


def _by_option_text(text: str, options: Sequence[str], valid: str) -> str | None:
    lowered = " ".join(text.lower().split())
    found = []
    for letter, option in zip(valid, options):
        needle = " ".join(option.lower().split())
        if needle and re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", lowered):
            found.append((letter, needle))
    # An option contained in another found option ("red" in "dark red") gives way to it.
    kept = [letter for letter, n in found if not any(n != m and n in m for _, m in found)]
    return kept[0] if len(kept) == 1 else None


def parse_choice(response: str, options: Sequence[str] | None = None, letters: str | None = None) -> str | None:
    """The option letter a reply chooses, or None when it names none (or several).

    Read in this order: an explicit answer marker (``"The answer is B"``,
    ``"Answer: b) ..."``, ``"答案是B"``); the whole reply being a letter (``"B"``,
    ``"(b)"``, ``"B."``); a leading letter (``"B. cat"``, ``"(B) cat"``); exactly one
    standalone capital letter among the valid ones (``"I pick C"``); the text of exactly
    one option (with ``options``). Full-width characters are read as ASCII. Valid letters
    are ``letters``, else the first ``len(options)`` capitals, else ``"ABCDE"``.
    """
    valid = _letters(options, letters)
    text = unicodedata.normalize("NFKC", response).strip()
    if not text:
        return None
    for pattern in _MARKED:
        match = re.search(pattern, text)
        letter = _letter_of(match)
        if letter is not None and letter in valid:
            return letter
    match = _WHOLE.fullmatch(text) or _LEADING.match(text)
    if match and match.group(1).upper() in valid:
        return match.group(1).upper()
    standalone = {m.group(1) for m in _STANDALONE.finditer(text) if m.group(1) in valid}
    if _article_a(text):
        standalone.discard("A")
    if len(standalone) == 1:
        return standalone.pop()
    if options is not None:
        return _by_option_text(text, options, valid)
    return None


def _letter_of(match: re.Match[str] | None) -> str | None:
    if match is None:
        return None
    return next(g for g in match.groups() if g is not None).upper()


def _article_a(text: str) -> bool:
    """Whether ``text`` uses ``A`` as the article ("A dog is ...")."""
    return any(m.group(1) not in _VERBS_AFTER_LETTER for m in re.finditer(r"(?<![A-Za-z])A ([a-z]+)", text))


def choice_accuracy(
    responses: Sequence[str],
    answers: Sequence[str],
    options: Sequence[Sequence[str]] | None = None,
) -> Scores:
    """Per item 1.0 when ``parse_choice`` gives the answer letter, and the mean."""
    check_lengths("responses", responses, "answers", answers)
    if options is not None:
        check_lengths("responses", responses, "options", options)
    per_item = []
    for i, (response, answer) in enumerate(zip(responses, answers)):
        chosen = parse_choice(response, None if options is None else options[i])
        per_item.append(float(chosen is not None and chosen == answer.strip().upper()))
    return scores_of(per_item)


def select_by_loss(average_losses: Sequence[float]) -> int:
    """Index of the option with the lowest average loss (the first one on ties)."""
    if not average_losses:
        raise ValueError("average_losses must not be empty")
    for i, loss in enumerate(average_losses):
        if math.isnan(loss):
            raise ValueError(f"average loss of option {i} is NaN")
    best = 0
    for i, loss in enumerate(average_losses):
        if loss < average_losses[best]:
            best = i
    return best


def likelihood_accuracy(option_losses: Sequence[Sequence[float]], answers: Sequence[int]) -> Scores:
    """Per item 1.0 when ``select_by_loss`` picks the answer index, and the mean."""
    check_lengths("option_losses", option_losses, "answers", answers)
    return scores_of([float(select_by_loss(losses) == answer) for losses, answer in zip(option_losses, answers)])
