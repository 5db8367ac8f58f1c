"""Evaluation jobs over a predictor: COCO captions, zero-shot VQAv2, stage-1 retrieval.

Every data-parallel rank evaluates its own slice of the set (TP ranks of one DP rank run
the same slice together, since generation is tensor-parallel); results are gathered over
the data-parallel group, checked for duplicates and losses, and scored on global rank 0.
Results and metrics are written under ``<output_dir>/eval/``.

Images that are missing or unreadable are skipped and counted (``num_missing_images``,
``num_unreadable_images`` in the metrics); an evaluation left with nothing to score raises
:class:`EvaluationError` on every rank (``launch/evaluate.py`` then exits non-zero).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Subset
from tqdm import tqdm

from blip2_megatron import accelerator
from blip2_megatron.config import ConfigError, JobConfig
from blip2_megatron.data.loader import EvalLoader, build_eval_dataset, caption_ground_truth, prepare_data
from blip2_megatron.eval.caption import (
    SpiceUnavailableError,
    caption_agg_metric,
    check_spice_available,
    gather_results,
    score_captions,
    write_result_json,
)
from blip2_megatron.eval.report import format_metrics_table, save_metrics
from blip2_megatron.eval.retrieval import rerank_topk, retrieval_agg_metric, retrieval_metrics
from blip2_megatron.eval.vqa import vqa_accuracy
from blip2_megatron.inference import DEFAULT_VQA_PROMPT, Blip2Predictor
from blip2_megatron.parallel import state

logger = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """The evaluation could not produce a score (e.g. every image is missing)."""


def _dp_group() -> dist.ProcessGroup | None:
    return state.dp_group() if state.is_initialized() and dist.is_initialized() else None


def _dp_slice(dataset: Any, max_samples: int) -> tuple[Any, int]:
    """This DP rank's contiguous share of the (optionally truncated) dataset, and the total."""
    total = len(dataset) if not max_samples else min(max_samples, len(dataset))
    rank, size = (state.dp_rank(), state.dp_size()) if state.is_initialized() else (0, 1)
    per_rank = -(-total // size)
    indices = list(range(rank * per_rank, min((rank + 1) * per_rank, total)))
    return Subset(dataset, indices), total


def _by_question_length(subset: Subset) -> Subset:
    """This rank's questions longest first (by processed words), so a batch's prompts pad little.

    Generation pads each batch's prompts on the left to its longest; in the data's own order
    a batch mixes short and long questions and every row pays for the longest. Answers are
    keyed by question id, so the order changes no result.
    """
    dataset = subset.dataset
    words = [len(dataset.question_processor(dataset.records[i].question).split()) for i in subset.indices]
    order = sorted(range(len(words)), key=lambda k: -words[k])
    return Subset(dataset, [subset.indices[k] for k in order])


def _skip_counts(dataset: Any, loader: EvalLoader, reduce: bool = True) -> dict[str, int]:
    """Missing images (found when the set was built: the same on every rank) plus load failures.

    ``reduce``: each DP rank loaded its own slice, so the failures are summed over them.
    """
    built = dataset.dataset if isinstance(dataset, Subset) else dataset
    missing = int(getattr(built, "skipped", {}).get("missing_image", 0))
    unreadable = sum(v for k, v in loader.stats.items() if k != "missing_image")
    group = _dp_group()
    if reduce and group is not None:
        count = torch.tensor([unreadable], device=accelerator.current_device())
        dist.all_reduce(count, group=group)
        unreadable = int(count.item())
    return {"num_missing_images": missing, "num_unreadable_images": unreadable}


def _gather(local: list[dict[str, Any]], key: str, total: int, unreadable: int) -> list[dict[str, Any]]:
    """All DP ranks' results; ``total`` less the images that failed to load on any rank."""
    return list(gather_results(local, key=key, expected_total=total - unreadable, group=_dp_group()))


def _require_results(results: list[Any], what: str, skips: dict[str, int], total: int) -> None:
    if not results:
        raise EvaluationError(
            f"nothing to score for {what}: {total} item(s) with images, {skips['num_missing_images']} missing "
            f"image(s), {skips['num_unreadable_images']} unreadable (check data.image_root and the annotation paths)"
        )


def _require_annotation(job: JobConfig, split: str, task: str) -> None:
    """Fail with the key to set when the split's annotation is not configured.

    Caption and retrieval evaluation both read a Karpathy-format json of images and their
    reference captions; a job without one (a pretraining job whose data section names only
    shards) gets a config error naming its task, which ``launch/evaluate.py`` prints.
    """
    if split not in ("val", "test"):
        return  # build_eval_dataset names the valid splits
    data = prepare_data(job.data)  # the built-in data fills its own annotation paths
    if not getattr(data, f"{split}_annotation"):
        raise ConfigError(
            f"data.{split}_annotation is required for {task} evaluation (eval.task={task}, eval.split={split}): "
            f"set it to a Karpathy-format json of images and their captions, "
            f"e.g. coco_karpathy_{split}.json, and data.image_root to the folder its image paths start from"
        )


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _progress(loader: EvalLoader, what: str):
    return tqdm(loader, desc=what, disable=not _is_rank0(), leave=False)


@torch.no_grad()
def evaluate_captions(
    model: Blip2Predictor, job: JobConfig, output_dir: Path, split: str | None = None
) -> dict[str, float]:
    """Generate a caption per image and score with pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr, SPICE*)."""
    split = split or job.eval.split
    _require_annotation(job, split, "caption")
    if job.eval.require_spice:  # before generating: a missing jar should not cost the generation
        try:
            check_spice_available()
        except SpiceUnavailableError as err:
            raise EvaluationError(str(err)) from None
    dataset, total = _dp_slice(
        build_eval_dataset(job.data, split=split, task="caption"), job.eval.max_samples
    )
    loader = EvalLoader(dataset, batch_size=job.eval.batch_size)
    prompt = job.eval.prompt or job.model.prompt
    results = []
    for batch in _progress(loader, f"captions ({split})"):
        captions = model.generate(
            {"image": batch["image"]},
            prompt=prompt,
            num_beams=job.eval.num_beams,
            max_new_tokens=job.eval.max_new_tokens,
            min_new_tokens=job.eval.min_new_tokens,
            length_penalty=job.eval.length_penalty,
            repetition_penalty=job.eval.repetition_penalty,
        )
        results += [{"image_id": i, "caption": c} for i, c in zip(batch["image_id"], captions)]
    skips = _skip_counts(dataset, loader)
    results = _gather(results, "image_id", total, skips["num_unreadable_images"])
    _require_results(results, f"captions ({split})", skips, total)
    metrics: dict[str, float] = {}
    if _is_rank0():
        eval_dir = output_dir / "eval"
        write_result_json(results, eval_dir / f"captions_{split}.json")
        gt = caption_ground_truth(job.data, split)
        if job.eval.max_samples or skips["num_unreadable_images"]:
            gt = _restrict_ground_truth(gt, {r["image_id"] for r in results})
        metrics = score_captions(results, gt, with_spice=True if job.eval.require_spice else None)
        metrics["agg_metric"] = caption_agg_metric(metrics)
        metrics.update(num_evaluated=len(results), **skips, **_generation_speed(model))
        save_metrics(metrics, eval_dir / f"metrics_caption_{split}.json")
        logger.info("\n%s", format_metrics_table(metrics, title=f"caption metrics ({split})"))
    return metrics


def _restrict_ground_truth(gt_path: str, image_ids: set[Any]) -> dict[str, Any]:
    """The COCO ground truth limited to the evaluated images (eval.max_samples, unreadable images)."""
    data = json.loads(Path(gt_path).read_text())
    keep = {str(i) for i in image_ids}
    data["images"] = [img for img in data["images"] if str(img["id"]) in keep]
    data["annotations"] = [a for a in data["annotations"] if str(a["image_id"]) in keep]
    return data


@torch.no_grad()
def evaluate_vqa(model: Blip2Predictor, job: JobConfig, output_dir: Path) -> dict[str, Any]:
    """Zero-shot VQAv2: beam-search short answers, scored with the standard VQA accuracy."""
    full = build_eval_dataset(job.data, task="vqa")
    dataset, total = _dp_slice(full, job.eval.max_samples)
    dataset = _by_question_length(dataset)
    loader = EvalLoader(dataset, batch_size=job.eval.batch_size)
    prompt = job.eval.prompt or DEFAULT_VQA_PROMPT
    predictions = []
    for batch in _progress(loader, "VQA"):
        answers = model.predict_answers(
            {"image": batch["image"], "text_input": batch["text_input"]},
            prompt=prompt,
            num_beams=job.eval.num_beams,
            max_new_tokens=job.eval.max_new_tokens,
            min_new_tokens=job.eval.min_new_tokens,
            length_penalty=job.eval.length_penalty,
        )
        predictions += [{"question_id": q, "answer": a} for q, a in zip(batch["question_id"], answers)]
    skips = _skip_counts(dataset, loader)
    predictions = _gather(predictions, "question_id", total, skips["num_unreadable_images"])
    _require_results(predictions, "VQA", skips, total)
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
        metrics = {"num_evaluated": len(predictions), **skips, **_generation_speed(model)}
        if annotations:
            answered = {a["question_id"] for a in annotations}
            scored = vqa_accuracy([p for p in predictions if p["question_id"] in answered], annotations)
            metrics.update({k: v for k, v in scored.items() if k != "per_question"})
            metrics["agg_metric"] = metrics["overall"]
            logger.info("\n%s", format_metrics_table(metrics, title="VQAv2 accuracy"))
        else:
            logger.info(
                "no answers in the annotations (test-dev?): wrote %s only", eval_dir / "vqa_answers.json"
            )
        save_metrics(metrics, eval_dir / "metrics_vqa.json")
    return metrics


@torch.no_grad()
def evaluate_retrieval(
    model: Blip2Predictor, job: JobConfig, output_dir: Path, split: str | None = None
) -> dict[str, float]:
    """Stage-1 image-text retrieval: ITC similarity, top-k re-ranked by ITM, R@1/5/10 both ways.

    As LAVIS: every rank computes the features of the whole set (ITC needs all pairs), and
    the ITM re-ranking, the costly part, is split by rows over the data-parallel ranks.
    """
    split = split or job.eval.split
    _require_annotation(job, split, "retrieval")
    full = build_eval_dataset(job.data, split=split, task="caption")
    total = len(full) if not job.eval.max_samples else min(job.eval.max_samples, len(full))
    dataset = Subset(full, range(total))
    loader = EvalLoader(dataset, batch_size=job.eval.batch_size)
    image_embeds, image_feats, texts, txt2img, img2txt = [], [], [], [], []
    for batch in _progress(loader, "retrieval features"):
        embeds = model.encode_image(batch["image"])
        image_embeds.append(embeds)
        image_feats.append(model.image_features(image_embeds=embeds))
        for captions in batch["captions"]:
            img2txt.append(list(range(len(texts), len(texts) + len(captions))))
            txt2img += [len(img2txt) - 1] * len(captions)
            texts += captions
    skips = _skip_counts(dataset, loader, reduce=False)
    _require_results(img2txt, f"retrieval ({split})", skips, total)
    image_feats_all = torch.cat(image_feats)  # [N_img, Q, D]
    text_feats = torch.cat([model.text_features(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    sim_i2t = (image_feats_all @ text_feats.t()).max(dim=1).values  # [N_img, N_txt]: best query
    all_embeds = torch.cat(image_embeds)

    def itm_i2t(row: int, cands: torch.Tensor) -> torch.Tensor:
        return model.itm_scores(
            all_embeds[row].expand(len(cands), -1, -1), [texts[c] for c in cands.tolist()]
        )

    def itm_t2i(row: int, cands: torch.Tensor) -> torch.Tensor:
        return model.itm_scores(all_embeds[cands], [texts[row]] * len(cands))

    k = job.eval.k_test
    scores_i2t = rerank_topk(sim_i2t, k, itm_i2t, group=_dp_group())
    scores_t2i = rerank_topk(sim_i2t.t().contiguous(), k, itm_t2i, group=_dp_group())
    metrics = retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    metrics["agg_metric"] = retrieval_agg_metric(metrics)
    metrics.update(num_evaluated=len(img2txt), **skips)
    if _is_rank0():
        save_metrics(metrics, output_dir / "eval" / f"metrics_retrieval_{split}.json")
        logger.info("\n%s", format_metrics_table(metrics, title=f"retrieval ({split})"))
    return metrics


def _generation_speed(model: Blip2Predictor) -> dict[str, Any]:
    """This rank's new tokens per second over the evaluation, and the dtype it computed in."""
    dtype = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[model.compute_dtype]
    speed = model.tokens_per_second()
    return {"compute_dtype": dtype, **({"tokens_per_s": round(speed, 2)} if speed else {})}


def run_evaluation(model: Blip2Predictor, job: JobConfig, output_dir: Path) -> dict[str, Any]:
    """The evaluation ``job.eval.task`` names, on a predictor in eval mode (restored afterwards)."""
    model.generated_tokens, model.generation_seconds = 0, 0.0
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
