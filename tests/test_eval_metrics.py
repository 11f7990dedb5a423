"""Benchmark metrics against hand-computed values, in canonical and Qwen-VL-compatible modes."""

from __future__ import annotations

import importlib.util
import math
import shutil

import pytest

from qwen_vl.eval.metrics.anls import anls, anls_scores, levenshtein
from qwen_vl.eval.metrics.boxes import box_iou, box_to_pixels, grounding_accuracy, parse_box, prediction_iou
from qwen_vl.eval.metrics.choice import choice_accuracy, likelihood_accuracy, parse_choice, select_by_loss
from qwen_vl.eval.metrics.cider import cider_d, ptb_tokenize
from qwen_vl.eval.metrics.exact import exact_match, exact_match_accuracy, gqa_accuracy, qwen_gqa_cut
from qwen_vl.eval.metrics.mme import MMEItem, mme_scores, parse_yes_no
from qwen_vl.eval.metrics.relaxed import parse_number, relaxed_accuracy, relaxed_match
from qwen_vl.eval.metrics.vqa import CONTRACTIONS, normalize_answer, process_punctuation, vqa_accuracy, vqa_scores

# ----------------------------------------------------------------------------- VQA


def test_vqa_normalisation_steps() -> None:
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer("The DOG") == "dog"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("couldnt've") == "couldn't've"
    assert normalize_answer("none") == "0"
    assert process_punctuation("a/b") == "a b"  # no space next to it: replaced by a space
    assert process_punctuation("a / b") == "a  b"  # next to a space: deleted
    assert process_punctuation("1,000 dogs?") == "1000 dogs"  # digit,digit: every mark deleted
    assert process_punctuation("yes.") == "yes" and process_punctuation("3.5") == "3.5"
    assert process_punctuation("." * 40) == "." * 8  # at most 32 periods are removed
    assert len(CONTRACTIONS) == 114 and CONTRACTIONS["somebody'd"] == "somebodyd"


def test_vqa_identical_answers_are_not_normalised_canonically() -> None:
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10, mode="qwen") == 1.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10, mode="qwen") == 1.0


def test_vqa_number_words_contractions_articles() -> None:
    numbers = ["two"] * 3 + ["2"] * 3 + ["three"] * 4
    assert vqa_accuracy("2", numbers) == 1.0  # 6 answers read "2"
    assert vqa_accuracy("2", numbers, mode="qwen") == pytest.approx(0.9)  # (3 * 2/3 + 7 * 1) / 10
    contractions = ["don't"] * 2 + ["dont"] + ["no"] * 7
    assert vqa_accuracy("dont", contractions) == pytest.approx(0.9)  # 3 answers match
    assert vqa_accuracy("dont", contractions, mode="qwen") == pytest.approx(0.6)  # only the 2 "don't"
    articles = ["a dog"] * 4 + ["cat"] * 6
    assert vqa_accuracy("the dog", articles) == 1.0
    assert vqa_accuracy("the dog", articles, mode="qwen") == 0.0  # GT keeps its article


def test_vqa_punctuation_in_numbers_and_min_over_three() -> None:
    answers = ["1,000"] * 2 + ["1000"] + ["many"] * 7
    assert vqa_accuracy("1,000", answers) == pytest.approx(0.9)
    assert vqa_accuracy("1,000", answers, mode="qwen") == pytest.approx(0.9)
    assert vqa_accuracy("many", answers) == 1.0
    assert vqa_accuracy("cat", answers) == 0.0
    one = ["red"] + ["blue"] * 9
    assert vqa_accuracy("red", one) == pytest.approx(0.9 * (1 / 3))  # 9 subsets hold the one "red"


def test_vqa_qwen_leave_one_out_compares_answer_dicts() -> None:
    no_ids = [{"answer": "yes"}] * 3 + [{"answer": "no"}] * 7
    assert vqa_accuracy("yes", no_ids, mode="qwen") == pytest.approx(0.7)  # leaving one "yes" out drops all 3
    with_ids = [{"answer": a["answer"], "answer_id": i + 1} for i, a in enumerate(no_ids)]
    assert vqa_accuracy("yes", with_ids, mode="qwen") == pytest.approx(0.9)
    assert vqa_accuracy("yes", [a["answer"] for a in no_ids], mode="qwen") == pytest.approx(0.9)
    scores = vqa_scores(["yes", "no"], [with_ids, with_ids])
    assert scores.per_item == pytest.approx([0.9, 1.0]) and scores.mean == pytest.approx(0.95)
    with pytest.raises(ValueError, match="mode"):
        vqa_accuracy("yes", ["yes"], mode="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 items but answers has 1"):
        vqa_scores(["a", "b"], [["a"]])


