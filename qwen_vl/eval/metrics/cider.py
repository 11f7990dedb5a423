"""CIDEr-D for captioning (NoCaps, Flickr30K), as computed by pycocoevalcap 1.2.

For each image, candidate ``c`` and references ``r_1..r_m`` (all tokenised), and each
n = 1..4, n-grams are weighted by TF-IDF: ``g(w) = tf(w) * (log N - log max(1, df(w)))``
with ``N`` the number of images and ``df(w)`` the number of images whose references
contain ``w`` (so scores depend on the whole evaluated set). Then

    CIDEr_n = 1/m * sum_j [ sum_w min(g_c(w), g_rj(w)) * g_rj(w) / (|g_c| |g_rj|) ]
              * exp(-(l_c - l_rj)^2 / (2 * 6^2))
    CIDEr-D = 10 * mean over n of CIDEr_n

where ``l`` counts a sentence's bigrams (pycocoevalcap's length) and a norm of 0 leaves
the dot product undivided.

``ptb_tokenize`` approximates the Stanford PTB tokenizer that pycocoevalcap runs through
Java: lower-case, parentheses and brackets become ``-lrb-``/``-rrb-``, ``-lsb-``/``-rsb-``,
``-lcb-``/``-rcb-`` tokens (kept, as the Java pipeline keeps them), clitics split
(``don't`` -> ``do n't``), punctuation tokens removed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from qwen_vl.eval.metrics.scores import Scores

MAX_N = 4
SIGMA = 6.0
SCALE = 10.0

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_SYMBOLS = re.compile(r"([%$#])")
_CLITIC = re.compile(r"(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"]}
_PUNCT_ONLY = re.compile(r"[.?!,:;\-'`\"]+")
_EDGE_PUNCT = ".,!?;:'\"`"

Ngram = tuple[str, ...]


def _split_word(chunk: str) -> list[str]:
    chunk = chunk.lstrip(_EDGE_PUNCT)
    keep_period = chunk.endswith(".") and "." in chunk[:-1].strip(".")  # "p.m.", "u.s."
    core = chunk if keep_period else chunk.rstrip(_EDGE_PUNCT)
    if not core:
        return []
    if core in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[core])
    tail: list[str] = []
    while (match := _CLITIC.search(core)) and match.start() > 0:
        tail.insert(0, match.group(1))
        core = core[: match.start()]
    if core.endswith("'"):  # "dogs'"
        core = core.rstrip("'")
    return [core, *tail]


def ptb_tokenize(text: str) -> list[str]:
    """Lower-cased PTB-style tokens of a caption with punctuation tokens removed (see the module docstring)."""
    text = text.lower().replace("\n", " ")
    for bracket, token in _BRACKETS.items():
        text = text.replace(bracket, f" {token} ")
    text = _SPLIT_SYMBOLS.sub(r" \1 ", text.replace('"', " "))
    tokens: list[str] = []
    for chunk in text.split():
        tokens.extend(_split_word(chunk))
    return [t for t in tokens if t and not _PUNCT_ONLY.fullmatch(t)]


def _ngrams(tokens: Sequence[str], max_n: int = MAX_N) -> Counter[Ngram]:
    counts: Counter[Ngram] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def _vector(
    counts: Counter[Ngram], df: Counter[Ngram], log_images: float
) -> tuple[list[dict[Ngram, float]], list[float], int]:
    """TF-IDF weights per n, their norms, and the bigram count."""
    vec: list[dict[Ngram, float]] = [{} for _ in range(MAX_N)]
    norm = [0.0] * MAX_N
    for ngram, tf in counts.items():
        n = len(ngram) - 1
        weight = tf * (log_images - math.log(max(1.0, df[ngram])))
        vec[n][ngram] = weight
        norm[n] += weight * weight
    bigrams = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)
    return vec, [math.sqrt(x) for x in norm], bigrams


def _similarity(
    cand: tuple[list[dict[Ngram, float]], list[float], int],
    ref: tuple[list[dict[Ngram, float]], list[float], int],
    sigma: float,
) -> list[float]:
    (vc, nc, lc), (vr, nr, lr) = cand, ref
    penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
    out = []
    for n in range(MAX_N):
        value = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vc[n].items())
        if nc[n] != 0 and nr[n] != 0:
            value /= nc[n] * nr[n]
        out.append(value * penalty)
    return out


def cider_d(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    tokenize: bool = True,
    sigma: float = SIGMA,
) -> Scores:
    """CIDEr-D of each candidate caption (in the order of ``references``' keys) and the corpus mean.

    ``candidates`` maps an image id to one caption, ``references`` the same ids to their
    reference captions. With ``tokenize=False`` the captions are split on whitespace only
    (for text already tokenised).
    """
    if set(candidates) != set(references):
        missing = sorted(map(str, set(references) ^ set(candidates)))[:5]
        raise ValueError(f"candidates and references must have the same image ids; differing: {missing}")
    split = ptb_tokenize if tokenize else str.split
    ids = list(references)
    refs = {i: [_ngrams(split(r)) for r in references[i]] for i in ids}
    for i in ids:
        if not refs[i]:
            raise ValueError(f"image {i!r} has no reference captions")
    df: Counter[Ngram] = Counter()
    for i in ids:
        df.update({g for counts in refs[i] for g in counts})
    log_images = math.log(float(len(ids))) if ids else 0.0
    per_item = []
    for i in ids:
        cand = _vector(_ngrams(split(candidates[i])), df, log_images)
        total = [0.0] * MAX_N
        for counts in refs[i]:
            sim = _similarity(cand, _vector(counts, df, log_images), sigma)
            total = [a + b for a, b in zip(total, sim)]
        per_item.append(sum(total) / MAX_N / len(refs[i]) * SCALE)
    return Scores(per_item, sum(per_item) / len(per_item) if per_item else 0.0)
