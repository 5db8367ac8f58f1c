"""WebDataset shards: listing, reading, per-epoch order, mixing, writing and checking.

The streaming side is a chain of small stages; ``loader.py`` strings them together:

    shard patterns --expand_shard_patterns--> shard urls
      --assign_units--> this (epoch, pass, DP rank, stream)'s shards, shuffled or resampled
      --iter_shard_samples--> raw samples {"__key__", "jpg", "txt", "json", ...} (webdataset)
      --shuffle_samples--> shuffle buffer (per source, drained at the end of each pass)
      --mix_sources--> one stream drawn from several sources by weight
      --unpack_sample--> (image bytes, caption, image_id), then decode / batch in loader.py
        (a VQA source: --unpack_vqa_sample--> image, question, most frequent answer, image_id)

All randomness comes from :func:`make_rng` keyed by (seed, epoch, ...), never from global
state, so a stream can be replayed exactly (resume) and two TP ranks of one DP rank see
identical data. Shards are written in img2dataset's layout (``{key}.jpg`` / ``.txt`` /
``.json`` plus ``NNNNN_stats.json``) by :class:`ShardWriter`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import braceexpand
import webdataset
from webdataset.gopen import Pipe
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from blip2_megatron.data.processors import SampleError, load_rgb

logger = logging.getLogger(__name__)

#: Extensions read as the image of a sample, in order of preference (img2dataset writes jpg).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: How many occurrences of each skip reason are logged at WARNING per process before going quiet.
_WARNINGS_PER_REASON = 5


# ----------------------------------------------------------------------------- shard lists


def expand_shard_patterns(patterns: str | Sequence[str]) -> list[str]:
    """Expand brace patterns (``/d/{00000..00012}.tar``) and ``::``-joined lists into shard urls."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for part in pattern.split("::"):
            part = part.strip()
            if part:
                urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise ValueError(f"shard pattern(s) {list(patterns)!r} name no shard")
    return urls


def is_remote(url: str) -> bool:
    """Whether a shard url is read through webdataset's gopen (http, s3, pipe:) rather than a file."""
    return "://" in url or url.startswith("pipe:")


def check_shards_exist(urls: Iterable[str]) -> None:
    """Raise FileNotFoundError naming the local shard files that do not exist."""
    missing = [url for url in urls if not is_remote(url) and not os.path.isfile(url)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} shard file(s) not found: {shown}")


#: The shard name's ``.tar`` in a path, URL or ``pipe:`` command: the end of a word, or before a query.
_TAR_SUFFIX = re.compile(r"\.tar(?=['\"]?(?:[\s?#]|$))")


def stats_path_for(url: str) -> str:
    """img2dataset's stats file beside a shard, addressed the way the shard is.

    ``/d/00012.tar`` -> ``/d/00012_stats.json``; ``http://h/d/00012.tar`` ->
    ``http://h/d/00012_stats.json``; ``pipe:aws s3 cp s3://b/00012.tar -`` -> ``pipe:aws s3 cp
    s3://b/00012_stats.json -`` (the last ``.tar`` name of a command is the shard's).
    """
    found = list(_TAR_SUFFIX.finditer(url))
    if not found:
        return url + "_stats.json"
    last = found[-1]
    return url[: last.start()] + "_stats.json" + url[last.end() :]


def read_remote_stats(url: str) -> dict[str, Any]:
    """The ``_stats.json`` of a remote shard, read through webdataset's gopen as the shard itself is.

    Raises ValueError naming the shard and the stats address when the file cannot be
    read or parsed (a missing remote shard usually shows up here first).
    """
    stats_url = stats_path_for(url)
    try:
        with webdataset.gopen(stats_url, "rb") as stream:
            text = stream.read()
        stats = json.loads(text)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot count the samples of remote shard {url}: its stats file {stats_url} could not be "
            f"read ({err}); is the shard there? (data.samples_per_epoch set skips counting, except "
            "under data.mix_weights=sqrt, which weighs sources by their counted samples)"
        ) from None
    if not isinstance(stats, dict) or "successes" not in stats:
        raise ValueError(f"{stats_url} has no 'successes' count: not an img2dataset stats file")
    return stats


def count_shard_samples(url: str) -> int:
    """Samples in one shard: from its ``_stats.json`` ("successes") or by listing the tar.

    A remote shard (http, ``pipe:``...) is counted from its stats file read over the
    same address (img2dataset writes one per shard); listing it would mean downloading it.
    """
    if is_remote(url):
        return int(read_remote_stats(url)["successes"])
    stats_path = stats_path_for(url)
    if os.path.isfile(stats_path):
        with open(stats_path) as handle:
            return int(json.load(handle)["successes"])
    keys = set()
    with tarfile.open(url) as tar:
        for member in tar:
            key, ext = base_plus_ext(member.name)
            if member.isreg() and key is not None and ext.lower() in IMAGE_EXTENSIONS:
                keys.add(key)
    return len(keys)


