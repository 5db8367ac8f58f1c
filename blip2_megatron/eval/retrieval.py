"""Image-text retrieval: BLIP's recall@K and its ITC top-k / ITM re-ranking.

Protocol (BLIP / BLIP-2 stage-1 retrieval, as LAVIS evaluates it):

1. ITC similarities between every image and every text (cheap, one matrix product).
2. :func:`rerank_topk`: for each image (row) only the ``k`` texts with the highest ITC
   similarity are scored by the expensive ITM head; their final score is
   ``ITM score + ITC similarity``; every other entry stays at :data:`NOT_CANDIDATE`
   (-100). Same for each text against the images, on the transposed matrix. Rows can be
   split over ranks; a sum over the process group puts the matrix back together.
3. :func:`retrieval_metrics`: recall@1/5/10 in percent. An image is retrieved correctly
   at K when *any* of its ground-truth captions is within the top K (COCO has five per
   image); a text when its one image is.

Ties: a rank counts every other candidate scoring *at least as high* as the ground
truth, so a degenerate model that gives every pair the same score gets no credit. BLIP
sorts with ``np.argsort`` and lets ties fall where they may; with real-valued scores
there are no ties and both agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: Score of a pair that was not among the ITC top-k candidates (BLIP's fill value).
NOT_CANDIDATE = -100.0

RECALL_AT = (1, 5, 10)

# Rows ranked at a time: bounds the temporary [rows, N] comparison tensors (a COCO 5k
# test split has 25k captions) to a few tens of MB.
_ROWS_PER_CHUNK = 512

ItmScoreFn = Callable[[int, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- recall


def _check_score_matrix(scores: torch.Tensor, shape: tuple[int, int], name: str) -> torch.Tensor:
    scores = torch.as_tensor(scores)
    if tuple(scores.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(scores.shape)}, expected {shape} from txt2img / img2txt")
    scores = scores.detach().to(device="cpu", dtype=torch.float32)
    if torch.isnan(scores).any():
        raise ValueError(f"{name} holds NaN scores; a NaN would rank as a hit or a miss arbitrarily")
    return scores


def _ground_truth_texts(txt2img: Sequence[int], img2txt: Sequence[Sequence[int]]) -> list[list[int]]:
    """Validate that ``txt2img`` and ``img2txt`` describe the same one-image-per-text pairing."""
    num_texts = len(txt2img)
    seen_texts: set[int] = set()
    texts_of_image: list[list[int]] = []
    for image, texts in enumerate(img2txt):
        texts = [int(t) for t in texts]
        if not texts:
            raise ValueError(f"img2txt[{image}] is empty: every image needs at least one ground-truth text")
        for text in texts:
            if not 0 <= text < num_texts:
                raise ValueError(f"img2txt[{image}] names text {text}, outside 0..{num_texts - 1}")
            if text in seen_texts:
                raise ValueError(f"text {text} is listed under more than one image in img2txt")
            if int(txt2img[text]) != image:
                raise ValueError(f"img2txt[{image}] holds text {text}, but txt2img[{text}] = {txt2img[text]}")
            seen_texts.add(text)
        texts_of_image.append(texts)
    if len(seen_texts) != num_texts:
        orphans = sorted(set(range(num_texts)) - seen_texts)[:5]
        raise ValueError(
            f"{num_texts - len(seen_texts)} texts belong to no image in img2txt (e.g. {orphans})"
        )
    return texts_of_image


def _image_to_text_ranks(scores_i2t: torch.Tensor, texts_of_image: list[list[int]]) -> torch.Tensor:
    """0-based rank of each image's best-ranked ground-truth text."""
    num_images, num_texts = scores_i2t.shape
    ranks = torch.empty(num_images, dtype=torch.long)
    for start in range(0, num_images, _ROWS_PER_CHUNK):
        rows = scores_i2t[start : start + _ROWS_PER_CHUNK]
        is_ground_truth = torch.zeros(rows.shape, dtype=torch.bool)
        for offset, texts in enumerate(texts_of_image[start : start + len(rows)]):
            is_ground_truth[offset, texts] = True
        best_ground_truth = rows.masked_fill(~is_ground_truth, float("-inf")).amax(dim=1, keepdim=True)
        # Only wrong texts can push the best ground-truth text down the list.
        ranks[start : start + len(rows)] = ((rows >= best_ground_truth) & ~is_ground_truth).sum(dim=1)
    return ranks


