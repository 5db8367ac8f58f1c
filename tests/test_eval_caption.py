"""COCO caption metrics end to end through pycocoevalcap (Java), and distributed result gathering.

Every ``score_captions`` call starts the METEOR JVM (~10 s here), so the scored cases are
few and shared through module-scoped fixtures.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging

import pytest
import torch.distributed as dist
from dist_utils import run_distributed
from torch.utils.data import DistributedSampler

from blip2_megatron.eval import caption as caption_module
from blip2_megatron.eval import caption_agg_metric, gather_results, score_captions, write_result_json

REFERENCES = {
    "coco_1": [
        "a man riding a horse on a sandy beach",
        "a person rides a brown horse near the ocean",
        "a horse and its rider walking along the shore",
    ],
    "coco_2": [
        "two cats sleeping on a red couch",
        "a pair of cats asleep on the sofa",
        "two kittens curled up together on a couch",
    ],
    "coco_3": [
        "a plate of food with broccoli and rice",
        "rice and vegetables served on a white plate",
        "a healthy meal of rice, chicken and broccoli.",
    ],
    "coco_4": [
        "a red double decker bus driving down a street",
        "a bus on a city road with people walking by",
        "a large red bus stopped in traffic",
    ],
    "coco_5": [
        "a little girl flying a kite in a park",
        "a child holding a kite string on the grass",
        "a young girl plays with a colorful kite outdoors",
    ],
}
PERFECT_RESULTS = [
    {"image_id": image_id, "caption": captions[0]} for image_id, captions in REFERENCES.items()
]


def _coco_ground_truth(references):
    annotations = [
        {"image_id": image_id, "caption": caption, "id": len(references) * i + j}
        for i, (image_id, captions) in enumerate(references.items())
        for j, caption in enumerate(captions)
    ]
    return {"images": [{"id": image_id} for image_id in references], "annotations": annotations}


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def fake_spice_without_corenlp(tmp_path_factory):
    """A SPICE folder as pycocoevalcap ships it: the jar, but no Stanford CoreNLP jars in lib/."""
    spice_dir = tmp_path_factory.mktemp("spice")
    (spice_dir / "spice-1.0.jar").write_bytes(b"")
    (spice_dir / "lib").mkdir()
    return spice_dir


@pytest.fixture(scope="module")
def perfect_run(fake_spice_without_corenlp):
    """Score the perfect captions once: (scores, log records of the run, download attempts)."""
    download_attempts = []
    handler = _ListHandler()
    logger = logging.getLogger(caption_module.__name__)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(caption_module, "_spice_dir", lambda: fake_spice_without_corenlp)
        patch.setattr(
            "pycocoevalcap.spice.get_stanford_models.urlretrieve",
            lambda *args, **kwargs: download_attempts.append(args),
        )
        logger.addHandler(handler)
        previous_level = logger.level
        logger.setLevel(logging.DEBUG)
        try:
            scores = score_captions(PERFECT_RESULTS, _coco_ground_truth(REFERENCES))
        finally:
            logger.removeHandler(handler)
            logger.setLevel(previous_level)
    return scores, handler.records, download_attempts


# ----------------------------------------------------------------------------- scoring


def test_perfect_captions_score_high(perfect_run):
    scores, _, _ = perfect_run
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert scores["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["METEOR"] > 0.99 and scores["ROUGE_L"] > 0.99
    assert scores["CIDEr"] > 2.0  # each caption equals one of three references
    assert all(isinstance(value, float) for value in scores.values())


def test_spice_is_skipped_with_one_log_line_and_no_download(perfect_run):
    scores, records, download_attempts = perfect_run
    spice_lines = [record for record in records if "SPICE" in record.getMessage()]
    assert len(spice_lines) == 1
    assert spice_lines[0].levelno == logging.WARNING
    assert spice_lines[0].getMessage().startswith("SPICE skipped: Stanford CoreNLP is missing")
    assert "SPICE" not in scores
    assert download_attempts == []


def test_garbage_captions_score_low():
    garbage = [
        {"image_id": image_id, "caption": "purple quantum toaster sings loudly"} for image_id in REFERENCES
    ]
    scores = score_captions(garbage, _coco_ground_truth(REFERENCES), with_spice=False)
    assert scores["Bleu_4"] < 0.01 and scores["CIDEr"] < 0.05 and scores["METEOR"] < 0.05


class _RecordingMeteor:
    """Stands in for METEOR (a JVM that takes ~10 s to start), recording what it is asked to score."""

    calls: list[tuple[dict, dict]] = []

    def compute_score(self, references, candidates):
        # Keyed by str(id) so that our ids and COCOEvalCap's ints compare.
        self.calls.append(
            ({str(k): v for k, v in references.items()}, {str(k): v for k, v in candidates.items()})
        )
        return 0.5, [0.5] * len(references)

    def method(self):
        return "METEOR"


def test_same_numbers_as_pycocoevalcaps_own_driver(tmp_path, monkeypatch):
    """Int ids, a file path, unordered results: the numbers of COCOEvalCap with pycocotools."""
    pytest.importorskip("pycocotools")
    import pycocoevalcap.eval as coco_eval_cap
    from pycocotools.coco import COCO

    class _NoSpice:  # COCOEvalCap always runs SPICE, which would try to download CoreNLP.
        def compute_score(self, references, candidates):
            return 0.0, [0.0] * len(references)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval_cap, "Spice", _NoSpice)
    monkeypatch.setattr(coco_eval_cap, "Meteor", _RecordingMeteor)
    monkeypatch.setattr(caption_module, "_meteor_server", _RecordingMeteor)
    monkeypatch.setattr(_RecordingMeteor, "calls", [])
    references = {index + 10: captions for index, captions in enumerate(REFERENCES.values())}
    ground_truth = _coco_ground_truth(references) | {"info": {}, "licenses": [], "type": "captions"}
    results = [
        {"image_id": 13, "caption": "a plate with rice and broccoli"},
        {"image_id": 10, "caption": "A man rides a horse on the beach."},
        {"image_id": 11, "caption": "cats on a couch"},
        {"image_id": 14, "caption": "a red bus on the street"},
        {"image_id": 12, "caption": "a dog catching a frisbee"},
    ]
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    (tmp_path / "results.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools / COCOEvalCap print progress
        coco = COCO(str(tmp_path / "gt.json"))
        evaluator = coco_eval_cap.COCOEvalCap(coco, coco.loadRes(str(tmp_path / "results.json")))
        evaluator.evaluate()

    ours = score_captions(results, tmp_path / "gt.json", with_spice=False)
    assert ours == pytest.approx({name: float(evaluator.eval[name]) for name in ours}, rel=1e-12, abs=1e-15)
    theirs_meteor_input, our_meteor_input = _RecordingMeteor.calls
    assert our_meteor_input == theirs_meteor_input


@pytest.mark.slow
def test_one_meteor_server_per_process_and_a_fresh_one_after_a_failure():
    """Its JVM takes ~10 s to start: periodic validation keeps one; one that died is replaced."""
    first = score_captions(PERFECT_RESULTS, _coco_ground_truth(REFERENCES), with_spice=False)
    server = caption_module._meteor_server()
    assert score_captions(PERFECT_RESULTS, _coco_ground_truth(REFERENCES), with_spice=False) == first
    assert caption_module._meteor_server() is server and server.meteor_p.poll() is None
    server.meteor_p.kill()
    server.meteor_p.wait()
    with pytest.raises((ValueError, OSError)):
        score_captions(PERFECT_RESULTS, _coco_ground_truth(REFERENCES), with_spice=False)
    assert not server.lock.locked()
    assert score_captions(PERFECT_RESULTS, _coco_ground_truth(REFERENCES), with_spice=False) == first
    assert caption_module._meteor_server() is not server


# ----------------------------------------------------------------------------- input checks (no Java)


def test_missing_and_extra_image_ids_are_named():
    results = [r for r in PERFECT_RESULTS if r["image_id"] != "coco_3"] + [
        {"image_id": "coco_99", "caption": "x"}
    ]
    with pytest.raises(ValueError, match=r"have no result: coco_3;.*not in the ground truth: coco_99"):
        score_captions(results, _coco_ground_truth(REFERENCES), with_spice=False)


def test_duplicate_image_ids_are_refused():
    with pytest.raises(ValueError, match="duplicate image_id"):
        score_captions(
            PERFECT_RESULTS + PERFECT_RESULTS[:1], _coco_ground_truth(REFERENCES), with_spice=False
        )


def test_ground_truth_problems_are_named():
    with pytest.raises(ValueError, match="no 'annotations'"):
        score_captions(PERFECT_RESULTS, {"images": []}, with_spice=False)
    without_captions = _coco_ground_truth(REFERENCES)
    without_captions["images"].append({"id": "coco_6"})
    with pytest.raises(ValueError, match="1 image.*no reference caption"):
        score_captions(PERFECT_RESULTS, without_captions, with_spice=False)


def test_spice_required_but_missing_is_an_error(monkeypatch, fake_spice_without_corenlp):
    monkeypatch.setattr(caption_module, "_spice_dir", lambda: fake_spice_without_corenlp)
    with pytest.raises(RuntimeError, match=r"with_spice=True.*stanford-corenlp-3\.6\.0\.jar"):
        score_captions(PERFECT_RESULTS, _coco_ground_truth(REFERENCES), with_spice=True)


def test_caption_agg_metric_is_cider_plus_bleu4():
    assert caption_agg_metric({"CIDEr": 1.4, "Bleu_4": 0.4, "METEOR": 0.3}) == pytest.approx(1.8)


def test_write_result_json_round_trips(tmp_path):
    path = write_result_json(PERFECT_RESULTS, tmp_path / "out" / "captions.json")
    assert json.loads(path.read_text()) == PERFECT_RESULTS
    assert [p.name for p in path.parent.iterdir()] == ["captions.json"]  # no temporary file left


# ----------------------------------------------------------------------------- gathering


def test_gather_without_process_group_dedups_sorts_and_counts():
    results = [
        {"question_id": 10, "answer": "a"},
        {"question_id": 2, "answer": "b"},
        {"question_id": 10, "answer": "c"},
    ]
    gathered = gather_results(results, key="question_id", expected_total=2)
    assert gathered == [{"question_id": 2, "answer": "b"}, {"question_id": 10, "answer": "a"}]
    with pytest.raises(RuntimeError, match="2 distinct question_ids.*expected 3.*lost"):
        gather_results(results, key="question_id", expected_total=3)


def _gather_and_score_on_rank(rank, world_size):
    # As a distributed evaluation loop: each rank captions its shard; the sampler
    # repeats sample 0 on the last rank so both ranks run the same number of steps.
    sampler = DistributedSampler(PERFECT_RESULTS, num_replicas=world_size, rank=rank, shuffle=False)
    local = [PERFECT_RESULTS[index] for index in sampler]
    data_parallel_group = dist.new_group(list(range(world_size)))
    gathered = gather_results(local, expected_total=len(REFERENCES), group=data_parallel_group)
    scores = score_captions(gathered, _coco_ground_truth(REFERENCES), with_spice=False) if rank == 0 else None
    dist.barrier()
    return local, gathered, scores


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_gather_the_full_list_and_score_like_one_process(perfect_run):
    (local_0, gathered_0, scores), (local_1, gathered_1, _) = run_distributed(_gather_and_score_on_rank, 2)

    assert len(local_0) == len(local_1) == 3  # 5 samples padded to 6
    assert local_1[-1] == PERFECT_RESULTS[0]  # the repeated sample
    assert gathered_0 == gathered_1 == PERFECT_RESULTS
    single_process_scores, _, _ = perfect_run
    assert scores == pytest.approx(single_process_scores, rel=1e-12)