def count_samples(urls: Sequence[str]) -> int:
    """Total samples in a list of shards; raises ValueError when one cannot be counted."""
    remote = sum(is_remote(url) for url in urls)
    if remote:
        logger.info(
            "counting samples from %d remote _stats.json file(s) (data.samples_per_epoch skips it, "
            "except under data.mix_weights=sqrt)",
            remote,
        )
    return sum(count_shard_samples(url) for url in urls)


# ----------------------------------------------------------------------------- reading


def open_shard(url: str) -> BinaryIO:
    """Open a shard for streaming; a missing shard is a FileNotFoundError naming it.

    A remote shard is read through webdataset's gopen: a ``curl`` (http) or the ``pipe:``
    command. A missing one gives an empty stream and a failed command, which the tar
    reader would take for an empty or corrupt shard and skip; so the first bytes are
    awaited here, and a stream that ends at once from a failed command is reported as a
    missing shard, as a missing local file is.
    """
    if not is_remote(url):
        try:
            return open(url, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"shard not found: {url}") from None
    stream = webdataset.gopen(url, "rb")
    if isinstance(stream, Pipe) and not stream.stream.peek(1):
        status = stream.proc.wait()
        if status != 0:
            _close_quietly(stream)
            raise FileNotFoundError(
                f"shard not found: {url} (the reading command exited with status {status})"
            )
    return stream


def _close_quietly(stream: BinaryIO) -> None:
    """Close a shard stream whose command may have failed (or been cut off: a reader that stops early)."""
    with contextlib.suppress(OSError):
        stream.close()


class TruncatedShardError(OSError):
    """A tar shard ends without the end-of-archive blocks: it was cut short (copy or download)."""


def tar_is_complete(path: str) -> bool:
    """Whether a local tar ends with the two zero blocks every tar writer puts at the end.

    Python's streaming tar reader treats a file cut short as a normal end of archive, so
    this tail check is how a truncated shard is noticed at all.
    """
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as handle:
        handle.seek(size - 1024)
        return not any(handle.read(1024))