def _text_to_image_ranks(scores_t2i: torch.Tensor, txt2img: torch.Tensor) -> torch.Tensor:
    """0-based rank of each text's ground-truth image."""
    ranks = torch.empty(len(txt2img), dtype=torch.long)
    for start in range(0, len(txt2img), _ROWS_PER_CHUNK):
        rows = scores_t2i[start : start + _ROWS_PER_CHUNK]
        targets = txt2img[start : start + len(rows)]
        ground_truth = rows.gather(1, targets[:, None])
        # ">=" counts the ground truth itself once; everything else at or above it is a loss.
        ranks[start : start + len(rows)] = (rows >= ground_truth).sum(dim=1) - 1
    return ranks


def _recalls(ranks: torch.Tensor) -> list[float]:
    return [100.0 * (ranks < k).double().mean().item() for k in RECALL_AT]


def retrieval_metrics(
    scores_i2t: torch.Tensor,
    scores_t2i: torch.Tensor,
    txt2img: Sequence[int],
    img2txt: Sequence[Sequence[int]],
) -> dict[str, float]:
    """Text and image retrieval recall@1/5/10 (percent), BLIP's definitions.

    Args:
        scores_i2t: [N_img, N_txt] score of each text for each image (higher is better),
            e.g. the output of :func:`rerank_topk`.
        scores_t2i: [N_txt, N_img] score of each image for each text.
        txt2img: the ground-truth image of each text.
        img2txt: the ground-truth texts of each image (COCO: five).

    Returns:
        ``txt_r1, txt_r5, txt_r10, txt_r_mean`` (image -> text: an image counts as
        retrieved at K when any of its texts is in its top K), ``img_r1, img_r5, img_r10,
        img_r_mean`` (text -> image) and ``r_mean``, their average.
    """
    num_images, num_texts = len(img2txt), len(txt2img)
    texts_of_image = _ground_truth_texts(txt2img, img2txt)
    scores_i2t = _check_score_matrix(scores_i2t, (num_images, num_texts), "scores_i2t")
    scores_t2i = _check_score_matrix(scores_t2i, (num_texts, num_images), "scores_t2i")

    text_recalls = _recalls(_image_to_text_ranks(scores_i2t, texts_of_image))
    image_recalls = _recalls(
        _text_to_image_ranks(scores_t2i, torch.as_tensor(list(txt2img), dtype=torch.long))
    )
    metrics = {f"txt_r{k}": value for k, value in zip(RECALL_AT, text_recalls)}
    metrics["txt_r_mean"] = sum(text_recalls) / len(text_recalls)
    metrics.update({f"img_r{k}": value for k, value in zip(RECALL_AT, image_recalls)})
    metrics["img_r_mean"] = sum(image_recalls) / len(image_recalls)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    logger.info(
        "retrieval over %d images / %d texts: TR@1 %.2f TR@5 %.2f TR@10 %.2f | IR@1 %.2f IR@5 %.2f IR@10 %.2f",
        num_images,
        num_texts,
        *text_recalls,
        *image_recalls,
    )
    return metrics


def retrieval_agg_metric(metrics: Mapping[str, Any]) -> float:
    """The number LAVIS keeps the best retrieval checkpoint by: mean text recall."""
    return float(metrics["txt_r_mean"])


# ----------------------------------------------------------------------------- re-ranking


