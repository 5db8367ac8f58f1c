"""VQAv2 accuracy, computed exactly as the official evaluation tool does.

The official tool (the VQA challenge's ``vqaEval.py``, also vendored by LAVIS, whose
numbers we compare against) scores a predicted answer against the ten human answers:

* the prediction is normalised (:func:`normalize_answer`): punctuation, number words,
  articles, contractions;
* the human answers are *not* normalised the same way: they only get the punctuation
  step, and only when the annotators disagree. The released VQAv2 answers are already
  normalised, so this is what makes ``"two"`` match a human ``"2"`` but not the reverse;
* accuracy = the mean over the ten leave-one-annotator-out subsets of
  ``min(#matches among the other nine / 3, 1)``: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9,
  4 or more -> 1.0;
* overall and per answer type in percent, rounded to 2 decimals (means of the unrounded
  per-question accuracies); per-question values rounded the same way.

The official tool's quirks are kept on purpose (they are listed where they occur), so
our numbers are the official numbers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from blip2_megatron.eval.report import check_ids_match, index_by_id

logger = logging.getLogger(__name__)

# Decimals of every reported accuracy, as the official tool.
_DECIMALS = 2

# A human answer counts fully once this many of the other annotators gave it.
_MATCHES_FOR_FULL_CREDIT = 3

# Punctuation marks that are removed or turned into spaces. Not in the list, as in the
# official tool: ':', '*', '#', '&', '%', '$', "'" and '.', which has its own rule.
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

# "1,000": when a comma sits between two digits, every punctuation mark in the answer is
# deleted (so the number stays one token) instead of being replaced by a space.
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")

# A period not followed by a digit is deleted ("dog." -> "dog", "3.5" stays). The
# official pattern is written "(?!<=\d)(\.)(?!\d)": its first group is a (misspelt)
# look-*ahead* that can never fail in front of a period, so only the trailing condition
# matters.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# The official tool passes re.UNICODE (= 32) in the ``count`` position of ``re.sub``,
# so at most 32 periods are deleted per answer. Kept for identical numbers.
_MAX_PERIODS_REMOVED = 32

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Apostrophe-less spellings -> the spelling used in the ground truth. This is the
# official table, entry for entry. Two oddities are inherited deliberately: the
# capitalised keys ("Im", "Ive", "Id've", "I'dve") can never match because answers are
# lower-cased first, and "somebody'd" maps to "somebodyd" (a typo in the original).
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

ANSWER_TYPES = ("yes/no", "number", "other")


def _clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip (the tool's first step on every answer)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """The official punctuation step (applied to predictions and to disputed human answers).

    A mark is deleted when it touches a space on either side, or anywhere once the answer
    holds a comma between digits; otherwise it becomes a space ("black-and-white" ->
    "black and white"). The decision looks at the original text, not the partly
    processed one, as the official tool does.
    """
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    processed = text
    for mark in _PUNCTUATION:
        touches_space = (mark + " ") in text or (" " + mark) in text
        processed = processed.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", processed, count=_MAX_PERIODS_REMOVED)


def _process_digits_articles(text: str) -> str:
    """Lower-case, number words to digits, drop articles, restore contractions' apostrophes."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """Normalise a predicted answer as the official VQA evaluation does.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("1,000")
    '1000'
    >>> normalize_answer("The cat isnt black-and-white!")
    "cat isn't black and white"
    """
    return _process_digits_articles(_process_punctuation(_clean_whitespace(answer)))


def _human_answers_for_matching(answers: Sequence[str]) -> list[str]:
    """The ten human answers as the official tool compares them to the prediction.

    Only whitespace cleaning, plus the punctuation step when the annotators disagree.
    """
    cleaned = [_clean_whitespace(answer) for answer in answers]
    if len(set(cleaned)) > 1:
        cleaned = [_process_punctuation(answer) for answer in cleaned]
    return cleaned


def question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answers of a question.

    The mean over the leave-one-annotator-out subsets of ``min(#matches / 3, 1)``.
    Annotators are told apart by position: the official tool compares answer dicts,
    which differ by their ``answer_id`` even when the text is the same.
    """
    if not human_answers:
        raise ValueError("a question needs at least one human answer")
    predicted = normalize_answer(prediction)
    matches = [answer == predicted for answer in _human_answers_for_matching(human_answers)]
    total_matches = sum(matches)
    subset_accuracies = [
        min(1.0, (total_matches - left_out_matches) / _MATCHES_FOR_FULL_CREDIT)
        for left_out_matches in matches
    ]
    return float(sum(subset_accuracies)) / len(subset_accuracies)