def iter_shard_samples(url: str, on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard, grouped by key with webdataset's tar iterators.

    ``on_error`` sees tar-level failures (a corrupt or truncated archive, duplicate
    files) and returns True to continue with what can still be read. A missing shard is
    not passed to it: it raises.
    """
    stream = open_shard(url)
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=on_error)
        yield from group_by_keys(files, handler=on_error)
    except BaseException:
        # Includes GeneratorExit: the reader stopped mid-shard, so a pipe's command dies of
        # the closed pipe, which is no fault of the shard.
        _close_quietly(stream)
        raise
    if not is_remote(url):
        stream.close()
        if not tar_is_complete(url):
            on_error(TruncatedShardError(f"{url} is truncated (no end-of-archive blocks)"))
        return
    try:
        stream.close()  # waits for the command: a download cut short fails here
    except OSError as err:
        on_error(TruncatedShardError(f"{url} could not be read to the end: {err}"))


class ShardSource:
    """Shards as a source of the streaming loader: one unit per shard, samples read on demand."""

    def __init__(self, urls: Sequence[str], name: str = ""):
        self.name = name or (urls[0] if len(urls) == 1 else f"{urls[0]} .. {urls[-1]}")
        self.units = list(urls)
        self._num_samples: int | None = None

    @property
    def num_samples(self) -> int:
        """Samples in all shards (counted once, from stats files or tar listings)."""
        if self._num_samples is None:
            self._num_samples = count_samples(self.units)
        return self._num_samples

    def read(self, url: str, on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard."""
        return iter_shard_samples(url, on_error)


class SkipCounter:
    """Counts skipped samples by reason; logs the first few of each reason.

    ``take()`` returns the counts since the previous call, which is how counts travel
    from DataLoader workers to the training process: attached to each batch.
    """

    def __init__(self) -> None:
        self._pending: Counter[str] = Counter()
        self._logged: Counter[str] = Counter()

    def record(self, reason: str, detail: str = "") -> None:
        """Count one skipped sample (or unreadable shard) under ``reason``."""
        self._pending[reason] += 1
        self._logged[reason] += 1
        if self._logged[reason] <= _WARNINGS_PER_REASON:
            suffix = (
                " (further ones are only counted)" if self._logged[reason] == _WARNINGS_PER_REASON else ""
            )
            logger.warning("skipping sample: %s: %s%s", reason, detail, suffix)

    def shard_error_handler(self, exn: Exception) -> bool:
        """webdataset handler: count a tar-level failure and continue, never sleeping."""
        self.record("truncated_shard" if isinstance(exn, TruncatedShardError) else "corrupt_shard", repr(exn))
        return True

    def take(self) -> dict[str, int]:
        """Counts recorded since the last call (and reset)."""
        pending, self._pending = dict(self._pending), Counter()
        return pending


# ----------------------------------------------------------------------------- epoch order


def make_rng(*key: object) -> random.Random:
    """A random generator determined by ``key`` (seed, epoch, rank, ...) alone.

    String seeds are hashed with SHA-512 by ``random.Random``, so the stream does not
    depend on PYTHONHASHSEED, on the process, or on any global random state.
    """
    return random.Random("/".join(str(part) for part in key))


def assign_units(
    num_units: int,
    *,
    resampled: bool,
    seed: int,
    epoch: int,
    pass_index: int,
    source_index: int,
    dp_rank: int,
    dp_size: int,
    stream_id: int,
    num_streams: int,
) -> list[int]:
    """Indices of the units (shards, or annotation entries) one stream reads in one pass.

    Without resampling, the permutation depends only on (seed, epoch, source, pass), so
    every DP rank computes the same one and takes a disjoint slice: ``[dp_rank::dp_size]``
    then ``[stream_id::num_streams]`` (stream = DataLoader worker). A stream that runs out
    before its epoch's batch count starts the next pass (a fresh permutation) instead of
    stopping, so all ranks yield the same number of batches. With resampling each stream
    draws its own units with replacement.
    """
    if resampled:
        rng = make_rng(seed, epoch, pass_index, "resample", source_index, dp_rank, stream_id)
        draws = max(1, num_units // (dp_size * num_streams))
        return [rng.randrange(num_units) for _ in range(draws)]
    order = list(range(num_units))
    make_rng(seed, epoch, pass_index, "shuffle", source_index).shuffle(order)
    return order[dp_rank::dp_size][stream_id::num_streams]


def mix_sources(
    streams: Sequence[Iterator[Any]], weights: Sequence[float], rng: random.Random
) -> Iterator[Any]:
    """Endless stream drawing each sample from source i with probability weights[i] / sum."""
    if len(streams) == 1:
        yield from streams[0]
        return
    indices = range(len(streams))
    while True:
        (chosen,) = rng.choices(indices, weights=weights)
        yield next(streams[chosen])


def shuffle_samples(samples: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's shuffle buffer with our generator; the first fifth is filled before yielding."""
    if buffer_size <= 1:
        return samples
    return webdataset.shuffle(buffer_size, max(1, buffer_size // 5), rng=rng)(samples)


# ----------------------------------------------------------------------------- sample fields


def _decode_metadata(raw: dict[str, Any]) -> dict[str, Any]:
    value = raw.get("json")
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    try:
        meta = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError("bad_json", f"{raw.get('__key__')}: {err}") from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", f"{raw.get('__key__')}: json is not an object")
    return meta


def _sample_image(raw: dict[str, Any]) -> bytes:
    """The encoded image of a raw sample; raises SampleError("missing_image") without one."""
    key = raw.get("__key__")
    if "__missing_image__" in raw:
        raise SampleError("missing_image", f"{key}: image file not found: {raw['__missing_image__']}")
    image = next((raw[ext] for ext in IMAGE_EXTENSIONS if raw.get(ext)), None)
    if image is None:
        raise SampleError("missing_image", f"{key}: no image file in sample ({sorted(raw)})")
    return image


def unpack_sample(raw: dict[str, Any], rng: random.Random) -> tuple[bytes, str, Any]:
    """(encoded image, raw caption, image_id) of a raw sample; raises SampleError with a reason.

    Caption: the json "caption" field when present, else the ``.txt`` file. When
    "caption" is a list (CapFilt-style), one of its first two entries is picked with
    ``rng`` as LAVIS does. image_id: json "image_id", else json "key" (img2dataset),
    else the tar key, kept as given (str or int).
    """
    key = raw.get("__key__")
    image = _sample_image(raw)
    meta = _decode_metadata(raw)
    caption = meta.get("caption")
    if isinstance(caption, list):
        caption = rng.choice(caption[:2]) if caption else None
    if caption is None and raw.get("txt") is not None:
        text = raw["txt"]
        try:
            caption = text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else str(text)
        except UnicodeDecodeError:
            raise SampleError("bad_caption", f"{key}: caption is not utf-8") from None
    if not isinstance(caption, str) or not caption.strip():
        raise SampleError("missing_caption", f"{key}: no caption")
    image_id = meta.get("image_id", meta.get("key", key))
    return image, caption, image_id


def vqa_target(answers: Sequence[str], weights: Sequence[float] | None = None) -> str:
    """The training target of a VQA question: its most frequent answer (ties: the first seen).

    ``weights`` (one per answer, e.g. VQAv2 annotator confidence) count instead of 1 each.
    A pure function of the list, so a resumed run trains on the same targets.
    """
    if not answers:
        raise ValueError("a VQA question needs at least one answer")
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    totals: dict[str, float] = {}  # insertion order = first seen, which max() keeps on ties
    for index, answer in enumerate(answers):
        totals[answer] = totals.get(answer, 0.0) + (1.0 if weights is None else float(weights[index]))
    return max(totals, key=totals.__getitem__)


@dataclass
class VQASample:
    """The fields of a VQA training sample (:func:`unpack_vqa_sample`)."""

    image: bytes
    question: str
    answer: str
    """The target: :func:`vqa_target` of the answers."""
    image_id: Any


def unpack_vqa_sample(raw: dict[str, Any]) -> VQASample:
    """A VQA sample: json "question" and "answers" (strings, or VQAv2's ``{"answer": ...}`` entries).

    Optional json "answer_weights" (one number per answer) weigh the vote for the target.
    Raises SampleError "missing_question" / "missing_answer" / "bad_json" with the key.
    """
    key = raw.get("__key__")
    image = _sample_image(raw)
    meta = _decode_metadata(raw)
    question = meta.get("question")
    if not isinstance(question, str) or not question.strip():
        raise SampleError("missing_question", f"{key}: no json 'question' (a VQA source needs one)")
    answers = meta.get("answers")
    if not isinstance(answers, list):
        raise SampleError("missing_answer", f"{key}: no json 'answers' list (a VQA source needs one)")
    texts = [entry.get("answer") if isinstance(entry, dict) else entry for entry in answers]
    weights = meta.get("answer_weights")
    if weights is not None and (not isinstance(weights, list) or len(weights) != len(texts)):
        raise SampleError("bad_json", f"{key}: 'answer_weights' must be a list of one number per answer")
    kept = [
        (text.strip(), index) for index, text in enumerate(texts) if isinstance(text, str) and text.strip()
    ]
    if not kept:
        raise SampleError("missing_answer", f"{key}: no non-empty answer")
    try:
        answer = vqa_target(
            [text for text, _ in kept], None if weights is None else [float(weights[i]) for _, i in kept]
        )
    except (TypeError, ValueError):
        raise SampleError("bad_json", f"{key}: 'answer_weights' must be numbers") from None
    image_id = meta.get("image_id", meta.get("key", key))
    return VQASample(image, question, answer, image_id)


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes samples as img2dataset does: ``NNNNN.tar`` + ``NNNNN_stats.json`` per shard.

    Each sample becomes ``{key}.{ext}`` (the encoded image, not re-encoded), ``{key}.txt``
    (caption) and ``{key}.json`` (metadata with "key", "caption", "status" and whatever
    the caller adds). Keys are the shard number followed by the index in the shard, as in
    img2dataset. Failures (a missing or unreadable image) take a key index too and are
    counted in the stats file (``failed_to_download`` / ``failed_to_resize``,
    ``status_dict``) so converters and img2dataset report the same way. A shard is
    written under a temporary name and renamed when complete.
    """

    def __init__(self, out_dir: str | Path, samples_per_shard: int = 10000, shard_digits: int = 5):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.shard_digits = shard_digits
        self.key_digits = max(1, math.ceil(math.log10(samples_per_shard)))
        self.shard_paths: list[Path] = []
        self._shard_id = -1
        self._index = samples_per_shard  # forces a new shard on the first sample
        self._file: BinaryIO | None = None
        self._tar: webdataset.TarWriter | None = None
        self._stats: dict[str, Any] = {}
        self._status: Counter[str] = Counter()

    def _next_key(self) -> str:
        if self._index >= self.samples_per_shard:
            self._finish_shard()
            self._start_shard()
        key = f"{self._shard_id:0{self.shard_digits}d}{self._index:0{self.key_digits}d}"
        self._index += 1
        self._stats["count"] += 1
        return key

    def _shard_stem(self) -> Path:
        return self.out_dir / f"{self._shard_id:0{self.shard_digits}d}"

    def _start_shard(self) -> None:
        self._shard_id += 1
        self._index = 0
        self._file = open(self._shard_stem().with_suffix(".tar.partial"), "wb")
        # mtime fixed at 0 so the same samples give byte-identical shards.
        self._tar = webdataset.TarWriter(self._file, encoder=False, mtime=0)
        self._stats = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
        self._stats["start_time"] = time.time()
        self._status = Counter()

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._file is not None
        self._file.close()
        self._tar = self._file = None
        stem = self._shard_stem()
        os.replace(stem.with_suffix(".tar.partial"), stem.with_suffix(".tar"))
        end_time = time.time()
        stats = dict(self._stats, end_time=end_time, duration=end_time - self._stats["start_time"])
        stats["status_dict"] = dict(self._status)
        Path(f"{stem}_stats.json").write_text(json.dumps(stats, indent=4))
        self.shard_paths.append(stem.with_suffix(".tar"))

    def write(
        self, image: bytes, caption: str, meta: dict[str, Any] | None = None, image_ext: str = "jpg"
    ) -> str:
        """Add one sample; returns its key."""
        key = self._next_key()
        record = {"key": key, "caption": caption, "status": "success", **(meta or {})}
        assert self._tar is not None
        self._tar.write(
            {
                "__key__": key,
                image_ext: image,
                "txt": caption.encode("utf-8"),
                "json": json.dumps(record, indent=4).encode("utf-8"),
            }
        )
        self._stats["successes"] += 1
        self._status["success"] += 1
        return key

    def record_failure(self, status: str, unreadable: bool = False) -> str:
        """Count a sample that could not be written: a missing file, or (``unreadable``) a bad image."""
        key = self._next_key()
        self._stats["failed_to_resize" if unreadable else "failed_to_download"] += 1
        self._status[status] += 1
        return key

    def close(self) -> list[Path]:
        """Finish the last shard; returns the paths of all shards written."""
        self._finish_shard()
        return self.shard_paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_stats_files(folder: str | Path) -> dict[str, Any]:
    """Sum img2dataset's ``*_stats.json`` in a folder: count, successes, failures, status_dict."""
    totals: dict[str, Any] = {
        "shards": 0,
        "count": 0,
        "successes": 0,
        "failed_to_download": 0,
        "failed_to_resize": 0,
    }
    status: Counter[str] = Counter()
    for path in sorted(Path(folder).glob("*_stats.json")):
        stats = json.loads(path.read_text())
        totals["shards"] += 1
        for name in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[name] += int(stats.get(name, 0))
        status.update(stats.get("status_dict", {}))
    totals["status_dict"] = dict(status)
    return totals


def describe_stats(totals: dict[str, Any], top: int = 5) -> str:
    """Human-readable lines for :func:`read_stats_files` totals (what the data tools print)."""
    count = max(1, totals["count"])
    lines = [
        f"shards: {totals['shards']}  samples tried: {totals['count']}",
        f"successes: {totals['successes']} ({100.0 * totals['successes'] / count:.1f}%)",
        f"failed_to_download: {totals['failed_to_download']}  failed_to_resize: {totals['failed_to_resize']}",
    ]
    failures = Counter({k: v for k, v in totals["status_dict"].items() if k != "success"})
    for status, number in failures.most_common(top):
        lines.append(f"  {number:>8}  {status}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checking


@dataclass
class ShardReport:
    """What :func:`inspect_shard` found in one shard."""

    url: str
    samples: int = 0
    """Samples whose image decoded and caption was present."""
    bad: list[tuple[str, str]] = field(default_factory=list)
    """(key, reason) of each unusable sample."""
    error: str | None = None
    """A structural problem: missing or unreadable tar (the shard could not be fully read)."""


def inspect_shard(url: str) -> ShardReport:
    """Read a whole shard, fully decode every image and check its caption."""
    report = ShardReport(url)

    def on_tar_error(exn: Exception) -> bool:
        report.error = f"unreadable tar: {exn!r}"
        return False  # stop reading this shard: what follows a tar error is unreliable

    try:
        for raw in iter_shard_samples(url, on_tar_error):
            key = raw.get("__key__", "?")
            try:
                image, _, _ = unpack_sample(raw, random.Random(0))
                load_rgb(image)
            except SampleError as err:
                report.bad.append((key, err.reason))
                continue
            report.samples += 1
    except FileNotFoundError as err:
        report.error = str(err)
    except (OSError, tarfile.TarError) as err:
        report.error = f"unreadable tar: {err!r}"
    return report
