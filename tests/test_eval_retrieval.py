"""Retrieval recall (BLIP's definitions) and ITC top-k / ITM re-ranking, sharded over ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from blip2_megatron.eval import NOT_CANDIDATE, rerank_topk, retrieval_metrics


def _pairing(num_images, texts_per_image):
    """COCO-like ground truth: image i owns texts i*T .. i*T+T-1."""
    img2txt = [list(range(i * texts_per_image, (i + 1) * texts_per_image)) for i in range(num_images)]
    txt2img = [i for i in range(num_images) for _ in range(texts_per_image)]
    return txt2img, img2txt


def _scores_with_target_at(num_columns, target_columns_at_positions, generator):
    """One score row where each given column sits at the given 0-based position of the ranking."""
    others = [
        c
        for c in torch.randperm(num_columns, generator=generator).tolist()
        if c not in target_columns_at_positions
    ]
    order = [None] * num_columns
    for column, position in target_columns_at_positions.items():
        order[position] = column
    remaining = iter(others)
    order = [column if column is not None else next(remaining) for column in order]
    row = torch.empty(num_columns)
    row[order] = torch.arange(num_columns, 0, -1, dtype=torch.float32)  # position 0 scores highest
    return row


def _blip_reference_metrics(scores_i2t, scores_t2i, txt2img, img2txt):
    """BLIP's loop with np.argsort (valid without ties), to compare against."""
    i2t_ranks = []
    for image, row in enumerate(scores_i2t.numpy()):
        order = np.argsort(row)[::-1]
        i2t_ranks.append(min(np.where(order == text)[0][0] for text in img2txt[image]))
    t2i_ranks = []
    for text, row in enumerate(scores_t2i.numpy()):
        order = np.argsort(row)[::-1]
        t2i_ranks.append(np.where(order == txt2img[text])[0][0])
    i2t_ranks, t2i_ranks = np.array(i2t_ranks), np.array(t2i_ranks)
    return {
        **{f"txt_r{k}": 100.0 * np.mean(i2t_ranks < k) for k in (1, 5, 10)},
        **{f"img_r{k}": 100.0 * np.mean(t2i_ranks < k) for k in (1, 5, 10)},
    }


# ----------------------------------------------------------------------------- recall


def test_identity_like_scores_give_full_recall():
    txt2img, img2txt = _pairing(num_images=6, texts_per_image=3)
    scores_i2t = torch.rand(6, 18) * 0.1
    for image, texts in enumerate(img2txt):
        scores_i2t[image, texts] += 1.0
    metrics = retrieval_metrics(scores_i2t, scores_i2t.t().contiguous(), txt2img, img2txt)
    assert all(value == 100.0 for value in metrics.values()), metrics
    assert list(metrics) == [
        "txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean",
    ]  # fmt: skip


