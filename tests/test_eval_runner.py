"""The evaluation runner on answers it can get wrong: VQA by answer type, retrieval with a known ranking.

The runner (loading the set, batching, gathering, scoring, counting skipped images) is
driven by predictors whose outputs are known in advance, so every figure it reports has
one right value. The models' own generation is proven against transformers elsewhere;
``launch/evaluate.py`` on real runs is exercised by the journey tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip2_megatron.config import load_job_config
from blip2_megatron.eval.runner import EvaluationError, run_evaluation


class _AlwaysAnswers:
    """A VQA predictor that gives every question the same answer."""

    training = False
    compute_dtype = None

    def tokens_per_second(self):
        return None  # it generates nothing

    def __init__(self, answer: str):
        self.answer = answer
        self.asked: list[str] = []

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def predict_answers(self, samples, **_):
        self.asked += list(samples["text_input"])
        return [self.answer] * len(samples["text_input"])


def _vqa_job(sample, *overrides: str):
    return load_job_config("tiny_stage2", ["eval.task=vqa", f"data.sample_root={sample.root}", *overrides])


def test_vqa_accuracy_by_answer_type_has_one_right_value(sample, tmp_path):
    """Built-in questions: colour and shape ("other"), position ("yes/no"), count ("number", always 1)."""
    predictor = _AlwaysAnswers("1")
    metrics = run_evaluation(
        predictor, _vqa_job(sample, "eval.max_samples=40", "eval.batch_size=7"), tmp_path
    )
    # 10 images x 4 questions: answering "1" is right for the count question only.
    assert metrics["num_evaluated"] == 40 and metrics["num_missing_images"] == 0
    assert (metrics["number"], metrics["other"], metrics["yes/no"]) == (100.0, 0.0, 0.0)
    assert metrics["overall"] == pytest.approx(25.0)
    assert len(predictor.asked) == 40 and "how many shapes are there?" in predictor.asked
    answers = json.loads((tmp_path / "eval" / "vqa_answers.json").read_text())
    assert len(answers) == 40 and {a["answer"] for a in answers} == {"1"}

    yes = run_evaluation(_AlwaysAnswers("yes"), _vqa_job(sample, "eval.max_samples=40"), tmp_path)
    annotations = json.loads(Path(sample.vqa_annotations).read_text())["annotations"]
    yes_no = [a for a in annotations[:40] if a["answer_type"] == "yes/no"]
    expected = 100 * sum(a["multiple_choice_answer"] == "yes" for a in yes_no) / len(yes_no)
    assert yes["yes/no"] == pytest.approx(expected) and 0 < expected < 100
    assert yes["number"] == 0.0


class _EchoesQuestion(_AlwaysAnswers):
    """Answers each question with the question itself, so a misplaced answer is seen."""

    def predict_answers(self, samples, **_):
        self.asked.append(list(samples["text_input"]))
        return list(samples["text_input"])


def test_vqa_batches_go_longest_question_first_and_answers_keep_their_question(sample, tmp_path):
    predictor = _EchoesQuestion("")
    metrics = run_evaluation(
        predictor, _vqa_job(sample, "eval.max_samples=40", "eval.batch_size=8"), tmp_path
    )
    lengths = [len(q.split()) for batch in predictor.asked for q in batch]
    assert metrics["num_evaluated"] == 40 and lengths == sorted(lengths, reverse=True), predictor.asked
    assert len(set(lengths)) > 1  # the built-in questions differ in length: the order is a real choice
    questions = {
        q["question_id"]: q["question"]
        for q in json.loads(Path(sample.vqa_questions).read_text())["questions"]
    }
    answers = json.loads((tmp_path / "eval" / "vqa_answers.json").read_text())
    assert all(a["answer"] == questions[a["question_id"]].lower() for a in answers), answers[:5]


def test_vqa_with_missing_images_counts_them_and_with_none_fails(sample, tmp_path):
    images = tmp_path / "images"
    (images / "val").mkdir(parents=True)
    for name in ("000001.jpg", "000002.jpg"):  # two of the 150 val images are there
        (images / "val" / name).write_bytes((Path(sample.image_root) / "val" / name).read_bytes())
    metrics = run_evaluation(_AlwaysAnswers("1"), _vqa_job(sample, f"data.image_root={images}"), tmp_path)
    assert metrics["num_evaluated"] == 8 and metrics["num_missing_images"] == 148 * 4
    with pytest.raises(EvaluationError, match="nothing to score.*600 missing image"):
        run_evaluation(
            _AlwaysAnswers("1"), _vqa_job(sample, f"data.image_root={tmp_path / 'none'}"), tmp_path
        )


class _OracleRetrieval:
    """Stage-1 features with a known ranking: image ``i`` is ``e_i``, a caption is ``e_owner(caption)``.

    With ``shift`` the captions point ``shift`` images further on (every caption then
    retrieves the wrong image first).
    """

    training = False

    def __init__(self, val: list[dict], shift: int = 0):
        from blip2_megatron.data.processors import CaptionProcessor

        clean = CaptionProcessor()
        self.size = len(val)
        self.owner = {
            clean(c): (index + shift) % self.size for index, row in enumerate(val) for c in row["caption"]
        }
        self.seen = 0

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(self.seen, self.seen + image.shape[0])
        self.seen += image.shape[0]
        return torch.nn.functional.one_hot(rows, self.size).float()[:, None, :]  # [B, 1 query, D]

    def image_features(self, image=None, image_embeds=None):
        return image_embeds

    def text_features(self, texts):
        return torch.nn.functional.one_hot(torch.tensor([self.owner[t] for t in texts]), self.size).float()

    def itm_scores(self, image_embeds, texts):
        return torch.zeros(len(texts))


def test_retrieval_recall_matches_a_known_ranking(sample, tmp_path):
    """Val images whose references share no caption: each caption names exactly one image."""
    distinct, used = [], set()
    for row in json.loads(Path(sample.val_annotation).read_text()):
        if not used & set(row["caption"]):
            distinct.append(row)
            used |= set(row["caption"])
    annotation = tmp_path / "val_distinct.json"
    annotation.write_text(json.dumps(distinct))
    job = load_job_config(
        "tiny_stage1",
        [f"data.sample_root={sample.root}", f"data.val_annotation={annotation}", "eval.k_test=8"],
    )
    assert len(distinct) >= 10
    right = run_evaluation(_OracleRetrieval(distinct), job, tmp_path)
    assert (right["txt_r1"], right["img_r1"], right["num_evaluated"]) == (100.0, 100.0, len(distinct))
    wrong = run_evaluation(_OracleRetrieval(distinct, shift=1), job, tmp_path)
    assert (wrong["txt_r1"], wrong["img_r1"]) == (0.0, 0.0)