def _resolve_shard(
    rank: int | None, world_size: int | None, group: dist.ProcessGroup | None
) -> tuple[int, int]:
    """Rank and world size of the row sharding, checked against ``group`` when there is one."""
    if group is None:
        rank = 0 if rank is None else rank
        world_size = 1 if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside 0..{world_size - 1}")
        if world_size > 1:
            raise ValueError(
                f"rerank_topk with world_size={world_size} needs the process group whose ranks "
                "share the rows: each rank scores only its rows, the group sums them back"
            )
        return rank, world_size
    group_rank, group_size = dist.get_rank(group), dist.get_world_size(group)
    if (rank is not None and rank != group_rank) or (world_size is not None and world_size != group_size):
        raise ValueError(
            f"rerank_topk got rank={rank}, world_size={world_size}, but this process is rank "
            f"{group_rank} of {group_size} in the given group: shard and reduce over the same group "
            "(the data-parallel group, so tensor-parallel peers score the same rows together)"
        )
    return group_rank, group_size


def rerank_topk(
    itc_sim: torch.Tensor,
    k: int,
    itm_score_fn: ItmScoreFn,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """The final retrieval score matrix: ITC top-k candidates re-scored by ITM.

    Args:
        itc_sim: [N_query, N_candidate] ITC similarities (images x texts for i2t; pass
            the transpose for t2i).
        k: candidates re-scored per row (LAVIS: 128 for COCO / 256 for Flickr); capped
            at N_candidate.
        itm_score_fn: ``fn(row_index, candidate_indices) -> scores`` of shape [len(candidate_indices)],
            the ITM match score of query ``row_index`` with each candidate. It is only
            called for the rows this rank owns, and only on the top-k candidates.
        rank, world_size: rows are split into ``world_size`` contiguous blocks and this
            call scores block ``rank``. Default: taken from ``group``, else 0 and 1.
        group: process group that shares the rows (the data-parallel group); the blocks
            are summed over it with ``all_reduce``, so every rank returns the full matrix.
            Required when ``world_size > 1``; its rank and size must match the arguments.
        show_progress: show a progress bar over this rank's rows.

    Returns:
        float32 [N_query, N_candidate] matrix on ``itc_sim``'s device: ``ITM + ITC`` on
        each row's top-k candidates, :data:`NOT_CANDIDATE` elsewhere. The result is the
        same whatever the world size (each row comes from exactly one rank).
    """
    if itc_sim.dim() != 2:
        raise ValueError(f"itc_sim must be 2-D [queries, candidates], got shape {tuple(itc_sim.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rank, world_size = _resolve_shard(rank, world_size, group)
    num_rows, num_candidates = itc_sim.shape
    k = min(k, num_candidates)

    # Contiguous, balanced blocks of rows (the first num_rows % world_size blocks get one more).
    block, remainder = divmod(num_rows, world_size)
    row_start = rank * block + min(rank, remainder)
    row_end = row_start + block + (1 if rank < remainder else 0)

    scores = torch.full(itc_sim.shape, NOT_CANDIDATE, dtype=torch.float32, device=itc_sim.device)
    rows = range(row_start, row_end)
    if show_progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=f"ITM re-rank (rank {rank})", unit="row")
    with torch.no_grad():
        for row in rows:
            topk_sim, topk_idx = itc_sim[row].topk(k)
            itm_scores = torch.as_tensor(itm_score_fn(row, topk_idx))
            if itm_scores.shape != (k,):
                raise ValueError(
                    f"itm_score_fn returned shape {tuple(itm_scores.shape)} for row {row}; expected ({k},), "
                    "one score per candidate"
                )
            scores[row, topk_idx] = itm_scores.to(scores) + topk_sim.to(scores)

    if world_size > 1:
        # Rows of other ranks are zeroed so the sum leaves each row exactly as its owner
        # computed it (BLIP sums every rank's -100 fill: all scores shift by -100 per extra rank).
        scores[:row_start] = 0
        scores[row_end:] = 0
        dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=group)
    return scores