# ----------------------------------------------------------------------------- ANLS


def test_anls_values_and_threshold() -> None:
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert anls("abcd", ["abce"]) == pytest.approx(0.75)
    assert anls("abcd", ["xyz", "ABCD "]) == 1.0  # max over answers, case and spaces ignored
    assert anls("ab", ["ac"]) == 0.0  # NL = 0.5 exactly: canonical gives 0
    assert anls("ab", ["ac"], mode="qwen") == 0.5  # ... the DocVQA script keeps 0.5
    assert anls("abc", ["xyz"], mode="qwen") == 0.0
    assert anls("", [""]) == 1.0


def test_anls_qwen_length_uses_raw_strings() -> None:
    assert anls("a  b", ["ab"]) == pytest.approx(1 - 1 / 3)  # "a b" vs "ab"
    assert anls("a  b", ["ab"], mode="qwen") == pytest.approx(0.75)  # distance 1 over len("A  B") = 4
    scores = anls_scores(["abcd", "zz"], [["abce"], ["abcd"]])
    assert scores.per_item == pytest.approx([0.75, 0.0]) and scores.mean == pytest.approx(0.375)


# ----------------------------------------------------------------------------- relaxed accuracy


def test_relaxed_tolerance_direction() -> None:
    assert relaxed_match("10.4", "10") and relaxed_match("9.5", "10")
    assert not relaxed_match("10.52", "10")  # 5.2% of the target
    assert relaxed_match("10.52", "10", mode="qwen")  # 4.9% of the prediction
    assert relaxed_match("Yes", "yes") and not relaxed_match("yes", "no")


def test_relaxed_percentages_commas_zero() -> None:
    assert (
        parse_number("45%") == pytest.approx(0.45) and parse_number("1,000") == 1000.0 and parse_number("abc") is None
    )
    for mode in ("canonical", "qwen"):
        assert relaxed_match("45%", "0.45", mode=mode)
        assert not relaxed_match("45%", "45", mode=mode)
    assert relaxed_match("1,000", "1000")
    assert not relaxed_match("1,000", "1000", mode="qwen")  # not a number there; strings differ
    assert relaxed_match("0.0", "0") and not relaxed_match("0.01", "0")
    assert not relaxed_match("0.0", "0", mode="qwen")  # a zero is compared as a string
    assert relaxed_match("0", "0", mode="qwen")
    scores = relaxed_accuracy([" 12 ", "blue"], [["11.5", "99"], "red"])
    assert scores.per_item == [1.0, 0.0] and scores.mean == 0.5


# ----------------------------------------------------------------------------- exact match and GQA


def test_exact_match_and_gqa_cut() -> None:
    assert exact_match("  Yes ", "yes") == 1.0 and exact_match("yes.", ["no", "yes"]) == 0.0
    assert exact_match_accuracy(["A", "b"], ["a", ["c", "d"]]).mean == 0.5
    assert qwen_gqa_cut("tennis racket") == "racket"
    assert qwen_gqa_cut("The man is holding a bat.") == "bat"
    assert qwen_gqa_cut("Yes, it is.") == "yes"
    assert qwen_gqa_cut("the color of the car") == "color"
    assert gqa_accuracy(["tennis racket"], ["tennis racket"]).mean == 1.0
    assert gqa_accuracy(["tennis racket"], ["tennis racket"], mode="qwen").mean == 0.0
    assert gqa_accuracy(["It is a bat."], ["bat"], mode="qwen").mean == 1.0


# ----------------------------------------------------------------------------- grounding


def test_parse_box_modes() -> None:
    assert parse_box("<ref>dog</ref><box>(10,20),(300,400)</box>") == (10, 20, 300, 400)
    assert parse_box("(10,20),(300,400)</box>") == (10, 20, 300, 400)  # decoded without special tokens
    assert parse_box("( 10, 20 ), (300 ,400)") == (10, 20, 300, 400)
    assert parse_box("( 10, 20 ), (300 ,400)", mode="qwen") == (0, 0, 0, 0)  # space after the comma
    assert parse_box("(300,400),(10,20)") == (10, 20, 300, 400)  # corners put in order
    assert parse_box("(300,400),(10,20)", mode="qwen") == (300, 400, 10, 20)
    two = "<box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>"
    assert parse_box(two) == parse_box(two, mode="qwen") == (1, 2, 3, 4)
    assert parse_box("<box>(1,2),(3000,4)</box> or (5,6),(7,8)") == (5, 6, 7, 8)  # first that parses
    assert parse_box("<quad>(1,1),(9,1),(9,9),(1,9)</quad>") is None
    assert parse_box("no box here") is None and parse_box("no box here", mode="qwen") == (0, 0, 0, 0)