def _percent(values: Sequence[float]) -> float:
    return round(100 * float(sum(values)) / len(values), _DECIMALS)


def vqa_accuracy(
    predictions: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """VQAv2 accuracy of ``predictions`` against the official ``annotations``.

    Args:
        predictions: ``{"question_id", "answer"}`` records, exactly one per annotated
            question (a missing, extra or duplicate question id is a ValueError naming
            the ids; ``123`` and ``"123"`` are the same id).
        annotations: VQAv2 annotation records: ``{"question_id", "answer_type",
            "answers": [{"answer": ...}, ...x10], ...}`` (the ``"annotations"`` list of
            the official ``v2_mscoco_val2014_annotations.json``).

    Returns:
        ``{"overall": 51.88, "yes/no": ..., "number": ..., "other": ...,
        "per_question": {question_id: accuracy}}`` in percent with 2 decimals. An answer
        type with no question in ``annotations`` has no key, as in the official tool.
        ``per_question`` is keyed by the annotations' own question ids.
    """
    annotations_by_id = index_by_id(annotations, "question_id", "VQA annotations")
    predictions_by_id = index_by_id(predictions, "question_id", "VQA predictions")
    if not annotations_by_id:
        raise ValueError("VQA annotations are empty: nothing to score")
    check_ids_match(annotations_by_id, predictions_by_id, "VQA predictions", "question_id")

    all_accuracies: list[float] = []
    accuracies_by_type: dict[str, list[float]] = {}
    per_question: dict[Any, float] = {}
    for question_key, annotation in annotations_by_id.items():
        prediction = predictions_by_id[question_key]
        answer = prediction.get("answer")
        if not isinstance(answer, str):
            raise ValueError(
                f"VQA prediction for question_id {prediction['question_id']!r} has no string 'answer'"
            )
        try:
            human_answers = [entry["answer"] for entry in annotation["answers"]]
            answer_type = annotation["answer_type"]
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"VQA annotation of question_id {annotation['question_id']!r} lacks {error}; expected "
                "{'question_id', 'answer_type', 'answers': [{'answer': ...}, ...]}"
            ) from error
        accuracy = question_accuracy(answer, human_answers)
        all_accuracies.append(accuracy)
        accuracies_by_type.setdefault(answer_type, []).append(accuracy)
        per_question[annotation["question_id"]] = round(100 * accuracy, _DECIMALS)

    unknown_types = accuracies_by_type.keys() - set(ANSWER_TYPES)
    if unknown_types:
        logger.warning(
            "VQA annotations hold answer types outside %s: %s", ANSWER_TYPES, sorted(unknown_types)
        )
    result: dict[str, Any] = {"overall": _percent(all_accuracies)}
    for answer_type in [*ANSWER_TYPES, *sorted(unknown_types)]:
        if answer_type in accuracies_by_type:
            result[answer_type] = _percent(accuracies_by_type[answer_type])
    result["per_question"] = per_question
    logger.info(
        "VQA accuracy over %d questions: %s",
        len(all_accuracies),
        ", ".join(f"{name} {value:.2f}" for name, value in result.items() if name != "per_question"),
    )
    return result


def vqa_agg_metric(metrics: Mapping[str, Any]) -> float:
    """The number LAVIS keeps the best VQA checkpoint by: overall accuracy."""
    return float(metrics["overall"])
