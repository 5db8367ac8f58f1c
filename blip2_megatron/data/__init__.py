"""Data layer: processors, webdataset streaming, annotation datasets, the built-in sample set.

The training job needs two calls::

    loader = build_train_loader(cfg.data, dp_rank, dp_size, seed)   # per DP rank
    for batch in loader: ...            # loader.stats, loader.state_dict(), len(loader)

and for evaluation ``build_eval_dataset(cfg.data, "val")`` + ``EvalLoader``.
"""

from blip2_megatron.config import DataConfig
from blip2_megatron.data.annotations import (
    CaptionDataset,
    CaptionEvalDataset,
    CaptionRecord,
    ImagePathResolver,
    VQADataset,
    load_caption_records,
    load_vqa_records,
)
from blip2_megatron.data.loader import (
    EvalLoader,
    TrainLoader,
    build_eval_dataset,
    build_train_loader,
    caption_ground_truth,
    collate_drop_none,
    prepare_data,
)
from blip2_megatron.data.processors import (
    CLIP_MEAN,
    CLIP_STD,
    CaptionProcessor,
    ImageEvalProcessor,
    ImageTrainProcessor,
    QuestionProcessor,
)
from blip2_megatron.data.sample_dataset import SampleDatasetPaths, ensure_sample_dataset

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CaptionDataset",
    "CaptionEvalDataset",
    "CaptionProcessor",
    "CaptionRecord",
    "DataConfig",
    "EvalLoader",
    "ImageEvalProcessor",
    "ImagePathResolver",
    "ImageTrainProcessor",
    "QuestionProcessor",
    "SampleDatasetPaths",
    "TrainLoader",
    "VQADataset",
    "build_eval_dataset",
    "build_train_loader",
    "caption_ground_truth",
    "collate_drop_none",
    "ensure_sample_dataset",
    "load_caption_records",
    "load_vqa_records",
    "prepare_data",
]