def test_iou_degenerate_swapped_and_scale() -> None:
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10), mode="qwen") == pytest.approx(1 / 3)
    assert box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 1.0
    assert box_iou((10, 10, 0, 0), (0, 0, 10, 10), mode="qwen") == 0.0
    for mode in ("canonical", "qwen"):
        assert box_iou((5, 5, 5, 10), (0, 0, 10, 10), mode=mode) == 0.0
        assert box_iou((0, 0, 0, 0), (0, 0, 0, 0), mode=mode) == 0.0
    assert box_to_pixels((100, 250, 500, 1000), 640, 480) == (64.0, 120.0, 320.0, 480.0)
    assert box_to_pixels((999, 999, 999, 999), 100, 100, scale=999) == (100.0, 100.0, 100.0, 100.0)
    assert prediction_iou("(0,0),(999,999)", (0, 0, 100, 100), 100, 100, mode="qwen") == pytest.approx(1.0)
    assert prediction_iou("(0,0),(999,999)", (0, 0, 100, 100), 100, 100) == pytest.approx(0.999**2)


def test_grounding_accuracy_inclusive_threshold() -> None:
    # (0,0),(500,1000) on 1000x1000 covers exactly half of the target: IoU 0.5 is a hit.
    predictions = ["<box>(0,0),(500,1000)</box>", "<box>(0,0),(400,1000)</box>", "nothing"]
    targets = [(0, 0, 1000, 1000)] * 3
    scores = grounding_accuracy(predictions, targets, [(1000, 1000)] * 3)
    assert scores.per_item == [1.0, 0.0, 0.0] and scores.mean == pytest.approx(1 / 3)
    assert grounding_accuracy(["(0,0),(999,999)"], [(0, 0, 10, 10)], [(10, 10)], mode="qwen").mean == 1.0


# ----------------------------------------------------------------------------- multiple choice

PHRASINGS = [
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("b", "B"),
    ("The answer is B", "B"),
    ("Answer: b) a dog", "B"),
    ("答案是B", "B"),
    ("答案：C", "C"),
    ("（Ｂ）", "B"),
    ("(C) a red bird", "C"),
    ("D. a bird", "D"),
    ("I think the correct option is (c).", "C"),
    ("A is correct", "A"),
    ("a red bird", "C"),  # option text; "a bird" is not a match of its own
    ("The answer is a dog.", "B"),  # "a" here is an article: read from the option text
    ("A dog.", "B"),
    ("C or D", None),
    ("I don't know", None),
    ("", None),
]


@pytest.mark.parametrize("response, expected", PHRASINGS)
def test_parse_choice_phrasings(response: str, expected: str | None) -> None:
    assert parse_choice(response, ["a cat", "a dog", "a red bird", "a bird"]) == expected


def test_choice_accuracy_and_likelihood_selection() -> None:
    assert parse_choice("E") == "E" and parse_choice("E", ["x", "y"]) is None  # only letters of the options
    scores = choice_accuracy(["The answer is B", "C", "none"], ["B", "A", "A"])
    assert scores.per_item == [1.0, 0.0, 0.0]
    assert select_by_loss([1.2, 0.7, 0.7, 0.9]) == 1  # lowest average loss, first on ties
    assert likelihood_accuracy([[0.5, 0.2], [0.1, 0.3]], [1, 1]).mean == 0.5
    with pytest.raises(ValueError, match="NaN"):
        select_by_loss([0.1, math.nan])


# ----------------------------------------------------------------------------- MME


def test_mme_parse_modes() -> None:
    assert parse_yes_no("Yes, there is.") == parse_yes_no("Yes, there is.", "qwen") == "yes"
    assert parse_yes_no("Not sure") == "other" and parse_yes_no("Not sure", "qwen") == "no"
    assert parse_yes_no("I think yes") == "yes" and parse_yes_no("I think yes", "qwen") == "other"
    assert parse_yes_no("No") == parse_yes_no("no", "qwen") == "no"