def test_recall_with_known_ranks():
    generator = torch.Generator().manual_seed(0)
    num_images, texts_per_image = 12, 2
    txt2img, img2txt = _pairing(num_images, texts_per_image)
    num_texts = len(txt2img)

    # image -> text: rank of each image's best ground-truth text.
    best_text_rank = [0, 0, 0, 1, 4, 5, 9, 10, 2, 0, 15, 3]
    scores_i2t = torch.stack(
        [
            _scores_with_target_at(num_texts, {img2txt[i][0]: rank, img2txt[i][1]: rank + 3}, generator)
            for i, rank in enumerate(best_text_rank)
        ]
    )
    # text -> image: rank of each text's image.
    image_rank = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 0, 0, 0, 11, 11, 11, 11, 4, 4, 5, 5]
    scores_t2i = torch.stack(
        [
            _scores_with_target_at(num_images, {txt2img[t]: rank}, generator)
            for t, rank in enumerate(image_rank)
        ]
    )

    metrics = retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    assert metrics["txt_r1"] == pytest.approx(100 * 4 / 12)  # ranks 0,0,0,0
    assert metrics["txt_r5"] == pytest.approx(100 * 8 / 12)  # + 1, 4, 2, 3
    assert metrics["txt_r10"] == pytest.approx(100 * 10 / 12)  # + 5, 9
    assert metrics["img_r1"] == pytest.approx(100 * 5 / 24)
    assert metrics["img_r5"] == pytest.approx(100 * 11 / 24)
    assert metrics["img_r10"] == pytest.approx(100 * 18 / 24)
    assert metrics["txt_r_mean"] == pytest.approx((4 + 8 + 10) / 3 / 12 * 100)
    assert metrics["r_mean"] == pytest.approx((metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2)
    reference = _blip_reference_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    assert {name: metrics[name] for name in reference} == pytest.approx(reference)


def test_random_scores_agree_with_blip_reference_loop():
    torch.manual_seed(1)
    txt2img, img2txt = _pairing(num_images=40, texts_per_image=5)
    scores_i2t, scores_t2i = torch.randn(40, 200), torch.randn(200, 40)
    metrics = retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    reference = _blip_reference_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    assert {name: metrics[name] for name in reference} == pytest.approx(reference)


def test_constant_scores_get_no_credit():
    txt2img, img2txt = _pairing(num_images=20, texts_per_image=1)
    constant = torch.zeros(20, 20)
    metrics = retrieval_metrics(constant, constant, txt2img, img2txt)
    assert metrics["txt_r10"] == 0.0 and metrics["img_r10"] == 0.0


def test_inconsistent_ground_truth_and_bad_scores_are_refused():
    txt2img, img2txt = _pairing(num_images=2, texts_per_image=2)
    scores = torch.rand(2, 4)
    with pytest.raises(ValueError, match=r"txt2img\[2\] = 0"):
        retrieval_metrics(scores, scores.t(), [0, 0, 0, 1], img2txt)
    with pytest.raises(ValueError, match="expected"):
        retrieval_metrics(scores, scores, txt2img, img2txt)
    scores[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(scores, scores.t(), txt2img, img2txt)


# ----------------------------------------------------------------------------- re-ranking


class _RecordingItm:
    """A fake ITM head: a fixed score per (row, candidate) pair, recording what it is asked."""

    def __init__(self, num_rows, num_candidates, seed=0):
        self.table = torch.rand(num_rows, num_candidates, generator=torch.Generator().manual_seed(seed))
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, row, candidates):
        self.calls.append((row, candidates.tolist()))
        return self.table[row, candidates]


def test_rerank_scores_only_the_itc_topk_with_itm():
    torch.manual_seed(0)
    itc = torch.randn(7, 30)
    itm = _RecordingItm(7, 30)
    scores = rerank_topk(itc, 4, itm)

    assert [row for row, _ in itm.calls] == list(range(7))
    for row, candidates in itm.calls:
        topk = itc[row].topk(4).indices.tolist()
        assert sorted(candidates) == sorted(topk)
        expected = torch.full((30,), NOT_CANDIDATE)
        expected[topk] = itm.table[row, topk] + itc[row, topk]
        torch.testing.assert_close(scores[row], expected)


def test_rerank_caps_k_at_the_number_of_candidates():
    itm = _RecordingItm(2, 3)
    scores = rerank_topk(torch.randn(2, 3), 128, itm)
    assert all(len(candidates) == 3 for _, candidates in itm.calls)
    assert (scores != NOT_CANDIDATE).all()


def test_rerank_checks_the_itm_output_and_the_sharding_arguments():
    with pytest.raises(ValueError, match="one score per candidate"):
        rerank_topk(torch.randn(2, 5), 3, lambda row, candidates: torch.zeros(2))
    with pytest.raises(ValueError, match="needs the process group"):
        rerank_topk(torch.randn(2, 5), 3, _RecordingItm(2, 5), rank=0, world_size=2)


def _rerank_on_rank(rank, world_size):
    torch.manual_seed(0)
    itc = torch.randn(5, 9)  # 5 rows over 2 ranks: uneven blocks of 3 and 2
    itm = _RecordingItm(5, 9)
    data_parallel_group = dist.new_group(list(range(world_size)))
    scores = rerank_topk(itc, 3, itm, group=data_parallel_group)
    single_process = rerank_topk(itc, 3, _RecordingItm(5, 9))
    return [row for row, _ in itm.calls], torch.equal(scores, single_process)


@pytest.mark.dist
def test_rerank_sharded_over_two_ranks_matches_one_process():
    (rows_0, same_0), (rows_1, same_1) = run_distributed(_rerank_on_rank, 2)
    assert rows_0 == [0, 1, 2] and rows_1 == [3, 4]  # the ITM head runs on each row once
    assert same_0 and same_1
