"""Evaluation metrics: COCO captions, VQAv2 accuracy, image-text retrieval, reports.

Pure metric code: it takes predictions (and score matrices) produced elsewhere and never
touches a model. Distributed helpers (:func:`gather_results`, :func:`rerank_topk`) take
the process group from the caller, which passes the data-parallel group.
"""

from blip2_megatron.eval.caption import (
    CAPTION_METRICS,
    caption_agg_metric,
    gather_results,
    load_caption_references,
    score_captions,
    spice_unavailable_reason,
    write_result_json,
)
from blip2_megatron.eval.report import format_metrics_table, save_metrics
from blip2_megatron.eval.retrieval import NOT_CANDIDATE, rerank_topk, retrieval_agg_metric, retrieval_metrics
from blip2_megatron.eval.vqa import (
    ANSWER_TYPES,
    normalize_answer,
    question_accuracy,
    vqa_accuracy,
    vqa_agg_metric,
)

__all__ = [
    "ANSWER_TYPES",
    "CAPTION_METRICS",
    "NOT_CANDIDATE",
    "caption_agg_metric",
    "format_metrics_table",
    "gather_results",
    "load_caption_references",
    "normalize_answer",
    "question_accuracy",
    "rerank_topk",
    "retrieval_agg_metric",
    "retrieval_metrics",
    "save_metrics",
    "score_captions",
    "spice_unavailable_reason",
    "vqa_accuracy",
    "vqa_agg_metric",
    "write_result_json",
]
