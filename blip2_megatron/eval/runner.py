"""Evaluation jobs over a built model: COCO captions, zero-shot VQAv2, stage-1 retrieval.

Every data-parallel rank evaluates its own slice of the set (TP ranks of one DP rank run
the same slice together, since generation is tensor-parallel); results are gathered over
the data-parallel group, checked for duplicates and losses, and scored on global rank 0.
Results and metrics are written under ``<output_dir>/eval/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Subset
from tqdm import tqdm

from blip2_megatron import accelerator
from blip2_megatron.data.loader import EvalLoader, build_eval_dataset, caption_ground_truth
from blip2_megatron.eval.caption import caption_agg_metric, gather_results, score_captions, write_result_json
from blip2_megatron.eval.report import format_metrics_table, save_metrics
from blip2_megatron.eval.retrieval import rerank_topk, retrieval_metrics
from blip2_megatron.eval.vqa import vqa_accuracy
from blip2_megatron.parallel import state
from blip2_megatron.training.config import JobConfig

logger = logging.getLogger(__name__)


def _dp_slice(dataset: Any, max_samples: int) -> tuple[Any, int]:
    """This DP rank's contiguous share of the (optionally truncated) dataset, and the total."""
    total = len(dataset) if not max_samples else min(max_samples, len(dataset))
    rank, size = (state.dp_rank(), state.dp_size()) if state.is_initialized() else (0, 1)
    per_rank = -(-total // size)
    indices = list(range(rank * per_rank, min((rank + 1) * per_rank, total)))
    return Subset(dataset, indices), total


def _gather(local: list[dict[str, Any]], key: str, total: int, dropped: int) -> list[dict[str, Any]]:
    """All DP ranks' results; ``total`` less the images that failed to load on any rank."""
    group = state.dp_group() if state.is_initialized() and dist.is_initialized() else None
    if group is not None:
        count = torch.tensor([dropped], device=accelerator.current_device())
        dist.all_reduce(count, group=group)
        dropped = int(count.item())
    return list(gather_results(local, key=key, expected_total=total - dropped, group=group))


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _progress(loader: EvalLoader, what: str):
    return tqdm(loader, desc=what, disable=not _is_rank0(), leave=False)


@torch.no_grad()
def evaluate_captions(
    model: Any, job: JobConfig, output_dir: Path, split: str | None = None
) -> dict[str, float]:
    """Generate a caption per image and score with pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr, SPICE*)."""
    split = split or job.eval.split
    dataset, total = _dp_slice(
        build_eval_dataset(job.data, split=split, task="caption"), job.eval.max_samples
    )
    loader = EvalLoader(dataset, batch_size=job.eval.batch_size)
    prompt = job.eval.prompt or job.model.prompt
    device = accelerator.current_device()
    results = []
    for batch in _progress(loader, f"captions ({split})"):
        captions = model.generate(
            {"image": batch["image"].to(device)},
            prompt=prompt,
            num_beams=job.eval.num_beams,
            max_new_tokens=job.eval.max_new_tokens,
            min_new_tokens=job.eval.min_new_tokens,
            length_penalty=job.eval.length_penalty,
            repetition_penalty=job.eval.repetition_penalty,
        )
        results += [{"image_id": i, "caption": c} for i, c in zip(batch["image_id"], captions)]
    if loader.stats:
        logger.warning("caption eval skipped images: %s", loader.stats)
    results = _gather(results, "image_id", total, loader.stats.get("unreadable_image", 0))
    metrics: dict[str, float] = {}
    if _is_rank0():
        eval_dir = output_dir / "eval"
        write_result_json(results, eval_dir / f"captions_{split}.json")
        gt = caption_ground_truth(job.data, split)
        if job.eval.max_samples:
            gt = _restrict_ground_truth(gt, {r["image_id"] for r in results})
        metrics = score_captions(results, gt)
        metrics["agg_metric"] = caption_agg_metric(metrics)
        save_metrics(metrics, eval_dir / f"metrics_caption_{split}.json")
        logger.info("\n%s", format_metrics_table(metrics, title=f"caption metrics ({split})"))
    return metrics


def _restrict_ground_truth(gt_path: str, image_ids: set[Any]) -> dict[str, Any]:
    """The COCO ground truth limited to the evaluated images (for eval.max_samples)."""
    import json

    data = json.loads(Path(gt_path).read_text())
    keep = {str(i) for i in image_ids}
    data["images"] = [img for img in data["images"] if str(img["id"]) in keep]
    data["annotations"] = [a for a in data["annotations"] if str(a["image_id"]) in keep]
    return data


@torch.no_grad()
def evaluate_vqa(model: Any, job: JobConfig, output_dir: Path) -> dict[str, Any]:
    """Zero-shot VQAv2: beam-search short answers, scored with the standard VQA accuracy."""
    full = build_eval_dataset(job.data, task="vqa")
    dataset, total = _dp_slice(full, job.eval.max_samples)
    loader = EvalLoader(dataset, batch_size=job.eval.batch_size)
    device = accelerator.current_device()
    prompt = job.eval.prompt or "Question: {} Short answer:"
    predictions = []
    for batch in _progress(loader, "VQA"):
        answers = model.predict_answers(
            {"image": batch["image"].to(device), "text_input": batch["text_input"]},
            prompt=prompt,
            num_beams=job.eval.num_beams,
            max_new_tokens=job.eval.max_new_tokens,
            min_new_tokens=job.eval.min_new_tokens,
            length_penalty=job.eval.length_penalty,
        )
        predictions += [{"question_id": q, "answer": a} for q, a in zip(batch["question_id"], answers)]
    predictions = _gather(predictions, "question_id", total, loader.stats.get("unreadable_image", 0))
    metrics: dict[str, Any] = {}
    if _is_rank0():
        eval_dir = output_dir / "eval"
        write_result_json(predictions, eval_dir / "vqa_answers.json")
        asked = {p["question_id"] for p in predictions}
        annotations = [
            {
                "question_id": r.question_id,
                "answer_type": r.answer_type,
                "answers": [{"answer": a} for a in r.answers],
            }
            for r in full.records
            if r.question_id in asked and r.answers
        ]
        if annotations:
            scored = vqa_accuracy(
                [p for p in predictions if p["question_id"] in {a["question_id"] for a in annotations}],
                annotations,
            )
            metrics = {k: v for k, v in scored.items() if k != "per_question"}
            metrics["agg_metric"] = metrics["overall"]
            save_metrics(metrics, eval_dir / "metrics_vqa.json")
            logger.info("\n%s", format_metrics_table(metrics, title="VQAv2 accuracy"))
        else:
            logger.info(
                "no answers in the annotations (test-dev?): wrote %s only", eval_dir / "vqa_answers.json"
            )
    return metrics


@torch.no_grad()
def evaluate_retrieval(
    model: Any, job: JobConfig, output_dir: Path, split: str | None = None
) -> dict[str, float]:
    """Stage-1 image-text retrieval: ITC similarity, top-k re-ranked by ITM, R@1/5/10 both ways."""
    split = split or job.eval.split
    dataset, _ = _dp_slice(build_eval_dataset(job.data, split=split, task="caption"), job.eval.max_samples)
    if state.is_initialized() and state.dp_size() > 1:
        raise NotImplementedError(
            "retrieval evaluation runs on one data-parallel rank; launch it with 1 process"
        )
    loader = EvalLoader(dataset, batch_size=job.eval.batch_size)
    device = accelerator.current_device()
    image_feats, images, texts, txt2img, img2txt = [], [], [], [], []
    for batch in _progress(loader, "retrieval features"):
        image = batch["image"].to(device)
        image_feats.append(model.image_embeds_itc(image))
        images.append(image)
        for captions in batch["captions"]:
            img2txt.append(list(range(len(texts), len(texts) + len(captions))))
            txt2img += [len(img2txt) - 1] * len(captions)
            texts += captions
    image_feats_all = torch.cat(image_feats)  # [N_img, Q, D]
    text_feats = torch.cat([model.text_embeds_itc(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    sim_i2t = (image_feats_all @ text_feats.t()).max(dim=1).values  # [N_img, N_txt]: best query
    all_images = torch.cat(images)

    def itm_i2t(row: int, cands: torch.Tensor) -> torch.Tensor:
        return model.itm_scores(
            all_images[row].expand(len(cands), -1, -1, -1), [texts[c] for c in cands.tolist()]
        )

    def itm_t2i(row: int, cands: torch.Tensor) -> torch.Tensor:
        return model.itm_scores(all_images[cands], [texts[row]] * len(cands))

    k = job.eval.k_test
    scores_i2t = rerank_topk(sim_i2t, k, itm_i2t)
    scores_t2i = rerank_topk(sim_i2t.t().contiguous(), k, itm_t2i)
    metrics = retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    if _is_rank0():
        save_metrics(metrics, output_dir / "eval" / f"metrics_retrieval_{split}.json")
        logger.info("\n%s", format_metrics_table(metrics, title=f"retrieval ({split})"))
    return metrics


def run_evaluation(model: Any, job: JobConfig, output_dir: Path) -> dict[str, Any]:
    """The evaluation ``job.eval.task`` names, on an unwrapped model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        if job.eval.task == "caption":
            return evaluate_captions(model, job, output_dir)
        if job.eval.task == "vqa":
            return evaluate_vqa(model, job, output_dir)
        return evaluate_retrieval(model, job, output_dir)
    finally:
        model.train(was_training)
