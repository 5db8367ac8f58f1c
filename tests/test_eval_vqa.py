"""VQAv2 accuracy: the official leave-one-annotator-out formula and answer normalisation."""

from __future__ import annotations

import itertools
import json

import pytest

from blip2_megatron.eval import (
    format_metrics_table,
    normalize_answer,
    question_accuracy,
    save_metrics,
    vqa_accuracy,
)


def _annotation(question_id, answers, answer_type="other"):
    """A VQAv2 annotation record with ``answer_id``s, as in the official files."""
    return {
        "question_id": question_id,
        "image_id": 1,
        "question_type": "what is",
        "answer_type": answer_type,
        "multiple_choice_answer": answers[0],
        "answers": [
            {"answer": answer, "answer_confidence": "yes", "answer_id": i + 1}
            for i, answer in enumerate(answers)
        ],
    }


def _answers_with_matches(matches, answer="dog", other="cat"):
    return [answer] * matches + [other] * (10 - matches)


def _accuracy_by_enumerating_subsets(predicted, human_answers):
    """Independent reference: mean over all 10-choose-9 annotator subsets of min(matches / 3, 1)."""
    subsets = list(itertools.combinations(range(len(human_answers)), len(human_answers) - 1))
    per_subset = [min(1.0, sum(human_answers[i] == predicted for i in subset) / 3) for subset in subsets]
    return sum(per_subset) / len(per_subset)


# ----------------------------------------------------------------------------- formula


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # 9 subsets hold the match (1/3), 1 does not: 9 * (1/3) / 10
        (2, 0.6),  # 2 subsets see 1 match, 8 see 2: (2/3 + 16/3) / 10
        (3, 0.9),  # 3 subsets see 2 matches, 7 see 3 (capped at 1): (2 + 7) / 10
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_accuracy_of_k_matching_annotators(matches, expected):
    answers = _answers_with_matches(matches)
    assert question_accuracy("dog", answers) == pytest.approx(expected, abs=1e-12)
    assert question_accuracy("dog", answers) == pytest.approx(
        _accuracy_by_enumerating_subsets("dog", answers), abs=1e-15
    )


