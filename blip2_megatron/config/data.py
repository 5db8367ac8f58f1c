"""The data section of a job config: where the data is, how it is processed and batched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from blip2_megatron.config.base import ConfigError, check_choice, check_positive

#: Dataset kinds: webdataset shards, the three annotation formats, and the built-in sample set.
DATASET_KINDS = ("wds", "coco", "vg", "cc_sbu_align", "sample")
#: Kinds whose training data is an annotation file plus an image folder.
ANNOTATION_KINDS = ("coco", "vg", "cc_sbu_align")
#: How several training sources mix: per sample, or per batch (one source per step).
MIX_MODES = ("sample", "batch")
#: What a training source teaches (InstructBLIP's task of a held-in dataset); it picks the target and the templates.
SOURCE_TASKS = ("caption", "vqa", "conversation")
#: ``data.mix_weights`` instead of a list: each source weighted by the square root of its sample count (InstructBLIP).
SQRT_MIX = "sqrt"


@dataclass
class DataConfig:
    """Training and evaluation data of one job. Every field has a default (the tiny CPU job)."""

    kind: str = "sample"
    """Training data: "wds" (shards), "coco" / "vg" / "cc_sbu_align" (annotations), "sample" (built-in)."""
    train_shards: list[str] = field(default_factory=list)
    """kind=wds: one shard pattern per source (a list, brace pattern such as "/d/{00000..00099}.tar", or "a.tar::b.tar")."""
    mix_weights: list[float] | str | None = None
    """Sampling weight per entry of train_shards (MiniGPT-4: [115, 14]), or "sqrt" (square root of each source's counted samples: InstructBLIP); None = equal weights."""
    mix_mode: str = "sample"
    """How sources mix: "sample" (each sample drawn by mix_weights) or "batch" (each batch from one source, chosen by mix_weights, the same on every DP rank: MiniGPT-4's per-step choice)."""
    source_tasks: list[str] | None = None
    """Task of each training source, one per train_shards entry: "caption", "vqa" (json "question" + "answers") or "conversation" (the text as written); kind=sample without train_shards: the built-in sources of those tasks. None = all "caption"."""
    instruction_templates: str = ""
    """Instruction templates per task (a shipped name such as "instruct_templates", or a json path); each sample draws one as its per-sample prompt. Required for vqa / conversation sources."""
    resampled: bool = False
    """Draw shards with replacement (pretraining) instead of a seeded shuffle + split by DP rank and worker."""
    samples_per_epoch: int | None = None
    """Samples per epoch over all DP ranks; None = count them (img2dataset *_stats.json or tar listing)."""
    train_annotation: str = ""
    """kind=coco/vg/cc_sbu_align: training annotation json (Karpathy train, VG captions, filter_cap.json)."""
    image_root: str = ""
    """Folder the annotation "image" paths are relative to (cc_sbu_align: default <annotation dir>/image)."""
    image_subdirs: list[str] = field(default_factory=list)
    """Extra sub-folders of image_root searched by file name when a path is missing (VG: ["VG_100K", "VG_100K_2"])."""
    val_annotation: str = ""
    """Caption eval json for the val split (Karpathy format: {"image", "caption": [refs]})."""
    test_annotation: str = ""
    """Caption eval json for the test split."""
    val_gt: str = ""
    """COCO-format ground truth for val captions (what pycocoevalcap's COCO() loads)."""
    test_gt: str = ""
    """COCO-format ground truth for test captions."""
    vqa_questions: str = ""
    """VQAv2 questions json (official format, or LAVIS's list with "image" and "question")."""
    vqa_annotations: str = ""
    """VQAv2 annotations json with answers (optional for test-dev)."""
    vqa_image_template: str = "val2014/COCO_val2014_{image_id:012d}.jpg"
    """Image path of a VQAv2 question under image_root, from its image_id (test-dev: "test2015/COCO_test2015_{image_id:012d}.jpg")."""
    sample_root: str = "data/sample_dataset"
    """kind=sample: where the built-in synthetic dataset is generated (once) and read from."""
    image_size: int = 224
    """Side of the square model input in pixels (BLIP-2: 224 pretraining, 364 COCO fine-tuning)."""
    train_augment: bool | None = None
    """Random resized crop + flip (True) or the eval resize (False); None = True except kind=sample (its captions name positions)."""
    min_crop_scale: float = 0.5
    """Smallest area fraction of the random resized crop (BLIP-2: 0.5)."""
    batch_size: int = 8
    """Samples per batch per DP rank (micro batch)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: int = 1000
    """Sample shuffle buffer per worker (0 = no sample shuffle); shard order is shuffled anyway."""
    prompt: str = ""
    """Prefix added to every processed training caption (COCO caption fine-tuning: "a photo of ")."""
    max_words: int = 50
    """Captions and questions are cut to this many words."""

    def __post_init__(self) -> None:
        check_choice("data.kind", self.kind, DATASET_KINDS)
        if isinstance(self.train_shards, str):
            self.train_shards = [self.train_shards]
        if self.kind == "wds" and not self.train_shards:
            raise ConfigError("data.train_shards must name at least one shard pattern when data.kind='wds'")
        check_choice("data.mix_mode", self.mix_mode, MIX_MODES)
        self._check_source_tasks()
        if isinstance(self.mix_weights, str):
            if self.mix_weights != SQRT_MIX:
                raise ConfigError(
                    f"data.mix_weights={self.mix_weights!r} is not allowed; give one weight per source "
                    f"or {SQRT_MIX!r} (square root of each source's size)"
                )
        elif self.mix_weights is not None:
            if len(self.mix_weights) != self.num_train_sources:
                raise ConfigError(
                    f"data.mix_weights has {len(self.mix_weights)} entries but {self._sources_phrase()}; "
                    "give one weight per shard pattern"
                )
            for index, weight in enumerate(self.mix_weights):
                check_positive(f"data.mix_weights[{index}]", weight)
        if self.kind in ANNOTATION_KINDS and not self.train_annotation:
            raise ConfigError(f"data.train_annotation is required when data.kind={self.kind!r}")
        if self.samples_per_epoch is not None:
            check_positive("data.samples_per_epoch", self.samples_per_epoch)
        check_positive("data.image_size", self.image_size)
        check_positive("data.batch_size", self.batch_size)
        check_positive("data.num_workers", self.num_workers, allow_zero=True)
        check_positive("data.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        check_positive("data.max_words", self.max_words)
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ConfigError(f"data.min_crop_scale={self.min_crop_scale!r} must be in (0, 1]")
        if self.train_augment is None:
            self.train_augment = self.kind != "sample"

    @property
    def num_train_sources(self) -> int:
        """Training sources mixed: one per shard pattern (kind=sample without them: one per task), one annotation file."""
        if self.kind in ANNOTATION_KINDS:
            return 1
        if self.train_shards:
            return len(self.train_shards)
        return len(self.source_tasks) if self.kind == "sample" and self.source_tasks else 1

    @property
    def tasks(self) -> list[str]:
        """The task of each training source ("caption" for all when source_tasks is unset)."""
        return list(self.source_tasks) if self.source_tasks else ["caption"] * self.num_train_sources

    def _sources_phrase(self) -> str:
        if self.kind in ANNOTATION_KINDS:
            return f"data.kind={self.kind!r} reads one source (data.train_annotation)"
        if not self.train_shards and self.source_tasks:
            return f"data.source_tasks names {len(self.source_tasks)} built-in source(s)"
        return f"data.train_shards has {self.num_train_sources}"

    def _check_source_tasks(self) -> None:
        if isinstance(self.source_tasks, str):
            self.source_tasks = [self.source_tasks]
        if self.source_tasks is not None:
            if not self.source_tasks:
                raise ConfigError(
                    "data.source_tasks must name one task per source, or be null (all 'caption')"
                )
            for index, task in enumerate(self.source_tasks):
                check_choice(f"data.source_tasks[{index}]", task, SOURCE_TASKS)
            if self.kind in ANNOTATION_KINDS and "vqa" in self.source_tasks:
                raise ConfigError(
                    f"data.source_tasks=['vqa'] needs VQA shards (json 'question' and 'answers'), not a "
                    f"data.kind={self.kind!r} caption file; convert VQAv2 with data_tools/vqa_to_wds.py and "
                    "use data.kind='wds'"
                )
            if len(self.source_tasks) != self.num_train_sources:
                raise ConfigError(
                    f"data.source_tasks has {len(self.source_tasks)} entries but {self._sources_phrase()}; "
                    "give one task per source"
                )
        needs_templates = sorted(set(self.tasks) - {"caption"})
        if needs_templates and not self.instruction_templates:
            raise ConfigError(
                f"data.source_tasks has {needs_templates} source(s), which are trained on instructions; set "
                "data.instruction_templates (e.g. 'instruct_templates', the shipped templates)"
            )
        if self.instruction_templates and self.prompt:
            raise ConfigError(
                f"data.prompt={self.prompt!r} and data.instruction_templates={self.instruction_templates!r} both "
                "prefix the targets; with instruction templates every sample's prompt is its instruction, "
                "so leave data.prompt empty"
            )

    def replace(self, **changes) -> DataConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
