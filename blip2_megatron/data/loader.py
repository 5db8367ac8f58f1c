"""Train loader (streaming, resumable, equal batch counts per DP rank) and eval loaders.

Data is split by the DP rank and DP size the caller passes in, never by the global rank
or anything read from the environment: the TP (and PP) ranks of one DP rank build the
same loader and get identical batches.

How a rank's epoch is laid out
------------------------------
Every rank yields exactly ``batches_per_epoch = samples_per_epoch // (dp_size *
batch_size)`` batches per epoch (unequal counts would hang the collective ops of
training). The work is split into ``S = max(1, num_workers)`` *logical streams*; batch
``b`` of the epoch (0-based) is batch ``b // S`` of stream ``b % S``, which is the order
torch's DataLoader returns when worker k plays stream k. Stream ``s`` of rank ``r``:

1. takes its units (shards, or annotation entries) for pass 0, 1, 2, ... from
   :func:`wds.assign_units` (a permutation seeded by (seed, epoch, pass) sliced by
   ``[r::dp_size][s::S]``, or draws with replacement when resampling); a stream that
   runs out before the epoch's batch count simply starts the next pass,
2. reads raw samples of each pass through a shuffle buffer (drained at the end of the
   pass), then mixes the sources (``data.mix_mode``):

   * ``"sample"``: each sample comes from source i with probability ``mix_weights[i]``;
   * ``"batch"``: each batch comes whole from one source, source i with probability
     ``mix_weights[i]`` (MiniGPT-4's multi-loader choice per step). The choice for batch
     ``b`` of the epoch is keyed by (seed, epoch, b) and not by the rank, so every DP rank
     takes step ``b``'s batch from the same source and the global batch is one source's.
     (MiniGPT-4 seeds its Python RNG with seed + rank, so there each rank chooses on its
     own.) A source thus feeds whole steps, and a step's ranks see data of one kind.

3. decodes and processes sample ``i`` of the stream with a generator keyed by (seed,
   epoch, rank, stream, i); bad samples are skipped and counted by reason. The same key
   travels with the sample as its ``sample_key`` (the batch builder draws a MiniGPT-4
   instruction by it). With ``data.instruction_templates`` (InstructBLIP) the sample's
   source task (``data.source_tasks``) picks its target (caption: the cleaned caption;
   vqa: the most frequent answer; conversation: the text as written) and its template,
   drawn by ``sample_key`` alone: the sample carries ``prompt`` (the instruction, a VQA
   question filled in) and ``task``,
4. groups them into batches of ``batch_size``.

Ranks that share a DP rank's batches but not its images
--------------------------------------------------------
With tensor parallelism each TP rank encodes only ``ceil(B / TP)`` of a batch's images
(``parallel/tp_split.py``), and a later pipeline stage encodes none. Such a rank passes
``image_rows``: it fully decodes only the images of those rows and only validates the
others, with the same 1/8-scale decode a resume replays with. Every rank still reads and
validates every sample, so all of them skip the same bad samples and build the same
batches; the batch's ``"image"`` holds the decoded rows only. A validation passing where
the full decode fails would split the ranks' batches apart, so that case stops the job
with the sample's name instead of skipping it on one rank.

Every random choice is keyed by (seed, epoch, ...), so the epoch is a pure function of
(seed, epoch, dp_rank, dp_size, num_workers, data).

Resume rule
-----------
``state_dict()`` holds (epoch, position = batches consumed this epoch, skip counts).
After ``load_state_dict()`` the loader replays the epoch's streams and drops the first
``position`` batches, so the next batch equals the one an uninterrupted run would have
produced. With workers, DataLoader worker k then plays stream ``(position + k) % S``,
which keeps the round-robin order of an uninterrupted run. This holds when seed, DP size,
batch size, num_workers and the data are unchanged (a change is logged and the loader
continues from the same epoch and position, with different batches). Replayed batches are
not decoded: only validated with a 1/8-scale JPEG decode, so resuming late in an epoch
costs a fraction of the epoch's decode time. The state of any DP rank restores every rank
(epoch and position are the same on all ranks).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, get_worker_info

from blip2_megatron import accelerator
from blip2_megatron.config import ANNOTATION_KINDS, ConfigError, DataConfig
from blip2_megatron.config.data import SOURCE_TASKS, SQRT_MIX
from blip2_megatron.data.annotations import (
    AnnotationSource,
    CaptionEvalDataset,
    ImagePathResolver,
    VQADataset,
    load_caption_records,
    load_vqa_records,
)
from blip2_megatron.data.batch import SAMPLE_KEY, prompt_file_path
from blip2_megatron.data.processors import (
    CaptionProcessor,
    ImageEvalProcessor,
    ImageTrainProcessor,
    QuestionProcessor,
    SampleError,
    check_decodable,
)
from blip2_megatron.data.sample_dataset import ensure_sample_dataset, load_sample_dataset
from blip2_megatron.data.wds import (
    ShardSource,
    SkipCounter,
    assign_units,
    check_shards_exist,
    expand_shard_patterns,
    make_rng,
    mix_sources,
    shuffle_samples,
    unpack_sample,
    unpack_vqa_sample,
)

logger = logging.getLogger(__name__)

#: Batch key carrying skip counts from a worker to :class:`TrainLoader` (removed before the caller sees the batch).
SKIPPED_KEY = "__skipped__"
#: A stream that has produced no usable sample after this many in a row gives up (wrong data, not bad luck).
_MAX_LEADING_FAILURES = 1000


class DataSource(Protocol):
    """What the stream needs from a source: units to assign, and how to read one."""

    name: str
    units: Sequence[Any]

    @property
    def num_samples(self) -> int: ...

    def read(self, unit: Any, on_error: Any) -> Iterator[dict[str, Any]]: ...


@dataclass
class StreamSpec:
    """Everything a worker needs to produce its part of an epoch (pickled into workers)."""

    sources: list[DataSource]
    weights: list[float]
    mix_mode: str
    resampled: bool
    seed: int
    dp_rank: int
    dp_size: int
    num_streams: int
    batch_size: int
    batches_per_epoch: int
    shuffle_buffer: int
    image_processor: ImageTrainProcessor | ImageEvalProcessor
    text_processor: CaptionProcessor
    batch_builder: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    image_rows: tuple[int, ...] | None = None  # rows whose images this rank decodes (None: all)
    tasks: tuple[str, ...] = ()  # task of each source (empty: all "caption")
    templates: dict[str, list[str]] | None = None  # instruction templates per task (None: no instructions)


# ----------------------------------------------------------------------------- instruction templates


def load_instruction_templates(spec: str, tasks: Sequence[str]) -> dict[str, list[str]]:
    """The templates of a json file ``{task: [instruction, ...]}``, checked for the ``tasks`` in use.

    Every task a source has must have at least one template; a "vqa" template holds
    ``{}`` once (where the question goes), the others none. A key that is not a task is
    an error, so a typo cannot leave a task without instructions.
    """
    path = prompt_file_path(spec, ".json", "data.instruction_templates", "template file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"instruction template file {path} is not valid json: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"instruction template file {path} must hold {{task: [templates]}}")
    unknown = sorted(set(data) - set(SOURCE_TASKS))
    if unknown:
        raise ConfigError(
            f"instruction template file {path} has unknown task(s) {unknown}; tasks: {list(SOURCE_TASKS)}"
        )
    for task in sorted(set(tasks)):
        if task not in data:
            raise ConfigError(
                f"instruction template file {path} has no {task!r} templates (it has {sorted(data)}), but a "
                f"training source has task {task!r} (data.source_tasks)"
            )
    templates: dict[str, list[str]] = {}
    for task, entries in data.items():
        if not isinstance(entries, list) or not entries:
            raise ConfigError(
                f"instruction template file {path}: {task!r} must be a non-empty list of strings"
            )
        slots = 1 if task == "vqa" else 0
        for index, entry in enumerate(entries):
            if not isinstance(entry, str) or not entry.strip():
                raise ConfigError(
                    f"instruction template file {path}: {task}[{index}] is not a non-empty string"
                )
            if entry.count("{}") != slots:
                where = "holds the question at {} exactly once" if slots else "has no {} (nothing fills it)"
                raise ConfigError(
                    f"instruction template file {path}: {task}[{index}]={entry!r}; a {task!r} template {where}"
                )
        templates[task] = [entry.strip() for entry in entries]
    return templates


def draw_instruction(templates: Sequence[str], sample_key: str) -> str:
    """The template of the sample at ``sample_key``: the same on every call, rank and resumed run."""
    return templates[make_rng(sample_key, "instruction_template").randrange(len(templates))]


# ----------------------------------------------------------------------------- stream stages


def _source_samples(spec: StreamSpec, source_index: int, epoch: int, stream_id: int, skips: SkipCounter):
    """Endless raw samples of one source for one stream: pass after pass over its units.

    The shuffle buffer is drained at the end of each pass, so the samples of pass p all
    come before those of pass p+1: a rank that needs exactly its share of the epoch never
    pulls in samples of the next pass (which belong to other ranks' shards).
    """
    source = spec.sources[source_index]
    for pass_index in itertools.count():
        units = assign_units(
            len(source.units),
            resampled=spec.resampled,
            seed=spec.seed,
            epoch=epoch,
            pass_index=pass_index,
            source_index=source_index,
            dp_rank=spec.dp_rank,
            dp_size=spec.dp_size,
            stream_id=stream_id,
            num_streams=spec.num_streams,
        )
        raw_samples = (
            raw for unit in units for raw in source.read(source.units[unit], skips.shard_error_handler)
        )
        shuffle_rng = make_rng(spec.seed, epoch, spec.dp_rank, stream_id, "shuffle", source_index, pass_index)
        produced = 0
        for raw in shuffle_samples(raw_samples, spec.shuffle_buffer, shuffle_rng):
            produced += 1
            yield raw
        if produced == 0:
            raise RuntimeError(
                f"source {source.name!r} gave no sample in a whole pass over {len(units)} unit(s) "
                f"(e.g. {source.units[units[0]]!r}); are the shards empty or unreadable?"
            )


def _instruction_sample(
    spec: StreamSpec, raw: dict[str, Any], rng: random.Random, task: str, sample_key: str
) -> tuple[bytes, dict[str, Any]]:
    """(encoded image, texts) of a sample of a source with instruction templates (see ``draw_instruction``)."""
    assert spec.templates is not None
    templates = spec.templates[task]
    if task == "vqa":
        vqa = unpack_vqa_sample(raw)
        question = QuestionProcessor(spec.text_processor.max_words)(vqa.question)
        if not question:
            raise SampleError("missing_question", f"{raw.get('__key__')}: question empty after cleaning")
        prompt = draw_instruction(templates, sample_key).replace("{}", question)
        image_bytes, target, image_id = vqa.image, vqa.answer, vqa.image_id
    else:
        image_bytes, text, image_id = unpack_sample(raw, rng)
        # A detailed description keeps its case and punctuation (MiniGPT-4 trains on it as written).
        target = spec.text_processor.clean(text) if task == "caption" else " ".join(text.split())
        if not target:
            raise SampleError("missing_caption", f"{raw.get('__key__')}: caption empty after cleaning")
        prompt = draw_instruction(templates, sample_key)
    return image_bytes, {"text_output": target, "image_id": image_id, "prompt": prompt, "task": task}


def _process_sample(
    spec: StreamSpec,
    raw: dict[str, Any],
    rng: random.Random,
    decode: bool,
    source_index: int = 0,
    sample_key: str = "",
) -> dict[str, Any]:
    """Raw sample -> {"image", "text_output", "image_id"}; raises SampleError with a reason.

    With instruction templates the sample also carries its "prompt" (the instruction,
    drawn by ``sample_key``) and "task" (its source's). Without ``decode`` the image is
    only validated and ``"image"`` is None.
    """
    if spec.templates is not None:
        task = spec.tasks[source_index] if spec.tasks else "caption"
        image_bytes, texts = _instruction_sample(spec, raw, rng, task, sample_key)
    else:
        image_bytes, caption, image_id = unpack_sample(raw, rng)
        text = spec.text_processor.clean(caption)
        if not text:
            raise SampleError("missing_caption", f"{raw.get('__key__')}: caption empty after cleaning")
        texts = {"text_output": text, "image_id": image_id}
    if not decode:
        check_decodable(image_bytes)
        return {"image": None, **texts}
    try:
        image = spec.image_processor(image_bytes, rng)
    except SampleError as err:
        if spec.image_rows is None:  # no other rank validates this batch's images instead
            raise
        check_decodable(image_bytes)  # fails too: every rank skips the sample alike
        raise RuntimeError(
            f"{raw.get('__key__')}: the image passes the 1/8-scale validation but fails to decode "
            f"in full ({err}); the ranks that only validate it would keep it. Remove the sample "
            "from the data or set model.tp_split_images=false"
        ) from err
    return {"image": image, **texts}


def collate_train(
    samples: list[dict[str, Any]], prompt: str, image_rows: Sequence[int] | None = None
) -> dict[str, Any]:
    """Stack processed samples into the train batch layout.

    ``text_input`` is prompt + caption (what the LLM models read, as LAVIS's caption
    processor builds it); with a prompt the batch also carries ``prompt`` and
    ``text_output`` (the caption alone) so the model can mask the prompt tokens.
    Samples that carry their own "prompt" (instruction templates) give per-sample
    ``prompt`` and ``text_output`` lists, ``text_input`` = instruction, a space, target,
    and ``task`` (each sample's source task). ``sample_key`` lists each sample's position
    in the data. ``image`` stacks the images of ``image_rows`` (default: every row; none
    gives an empty tensor).
    """
    captions = [sample["text_output"] for sample in samples]
    rows = range(len(samples)) if image_rows is None else image_rows
    images = [samples[row]["image"] for row in rows]
    per_sample = bool(samples) and "prompt" in samples[0]
    if per_sample:
        prompts = [sample["prompt"] for sample in samples]
        texts = [f"{p} {c}" if p and not p.endswith(" ") else p + c for p, c in zip(prompts, captions)]
    else:
        prompts, texts = [prompt] * len(samples), [prompt + caption for caption in captions]
    batch: dict[str, Any] = {
        "image": torch.stack(images) if images else torch.empty(0),
        "text_input": texts,
        "image_id": [sample["image_id"] for sample in samples],
        SAMPLE_KEY: [sample[SAMPLE_KEY] for sample in samples],
    }
    if prompt or per_sample:
        batch["prompt"] = prompts
        batch["text_output"] = captions
    if per_sample:
        batch["task"] = [sample["task"] for sample in samples]
    return batch


def batch_source(seed: int, epoch: int, batch_index: int, weights: Sequence[float]) -> int:
    """mix_mode="batch": the source of batch ``batch_index`` of the epoch (the same on every DP rank)."""
    (chosen,) = make_rng(seed, epoch, "batch_source", batch_index).choices(
        range(len(weights)), weights=weights
    )
    return chosen


def _batch_feeds(
    spec: StreamSpec, per_source: list[Iterator[dict[str, Any]]], epoch: int, stream_id: int, key: tuple
) -> Iterator[Iterator[dict[str, Any]]]:
    """For each batch of one stream, in order: the raw samples it is filled from."""
    if spec.mix_mode == "batch" and len(per_source) > 1:
        for k in itertools.count():  # the stream's k-th batch is batch stream_id + k * S of the epoch
            yield per_source[batch_source(spec.seed, epoch, stream_id + k * spec.num_streams, spec.weights)]
    else:
        mixed = mix_sources(per_source, spec.weights, make_rng(*key, "mix"))
        while True:
            yield mixed


def _tagged(source_index: int, samples: Iterator[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Raw samples paired with the index of the source they come from (it picks their task)."""
    for raw in samples:
        yield source_index, raw


def stream_batches(
    spec: StreamSpec, epoch: int, stream_id: int, skip: int, count: int
) -> Iterator[dict[str, Any]]:
    """Batches ``skip .. skip+count-1`` of one stream of one epoch (see the module docstring)."""
    if count <= 0:
        return
    skips = SkipCounter()
    key = (spec.seed, epoch, spec.dp_rank, stream_id)
    per_source = [
        _tagged(index, _source_samples(spec, index, epoch, stream_id, skips))
        for index in range(len(spec.sources))
    ]
    index = 0  # samples drawn by this stream so far (usable or not): the last part of each sample's key
    usable_seen = False
    decoded_rows = set(range(spec.batch_size) if spec.image_rows is None else spec.image_rows)
    for batches_done, feed in enumerate(_batch_feeds(spec, per_source, epoch, stream_id, key)):
        replaying = batches_done < skip
        pending: list[dict[str, Any]] = []
        while len(pending) < spec.batch_size:
            source_index, raw = next(feed)
            sample_key = "/".join(str(part) for part in (*key, index))
            decode = not replaying and len(pending) in decoded_rows
            try:
                item = _process_sample(
                    spec, raw, make_rng(*key, "sample", index), decode, source_index, sample_key
                )
            except SampleError as err:
                skips.record(err.reason, str(err))
                if not usable_seen and index + 1 >= _MAX_LEADING_FAILURES:
                    raise RuntimeError(
                        f"the first {index + 1} samples of stream {stream_id} (DP rank {spec.dp_rank}) were "
                        f"all unusable ({skips.take()}); check the shards' image / caption files"
                    ) from None
                continue
            finally:
                index += 1
            usable_seen = True
            pending.append({**item, SAMPLE_KEY: sample_key})
        if replaying:
            skips.take()  # counted before the checkpoint already (restored with the state)
        else:
            batch = collate_train(pending, spec.text_processor.prompt, spec.image_rows)
            if spec.batch_builder is not None:
                batch = spec.batch_builder(batch)  # tokenized here, in the loader's workers
            batch[SKIPPED_KEY] = skips.take()
            yield batch
        if batches_done + 1 == skip + count:
            return


class TrainStream(IterableDataset):
    """The IterableDataset a DataLoader runs: this worker's stream from (epoch, start position)."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec
        self.epoch = 0
        self.start = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.spec.num_streams:
            raise RuntimeError(f"stream built for {self.spec.num_streams} workers runs with {num_workers}")
        stream_id = (self.start + worker_id) % num_workers
        total = len(range(stream_id, self.spec.batches_per_epoch, num_workers))
        already = len(range(stream_id, self.start, num_workers))
        return stream_batches(self.spec, self.epoch, stream_id, skip=already, count=total - already)


class TrainLoader:
    """Per-DP-rank training batches: a fixed count per epoch, skip stats, resumable state.

    ``for batch in loader`` runs the rest of the current epoch (then the epoch counter
    advances); ``loader.endless()`` chains epochs for step-based loops. A batch is
    ``{"image": FloatTensor[B, 3, S, S], "text_input": list[str], "image_id": list,
    "sample_key": list[str]}`` (+ ``"prompt"``, ``"text_output"`` when a prompt is
    configured; per-sample ``"prompt"``, ``"text_output"`` and ``"task"`` with instruction
    templates), or the batch builder's tensors when the loader has one.
    """

    def __init__(self, stream: TrainStream, num_workers: int):
        self._stream = stream
        self._num_workers = num_workers
        self.epoch = 0
        self.position = 0
        self._skipped: Counter[str] = Counter()

    @property
    def batches_per_epoch(self) -> int:
        """Batches every DP rank yields per epoch."""
        return self._stream.spec.batches_per_epoch

    @property
    def num_sources(self) -> int:
        """Data sources mixed (shard patterns, or the annotation file)."""
        return len(self._stream.spec.sources)

    @property
    def stats(self) -> dict[str, int]:
        """Skipped samples by reason (e.g. ``{"truncated_image": 2, "missing_caption": 1}``), all workers."""
        return dict(self._skipped)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        self._stream.epoch, self._stream.start = self.epoch, self.position
        if self._num_workers == 0:
            batches: Any = iter(self._stream)
        else:
            # A private generator: without it DataLoader draws its worker seed from the global
            # RNG, so a resumed run (whose loader starts later) would shift the dropout stream.
            generator = torch.Generator().manual_seed(self._stream.spec.seed * 1000 + self.epoch)
            batches = DataLoader(
                self._stream,
                batch_size=None,
                num_workers=self._num_workers,
                persistent_workers=False,  # workers must be re-forked with each epoch's start position
                generator=generator,
                # Page-locked batches let the copy to the device run without blocking the host.
                pin_memory=not accelerator.is_cpu(),
            )
        for batch in batches:
            self._skipped.update(batch.pop(SKIPPED_KEY))
            # Advance before yielding: a state_dict() taken while the caller holds this
            # batch must say it is consumed.
            self.position += 1
            if self.position == self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            yield batch

    def endless(self) -> Iterator[dict[str, Any]]:
        """Batches forever, epoch after epoch (for step-based training loops)."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from; plain Python values (JSON-friendly)."""
        spec = self._stream.spec
        return {
            "epoch": self.epoch,
            "position": self.position,
            "stats": self.stats,
            "seed": spec.seed,
            "dp_size": spec.dp_size,
            "batch_size": spec.batch_size,
            "num_workers": self._num_workers,
            "batches_per_epoch": spec.batches_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; see the module docstring for when batches match exactly."""
        spec = self._stream.spec
        current = {
            "seed": spec.seed,
            "dp_size": spec.dp_size,
            "batch_size": spec.batch_size,
            "num_workers": self._num_workers,
            "batches_per_epoch": spec.batches_per_epoch,
        }
        changed = {
            name: (state.get(name), value) for name, value in current.items() if state.get(name) != value
        }
        if changed:
            logger.warning(
                "data loader resumes with changed settings %s (saved, now): batches differ from an "
                "uninterrupted run",
                changed,
            )
        self.epoch = int(state["epoch"])
        self.position = min(int(state["position"]), self.batches_per_epoch)
        self._skipped = Counter(state.get("stats", {}))


# ----------------------------------------------------------------------------- building


def prepare_data(cfg: DataConfig) -> DataConfig:
    """Resolve kind="sample": use the sample dataset at sample_root, building it first if absent.

    A dataset already there is used whatever its size (``make_sample_dataset.py`` can
    build a bigger one); otherwise one with the default parameters is generated. Fields
    the user set explicitly are kept. Without train_shards, each entry of
    data.source_tasks picks the built-in source of its task (caption: the train shards,
    vqa: the VQA training shards, conversation: the detailed descriptions). Other kinds
    are returned unchanged.
    """
    if cfg.kind != "sample":
        return cfg
    root = Path(cfg.sample_root)
    paths = load_sample_dataset(root) if (root / "manifest.json").is_file() else ensure_sample_dataset(root)
    builtin_sources = {
        "caption": paths.train_shards,
        "vqa": paths.vqa_train_shards,
        "conversation": paths.conversation_shards,
    }
    filled = {
        "train_shards": cfg.train_shards or [builtin_sources[task] for task in cfg.tasks],
        "image_root": cfg.image_root or str(paths.image_root),
        "val_annotation": cfg.val_annotation or str(paths.val_annotation),
        "test_annotation": cfg.test_annotation or str(paths.test_annotation),
        "val_gt": cfg.val_gt or str(paths.val_gt),
        "test_gt": cfg.test_gt or str(paths.test_gt),
    }
    if not cfg.vqa_questions:
        filled.update(
            vqa_questions=str(paths.vqa_questions),
            vqa_annotations=str(paths.vqa_annotations),
            vqa_image_template=paths.vqa_image_template,
        )
    return dataclasses.replace(cfg, **filled)


def image_resolver(cfg: DataConfig) -> ImagePathResolver:
    """Where annotation image paths point: image_root (cc_sbu_align default: <annotation dir>/image)."""
    root = cfg.image_root
    if not root and cfg.kind == "cc_sbu_align":
        root = str(Path(cfg.train_annotation).parent / "image")
    return ImagePathResolver(root or ".", cfg.image_subdirs)


def build_train_sources(cfg: DataConfig) -> list[DataSource]:
    """One source per shard pattern (kind wds / sample), or the annotation file."""
    if cfg.kind in ANNOTATION_KINDS:
        records = load_caption_records(cfg.train_annotation, cfg.kind)
        return [AnnotationSource(records, image_resolver(cfg), name=cfg.train_annotation)]
    sources: list[DataSource] = []
    for pattern in cfg.train_shards:
        urls = expand_shard_patterns(pattern)
        check_shards_exist(urls)
        sources.append(ShardSource(urls, name=pattern))
    return sources


def source_weights(cfg: DataConfig, sources: Sequence[DataSource]) -> list[float]:
    """Mixing weight of each source: data.mix_weights, equal, or "sqrt" of each source's counted samples.

    The counts are those ``samples_per_epoch`` is summed from (img2dataset ``_stats.json``
    or tar listings), so "sqrt" reads them even when samples_per_epoch is set.
    """
    if cfg.mix_weights is None:
        return [1.0] * len(sources)
    if cfg.mix_weights != SQRT_MIX:
        return [float(weight) for weight in cfg.mix_weights]
    sizes = [source.num_samples for source in sources]
    empty = [source.name for source, size in zip(sources, sizes) if size == 0]
    if empty:
        raise ValueError(f"data.mix_weights='sqrt' weighs sources by their size, but {empty} hold no sample")
    weights = [math.sqrt(size) for size in sizes]
    total = sum(weights)
    logger.info(
        "data.mix_weights=sqrt: %s",
        "; ".join(
            f"{source.name} ({task}): {size} samples -> weight {weight:.1f} ({weight / total:.1%})"
            for source, task, size, weight in zip(sources, cfg.tasks, sizes, weights)
        ),
    )
    return weights


def build_train_image_processor(cfg: DataConfig) -> ImageTrainProcessor | ImageEvalProcessor:
    """BLIP-2 train transform, or the eval resize when augmentation is off (draft decode either way)."""
    if cfg.train_augment:
        return ImageTrainProcessor(cfg.image_size, min_scale=cfg.min_crop_scale)
    return ImageEvalProcessor(cfg.image_size, use_draft=True)


def build_train_loader(
    cfg: DataConfig,
    dp_rank: int,
    dp_size: int,
    seed: int,
    batch_builder: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    image_rows: Sequence[int] | None = None,
) -> TrainLoader:
    """The training loader of one DP rank; every TP / PP rank of that DP rank passes the same arguments.

    ``batch_builder`` (``blip2_megatron.data.batch``) turns each collated batch into model
    tensors inside the loader's workers; without it batches carry the raw texts.
    ``image_rows``: the rows of each batch whose images this rank encodes (default: all;
    see "Ranks that share a DP rank's batches but not its images" above); the batches are
    the same whatever it is, except for which images they hold.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if image_rows is not None and not all(0 <= row < cfg.batch_size for row in image_rows):
        raise ValueError(f"image_rows={list(image_rows)} must be rows of a batch of {cfg.batch_size}")
    cfg = prepare_data(cfg)
    sources = build_train_sources(cfg)
    templates = (
        load_instruction_templates(cfg.instruction_templates, cfg.tasks)
        if cfg.instruction_templates
        else None
    )
    num_streams = max(1, cfg.num_workers)
    if not cfg.resampled:
        for source in sources:
            if len(source.units) < dp_size * num_streams:
                raise ValueError(
                    f"{source.name!r} has {len(source.units)} shard(s) but dp_size x workers = {dp_size} x "
                    f"{num_streams} readers need at least one each; write smaller shards, use fewer "
                    "workers, or set data.resampled=true"
                )
    samples_per_epoch = cfg.samples_per_epoch or sum(source.num_samples for source in sources)
    batches_per_epoch = samples_per_epoch // (dp_size * cfg.batch_size)
    if batches_per_epoch < 1:
        raise ValueError(
            f"{samples_per_epoch} samples per epoch give no batch of {cfg.batch_size} on each of {dp_size} DP ranks"
        )
    spec = StreamSpec(
        sources=sources,
        weights=source_weights(cfg, sources),
        mix_mode=cfg.mix_mode,
        resampled=cfg.resampled,
        seed=seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_streams=num_streams,
        batch_size=cfg.batch_size,
        batches_per_epoch=batches_per_epoch,
        shuffle_buffer=cfg.shuffle_buffer,
        image_processor=build_train_image_processor(cfg),
        text_processor=CaptionProcessor(cfg.prompt, cfg.max_words),
        batch_builder=batch_builder,
        image_rows=None if image_rows is None else tuple(image_rows),
        tasks=tuple(cfg.tasks),
        templates=templates,
    )
    logger.info(
        "train data: %d source(s) mixed per %s, %d samples/epoch, %d batches/epoch of %d per DP rank "
        "(rank %d of %d)",
        len(sources),
        cfg.mix_mode,
        samples_per_epoch,
        batches_per_epoch,
        cfg.batch_size,
        dp_rank,
        dp_size,
    )
    if image_rows is not None:
        logger.info(
            "this rank decodes the images of rows %s of each batch and only validates the others",
            list(image_rows),
        )
    return TrainLoader(TrainStream(spec), cfg.num_workers)


# ----------------------------------------------------------------------------- evaluation

EVAL_TASKS = ("caption", "vqa")


def build_eval_dataset(cfg: DataConfig, split: str = "val", task: str = "caption") -> Dataset:
    """Evaluation dataset: captions (``CaptionEvalDataset``) or VQAv2 (``VQADataset``).

    Images get the eval transform (bicubic resize to image_size, exact PIL). ``split``
    picks val_annotation or test_annotation for captions; VQA reads vqa_questions /
    vqa_annotations. Missing images are dropped up front and counted in ``dataset.skipped``.
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"task={task!r}; choose one of {EVAL_TASKS}")
    image_processor = ImageEvalProcessor(cfg.image_size)
    if task == "vqa":
        if not cfg.vqa_questions:
            cfg = prepare_data(cfg)  # the built-in data has VQA questions too
        if not cfg.vqa_questions:
            raise ValueError("data.vqa_questions is required for VQA evaluation")
        records = load_vqa_records(cfg.vqa_questions, cfg.vqa_annotations or None, cfg.vqa_image_template)
        return VQADataset(records, image_resolver(cfg), image_processor, QuestionProcessor(cfg.max_words))
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r}; choose 'val' or 'test'")
    cfg = prepare_data(cfg)
    annotation = cfg.val_annotation if split == "val" else cfg.test_annotation
    if not annotation:
        raise ValueError(f"data.{split}_annotation is required for caption evaluation")
    records = load_caption_records(annotation, "coco")
    text_processor = CaptionProcessor(max_words=cfg.max_words)
    return CaptionEvalDataset(records, image_resolver(cfg), image_processor, text_processor)


def caption_ground_truth(cfg: DataConfig, split: str = "val") -> str:
    """Path of the COCO-format caption ground truth of a split ("" when not configured)."""
    cfg = prepare_data(cfg)
    return cfg.val_gt if split == "val" else cfg.test_gt


def collate_drop_none(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack "image" tensors and list every other field, dropping None items.

    The number dropped travels under "num_dropped" (read by :class:`EvalLoader`).
    """
    kept = [item for item in items if item is not None]
    batch: dict[str, Any] = {"num_dropped": len(items) - len(kept)}
    if kept:
        for name in kept[0]:
            values = [item[name] for item in kept]
            batch[name] = torch.stack(values) if name == "image" else values
    return batch


class EvalLoader:
    """Batches of an eval dataset; items that failed to load are dropped and counted in ``stats``."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int = 0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        # Counted when the dataset was built (seen through a Subset, e.g. a DP slice);
        # load-time failures are counted from the batches, since the dataset's own
        # counter lives in whichever worker process loaded the item.
        built = dataset.dataset if isinstance(dataset, Subset) else dataset
        self._skipped: Counter[str] = Counter(getattr(built, "skipped", {}))

    @property
    def stats(self) -> dict[str, int]:
        """Missing images found when the dataset was built plus images that failed to load."""
        return dict(self._skipped)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_drop_none,
            pin_memory=not accelerator.is_cpu(),
        )
        for batch in loader:
            dropped = batch.pop("num_dropped")
            if dropped:
                self._skipped["unreadable_image"] += dropped
            if "image" in batch:
                yield batch