def test_accuracy_matches_subset_enumeration_on_mixed_answers():
    answers = ["2", "2", "3", "two", "2", "4", "3", "3", "3", "2"]
    for predicted in ["2", "3", "4", "5"]:
        assert question_accuracy(predicted, answers) == pytest.approx(
            _accuracy_by_enumerating_subsets(predicted, answers), abs=1e-15
        )


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("the dog", "dog"),
        ("An apple", "apple"),
        ("a dog and a cat", "dog and cat"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Whats that", "what's that"),
        ("1,000", "1000"),
        ("100,000 dollars!", "100000 dollars"),  # a digit comma deletes every mark
        ("dog.", "dog"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("black-and-white", "black and white"),  # a mark inside a word becomes a space
        ("hello , world", "hello world"),  # a mark touching a space is deleted
        ("yes!", "yes"),
        ("  Yes\n", "yes"),
        ("left\tside", "left side"),
        ("red: blue", "red: blue"),  # ':' is not in the official punctuation list
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_at_most_32_periods_are_removed_like_the_official_tool():
    # The official tool passes re.UNICODE (32) as re.sub's count.
    assert normalize_answer("." * 40) == "." * 8


# ----------------------------------------------------------------------------- vqa_accuracy


def test_prediction_is_normalised_before_matching():
    annotations = [
        _annotation(1, ["2"] * 10, "number"),
        _annotation(2, ["dog"] * 10),
        _annotation(3, ["don't"] * 10, "yes/no"),
        _annotation(4, ["1000"] * 10, "number"),
    ]
    predictions = [
        {"question_id": 1, "answer": "Two"},
        {"question_id": 2, "answer": "the dog."},
        {"question_id": 3, "answer": "dont"},
        {"question_id": 4, "answer": "1,000"},
    ]
    metrics = vqa_accuracy(predictions, annotations)
    assert metrics["overall"] == 100.0
    assert metrics["per_question"] == {1: 100.0, 2: 100.0, 3: 100.0, 4: 100.0}


def test_human_answers_only_get_punctuation_processing_when_annotators_disagree():
    # As the official tool: unanimous human answers are compared as they are, and
    # disputed ones only lose punctuation (no number-word or article mapping).
    unanimous_word = _annotation(1, ["two"] * 10, "number")
    disputed = _annotation(2, ["black-and-white"] * 3 + ["white"] * 7)
    disputed_number_word = _annotation(3, ["two"] * 3 + ["three"] * 7, "number")
    predictions = [
        {"question_id": 1, "answer": "two"},  # becomes "2", the humans' "two" stays
        {"question_id": 2, "answer": "black and white"},
        {"question_id": 3, "answer": "two"},
    ]
    metrics = vqa_accuracy(predictions, [unanimous_word, disputed, disputed_number_word])
    assert metrics["per_question"] == {1: 0.0, 2: 90.0, 3: 0.0}


def test_overall_and_per_answer_type_in_percent_with_two_decimals():
    annotations = [
        _annotation(1, ["yes"] * 10, "yes/no"),
        _annotation(2, ["no"] * 10, "yes/no"),
        _annotation(3, _answers_with_matches(2, "3", "4"), "number"),
        _annotation(4, _answers_with_matches(1, "red", "blue"), "other"),
        _annotation(5, _answers_with_matches(1, "red", "blue"), "other"),
        _annotation(6, _answers_with_matches(4, "red", "blue"), "other"),
    ]
    predictions = [
        {"question_id": 1, "answer": "yes"},  # 1.0
        {"question_id": 2, "answer": "yes"},  # 0.0
        {"question_id": 3, "answer": "three"},  # 0.6
        {"question_id": 4, "answer": "red"},  # 0.3
        {"question_id": 5, "answer": "red"},  # 0.3
        {"question_id": 6, "answer": "red"},  # 1.0
    ]
    metrics = vqa_accuracy(predictions, annotations)
    assert metrics["yes/no"] == 50.0
    assert metrics["number"] == 60.0
    assert metrics["other"] == 53.33  # 1.6 / 3
    assert metrics["overall"] == 53.33  # 3.2 / 6
    assert metrics["per_question"] == {1: 100.0, 2: 0.0, 3: 60.0, 4: 30.0, 5: 30.0, 6: 100.0}
    assert list(metrics) == ["overall", "yes/no", "number", "other", "per_question"]


def test_answer_types_without_questions_are_left_out():
    metrics = vqa_accuracy([{"question_id": 7, "answer": "yes"}], [_annotation(7, ["yes"] * 10, "yes/no")])
    assert set(metrics) == {"overall", "yes/no", "per_question"}


def test_question_ids_match_across_int_and_string():
    metrics = vqa_accuracy([{"question_id": "7", "answer": "yes"}], [_annotation(7, ["yes"] * 10, "yes/no")])
    assert metrics["per_question"] == {7: 100.0}


def test_missing_and_extra_predictions_are_named():
    annotations = [_annotation(1, ["yes"] * 10), _annotation(2, ["no"] * 10)]
    with pytest.raises(
        ValueError,
        match=r"1 question_id\(s\) of the ground truth have no result: 2;.*not in the ground truth: 99",
    ):
        vqa_accuracy([{"question_id": 1, "answer": "yes"}, {"question_id": 99, "answer": "no"}], annotations)


def test_duplicate_predictions_are_refused():
    with pytest.raises(ValueError, match="duplicate question_id"):
        vqa_accuracy(
            [{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "no"}],
            [_annotation(1, ["yes"] * 10)],
        )


def test_malformed_annotation_is_named():
    with pytest.raises(ValueError, match="question_id 1 lacks"):
        vqa_accuracy(
            [{"question_id": 1, "answer": "yes"}], [{"question_id": 1, "answers": [{"answer": "yes"}]}]
        )


def test_vqa_metrics_table_and_file(tmp_path):
    metrics = vqa_accuracy(
        [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"}],
        [_annotation(1, ["yes"] * 10, "yes/no"), _annotation(2, ["3"] * 10, "number")],
    )
    table = format_metrics_table(metrics, "VQAv2 val", precision=2)
    lines = table.splitlines()
    assert lines[0] == "VQAv2 val"
    assert [line.split() for line in lines[2:5]] == [
        ["overall", "50.00"],
        ["yes/no", "100.00"],
        ["number", "0.00"],
    ]
    assert len({len(line) for line in lines[2:5]}) == 1  # numbers right-aligned on one column
    assert "per_question  (2 values, not shown)" in table  # not one row per question

    saved = json.loads(save_metrics(metrics | {"spice": float("nan")}, tmp_path / "metrics.json").read_text())
    assert saved["overall"] == 50.0 and saved["per_question"] == {"1": 100.0, "2": 0.0}
    assert saved["spice"] is None  # strict JSON: no NaN literal