def test_mme_acc_plus_and_totals() -> None:
    items = [
        MMEItem("existence", "1.jpg", "Yes", "Yes"),
        MMEItem("existence", "1.jpg", "No", "No, there is not."),
        MMEItem("existence", "2.jpg", "Yes", "yes"),
        MMEItem("existence", "2.jpg", "No", "Yes"),
        MMEItem("code_reasoning", "3.png", "Yes", "yes"),
        MMEItem("code_reasoning", "3.png", "No", "no"),
    ]
    for mode in ("canonical", "qwen"):
        result = mme_scores(items, mode=mode)
        existence = result.subtasks["existence"]
        assert (existence.acc, existence.acc_plus, existence.score) == (0.75, 0.5, 125.0)
        assert result.perception == 125.0 and result.cognition == 200.0
    # Image 1 answered right twice, image 2 wrong twice, lines interleaved: canonical groups by
    # image (acc+ 1/2), the MME script pairs consecutive lines (each pair has a wrong answer).
    interleaved = [
        MMEItem("count", "1.jpg", "Yes", "Yes"),
        MMEItem("count", "2.jpg", "Yes", "No"),
        MMEItem("count", "1.jpg", "No", "No"),
        MMEItem("count", "2.jpg", "No", "Yes"),
    ]
    assert mme_scores(interleaved).subtasks["count"].acc_plus == 0.5
    assert mme_scores(interleaved, mode="qwen").subtasks["count"].acc_plus == 0.0
    with pytest.raises(ValueError, match="pairs"):
        mme_scores(interleaved[:3], mode="qwen")
    with pytest.raises(ValueError, match="yes or no"):
        mme_scores([MMEItem("count", "a.jpg", "maybe", "yes")])


# ----------------------------------------------------------------------------- CIDEr-D


def test_cider_by_hand() -> None:
    refs = {1: ["a b"], 2: ["c d"]}
    scores = cider_d({1: "a b", 2: "c"}, refs, tokenize=False)
    # Image 1: unigram and bigram cosines are 1, 3- and 4-grams 0: 10 * (1 + 1) / 4.
    # Image 2: unigram cosine 1/sqrt(2), length penalty exp(-1 / 72) (0 vs 1 bigram).
    assert scores.per_item == pytest.approx([5.0, 10 * math.exp(-1 / 72) / math.sqrt(2) / 4])
    assert scores.mean == pytest.approx(sum(scores.per_item) / 2)
    assert cider_d({1: "a b"}, {1: ["a b"]}, tokenize=False).mean == 0.0  # one image: every idf is 0
    with pytest.raises(ValueError, match="same image ids"):
        cider_d({1: "a"}, {2: ["a"]})


def test_ptb_tokenize() -> None:
    assert (
        ptb_tokenize("A man (in a hat) rides a horse, quickly.")
        == "a man -lrb- in a hat -rrb- rides a horse quickly".split()
    )
    assert ptb_tokenize("He's riding; don't stop!") == ["he", "'s", "riding", "do", "n't", "stop"]
    assert ptb_tokenize("1,000 people at 3.5 p.m. -- 50%") == ["1,000", "people", "at", "3.5", "p.m.", "50", "%"]


CAPTION_REFS = {
    "img1": ["A man (in a hat) rides a horse, quickly.", "He's riding a brown horse.", "A rider on a horse."],
    "img2": ["Two dogs play in the snow!", "Dogs playing; it's cold.", "two dogs in snow"],
    "img3": ["A red car parked on the street.", "A car [red] on a street", "the car is red"],
}
CAPTION_CANDIDATES = {"img1": "a man riding a horse", "img2": "dogs play in the snow.", "img3": "a red car (parked)"}


@pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None, reason="pycocoevalcap is not installed")
def test_cider_equals_pycocoevalcap_on_tokenised_text() -> None:
    from pycocoevalcap.cider.cider import Cider

    gts = {k: [" ".join(ptb_tokenize(r)) for r in v] for k, v in CAPTION_REFS.items()}
    res = {k: [" ".join(ptb_tokenize(v))] for k, v in CAPTION_CANDIDATES.items()}
    mean, per_item = Cider().compute_score(gts, res)
    ours = cider_d({k: v[0] for k, v in res.items()}, gts, tokenize=False)
    assert ours.per_item == pytest.approx(list(per_item), abs=1e-12) and ours.mean == pytest.approx(mean, abs=1e-12)


@pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None or shutil.which("java") is None,
    reason="pycocoevalcap's PTB tokenizer needs the pycocoevalcap package and Java",
)
def test_ptb_tokenize_equals_java_tokenizer() -> None:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [c for refs in CAPTION_REFS.values() for c in refs] + list(CAPTION_CANDIDATES.values())
    java = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [java[i][0] for i in range(len(texts))] == [" ".join(ptb_tokenize(t)) for t in texts]
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in CAPTION_REFS.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in CAPTION_CANDIDATES.items()})
    mean, _ = Cider().compute_score(gts, res)
    assert cider_d(CAPTION_CANDIDATES, CAPTION_REFS).mean == pytest.approx(mean, abs=1e-12)
