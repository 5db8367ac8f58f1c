"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) through pycocoevalcap.

pycocoevalcap's own driver, ``COCOEvalCap``, wants two pycocotools ``COCO`` objects and
prints its progress. We build the same inputs ourselves (``{image_id: [{"caption": ...}]}``
for references and results), run the same PTB tokenizer and the same scorers, and get
the same numbers, with:

* string image ids such as ``"coco_123"`` (ids are matched by ``str(id)``);
* an exact-coverage check: every ground-truth image has exactly one result, errors name
  the missing / extra / duplicate ids (COCO's ``loadRes`` only asserts a subset);
* SPICE run only when its Stanford CoreNLP jars are on disk. pycocoevalcap would
  otherwise try to download them (offline machines fail there), so without them SPICE is
  skipped with one logged line and the other metrics are still reported; a job that
  needs SPICE (``eval.require_spice``) calls :func:`check_spice_available` first and stops
  with :class:`SpiceUnavailableError` instead. docs/launching.md ("SPICE") says where the
  jars go.

Distributed evaluation: every data-parallel rank captions its shard of the split, then
:func:`gather_results` collects the shards (dropping the samples a distributed sampler
repeats to even out the shards, and refusing any loss), and one rank scores.

pycocoevalcap and Java (its tokenizer, METEOR and SPICE are Java programs) are only
needed when :func:`score_captions` runs; importing this module needs neither. The PTB
tokenizer writes its temporary input file next to its jar, so the pycocoevalcap install
folder must be writable by the evaluating process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from blip2_megatron.eval.report import (
    canonical_id,
    check_ids_match,
    index_by_id,
    sortable_id,
)
from blip2_megatron.io import write_json_atomic

logger = logging.getLogger(__name__)

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

# SPICE parses captions with Stanford CoreNLP 3.6.0, which pycocoevalcap does not ship:
# its get_stanford_models() downloads these two jars into spice/lib on first use.
_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_SPICE_SETUP_HINT = (
    "copy stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar (from nlp.stanford.edu's "
    "stanford-corenlp-full-2015-12-09.zip, or Maven Central's edu.stanford.nlp:stanford-corenlp:3.6.0) "
    "into {lib_dir} (docs/launching.md, 'SPICE')"
)


class SpiceUnavailableError(RuntimeError):
    """SPICE was required (``eval.require_spice``, ``with_spice=True``) but cannot run; the message says why."""


# ----------------------------------------------------------------------------- SPICE


def _spice_dir() -> Path | None:
    """pycocoevalcap's ``spice`` folder (holding spice-1.0.jar and lib/), or None if not installed."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "spice"


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run on this machine, or None when its jar and CoreNLP models are present.

    Only looks at files: never downloads (pycocoevalcap's ``Spice()`` would).
    """
    spice_dir = _spice_dir()
    if spice_dir is None:
        return "pycocoevalcap is not installed"
    if not (spice_dir / "spice-1.0.jar").is_file():
        return f"{spice_dir / 'spice-1.0.jar'} is missing"
    lib_dir = spice_dir / "lib"
    missing = [jar for jar in _CORENLP_JARS if not (lib_dir / jar).is_file()]
    if missing:
        return f"Stanford CoreNLP is missing ({', '.join(missing)}); " + _SPICE_SETUP_HINT.format(
            lib_dir=lib_dir
        )
    return None


def check_spice_available() -> None:
    """Raise :class:`SpiceUnavailableError` (with the install hint) unless SPICE can run here.

    Looks at files only, so a job that requires SPICE can call it before generating
    captions rather than find out after.
    """
    reason = spice_unavailable_reason()
    if reason is not None:
        raise SpiceUnavailableError(
            f"SPICE is required (eval.require_spice=true / with_spice=True) but cannot run: {reason}"
        )


def _decide_spice(with_spice: bool | None) -> bool:
    """Whether to run SPICE: ``True`` demands it, ``False`` skips it, ``None`` runs it if possible."""
    if with_spice is False:
        return False
    if with_spice:
        check_spice_available()
        return True
    reason = spice_unavailable_reason()
    if reason is None:
        return True
    logger.warning("SPICE skipped: %s", reason)
    return False


# ----------------------------------------------------------------------------- inputs


def _single_line(text: str) -> str:
    """Join a caption's lines with spaces.

    The PTB tokenizer emits one output line per input line and pycocoevalcap pairs the
    lines back with image ids by position, so a caption holding a line break of any kind
    (``\\n`` but also ``\\r``, ``\\u2028``, ``\\x85``...) would shift every later caption onto
    the wrong image without an error.
    """
    return " ".join(text.splitlines())


def load_caption_references(
    coco_gt: str | os.PathLike[str] | Mapping[str, Any],
) -> dict[str, tuple[Any, list[str]]]:
    """Reference captions of a COCO-format caption file, by canonical image id.

    ``coco_gt`` is the path of (or the loaded) ``{"images": [{"id"}...], "annotations":
    [{"image_id", "caption"}...]}`` file, e.g. LAVIS's ``coco_karpathy_test_gt.json``.
    The images scored are those listed under ``"images"`` (all annotated images when
    the key is absent); each needs at least one caption.

    Returns ``{canonical_id: (original image id, [captions])}`` in file order.
    """
    if not isinstance(coco_gt, Mapping):
        with open(coco_gt, encoding="utf-8") as handle:
            coco_gt = json.load(handle)
    if "annotations" not in coco_gt:
        raise ValueError("caption ground truth has no 'annotations' list; expected a COCO caption file")

    references: dict[str, tuple[Any, list[str]]] = {}
    if "images" in coco_gt:
        for image in index_by_id(coco_gt["images"], "id", "caption ground-truth images").values():
            references[canonical_id(image["id"])] = (image["id"], [])
    for position, annotation in enumerate(coco_gt["annotations"]):
        if "image_id" not in annotation or not isinstance(annotation.get("caption"), str):
            raise ValueError(
                f"caption ground truth: annotation {position} lacks 'image_id' or a string 'caption'"
            )
        key = canonical_id(annotation["image_id"])
        if key not in references:
            if "images" in coco_gt:
                raise ValueError(
                    f"caption ground truth: annotation {position} refers to image_id "
                    f"{annotation['image_id']!r}, which is not listed under 'images'"
                )
            references[key] = (annotation["image_id"], [])
        references[key][1].append(_single_line(annotation["caption"]))

    without_captions = [image_id for image_id, captions in references.values() if not captions]
    if without_captions:
        raise ValueError(
            f"caption ground truth: {len(without_captions)} image(s) have no reference caption "
            f"(e.g. {without_captions[:5]!r})"
        )
    if not references:
        raise ValueError("caption ground truth holds no image: nothing to score")
    return references


# ----------------------------------------------------------------------------- scoring


def _tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """PTB-tokenize (lower-case, punctuation dropped) as COCOEvalCap does, checking the pairing."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize(
        {key: [{"caption": c} for c in texts] for key, texts in captions.items()}
    )
    for key, texts in captions.items():
        if len(tokenized.get(key, ())) != len(texts):
            raise RuntimeError(
                f"PTB tokenizer returned {len(tokenized.get(key, ()))} caption(s) for image {key!r} instead of "
                f"{len(texts)}: its output lines no longer line up with the input captions"
            )
    return tokenized


# --------------------------------------------------------------------------- METEOR


@functools.cache
def _meteor_server() -> Any:
    """pycocoevalcap's METEOR: a Java server process, started once per process.

    Starting it costs ~10 s (the JVM loading the paraphrase table) and a scoring ~0.01 s,
    so a training job that validates every few hundred steps keeps one server. It ends
    with the process: it exits when its stdin closes.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _meteor_score(references: dict[str, list[str]], candidates: dict[str, list[str]]) -> float:
    server = _meteor_server()
    try:
        return float(server.compute_score(references, candidates)[0])
    except BaseException:
        # A failed scoring leaves the server mid-answer and the scorer's lock held (its
        # __del__ would wait on that lock forever): stop it; the next scoring starts another.
        _meteor_server.cache_clear()
        server.meteor_p.kill()
        with contextlib.suppress(OSError):  # a broken pipe: it had died
            server.meteor_p.stdin.close()
        if server.lock.locked():
            server.lock.release()
        raise


def _run_scorers(
    references: dict[str, list[str]],
    candidates: dict[str, list[str]],
    with_spice: bool,
    spice_required: bool,
) -> dict[str, float]:
    """Run the pycocoevalcap scorers on tokenized captions; returns the corpus-level scores."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict[str, float] = {}
    started = time.perf_counter()
    # verbose=0: BleuScorer would otherwise print its n-gram statistics to stdout.
    bleu, _ = Bleu(4).compute_score(references, candidates, verbose=0)
    scores.update({f"Bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)})
    scores["METEOR"] = _meteor_score(references, candidates)
    scores["ROUGE_L"] = float(Rouge().compute_score(references, candidates)[0])
    scores["CIDEr"] = float(Cider().compute_score(references, candidates)[0])
    if with_spice:
        scores.update(_run_spice(references, candidates, required=spice_required))
    logger.debug("caption scorers took %.1f s", time.perf_counter() - started)
    return scores


def _run_spice(
    references: dict[str, list[str]], candidates: dict[str, list[str]], required: bool
) -> dict[str, float]:
    """SPICE, called only after :func:`spice_unavailable_reason` found its files (so no download)."""
    from pycocoevalcap.spice.spice import Spice

    try:
        return {"SPICE": float(Spice().compute_score(references, candidates)[0])}
    except (subprocess.CalledProcessError, OSError) as error:
        if required:
            raise SpiceUnavailableError(
                f"SPICE is required (eval.require_spice=true / with_spice=True) but the SPICE jar failed: {error}"
            ) from error
        # SPICE is a memory-hungry Java program (-Xmx8G) with native LMDB caching; when it
        # fails, the other metrics are still worth reporting.
        logger.warning("SPICE skipped: the SPICE jar failed (%s)", error)
        return {}


def score_captions(
    results: Sequence[Mapping[str, Any]],
    coco_gt_json: str | os.PathLike[str] | Mapping[str, Any],
    with_spice: bool | None = None,
) -> dict[str, float]:
    """Score generated captions against COCO-format references.

    Args:
        results: ``{"image_id", "caption"}`` records, exactly one per ground-truth image
            (missing, extra or duplicate ids raise a ValueError naming them). Image ids
            may be ints or strings such as ``"coco_123"``; ``123`` and ``"123"`` match.
        coco_gt_json: path of a COCO caption file, or its loaded dict (see
            :func:`load_caption_references`).
        with_spice: ``None`` (default) runs SPICE when its CoreNLP jars are installed and
            otherwise logs one "SPICE skipped" line; ``True`` (``eval.require_spice``)
            raises :class:`SpiceUnavailableError` if SPICE cannot run; ``False`` never runs
            it. SPICE is never downloaded.

    Returns:
        ``{"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}`` (+
        ``"SPICE"``) as fractions (BLEU-4 0.438, CIDEr 1.461 in LAVIS's table).
    """
    run_spice = _decide_spice(with_spice)
    references = load_caption_references(coco_gt_json)
    results_by_id = index_by_id(results, "image_id", "caption results")
    check_ids_match(references, results_by_id, "caption results", "image_id")
    for result in results_by_id.values():
        if not isinstance(result.get("caption"), str):
            raise ValueError(f"caption result for image_id {result['image_id']!r} has no string 'caption'")

    # Ground-truth order, so that the scores never depend on the order results arrive in.
    reference_captions = {key: captions for key, (_, captions) in references.items()}
    candidate_captions = {key: [_single_line(results_by_id[key]["caption"])] for key in references}
    source = "the given ground truth" if isinstance(coco_gt_json, Mapping) else str(coco_gt_json)
    logger.info("scoring %d captions against %s", len(candidate_captions), source)
    # One tokenizer run (one JVM start) for both sides.
    tokenized = _tokenize(
        {("ref", key): texts for key, texts in reference_captions.items()}
        | {("res", key): texts for key, texts in candidate_captions.items()}
    )
    scores = _run_scorers(
        {key: tokenized["ref", key] for key in reference_captions},
        {key: tokenized["res", key] for key in candidate_captions},
        run_spice,
        spice_required=bool(with_spice),
    )
    logger.info("caption metrics: %s", ", ".join(f"{name} {value:.4f}" for name, value in scores.items()))
    return scores


def caption_agg_metric(metrics: Mapping[str, float]) -> float:
    """CIDEr + BLEU-4: the number LAVIS keeps the best caption checkpoint by."""
    return float(metrics["CIDEr"]) + float(metrics["Bleu_4"])


# ----------------------------------------------------------------------------- results


def write_result_json(results: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write a result list (captions, answers...) as JSON, atomically; returns the path."""
    return write_json_atomic(list(results), path)


def gather_results(
    local_results: Sequence[Mapping[str, Any]],
    key: str = "image_id",
    *,
    expected_total: int | None,
    group: dist.ProcessGroup | None = None,
) -> list[Mapping[str, Any]]:
    """Collect every rank's results, drop repeated samples, and check that none is lost.

    Distributed samplers pad the last shard by repeating samples so that every rank runs
    the same number of steps; those repeats come back here as duplicate ``key`` values
    and are dropped (the first occurrence, in rank order, is kept).

    Args:
        local_results: this rank's result records.
        key: the record field that identifies a sample (``"image_id"``, ``"question_id"``).
        expected_total: the number of distinct samples of the split (``len(dataset)``);
            any other count after de-duplication raises, because a lost or foreign sample
            changes the metric silently. Pass ``None`` explicitly to skip the check.
        group: the process group to gather over: the data-parallel group (ranks that hold
            different samples; tensor-parallel peers hold the same ones and would only
            send duplicates). ``None``: the default (world) group.

    Returns:
        The same list on every rank, sorted by ``key`` (integers numerically), so that the
        result file does not depend on the world size. Without an initialised
        ``torch.distributed`` the local results are checked and returned (sorted) alone.
        With NCCL, the current CUDA device must be set (``all_gather_object`` needs it).
    """
    if dist.is_available() and dist.is_initialized():
        shards: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(shards, list(local_results), group=group)
        received = [record for shard in shards for record in shard]
    else:
        received = list(local_results)

    unique: dict[str, Mapping[str, Any]] = {}
    for position, record in enumerate(received):
        if key not in record:
            raise ValueError(f"result {position} has no {key!r}: {record!r}")
        unique.setdefault(canonical_id(record[key]), record)
    repeats = len(received) - len(unique)
    if repeats:
        logger.debug("gather_results: dropped %d repeated %s(s) (sampler padding)", repeats, key)
    if expected_total is not None and len(unique) != expected_total:
        raise RuntimeError(
            f"gather_results: {len(unique)} distinct {key}s after gathering {len(received)} results, "
            f"expected {expected_total}: samples were "
            f"{'lost' if len(unique) < expected_total else 'added'} on the way "
            "(check the sampler covers the whole split, and gather over the data-parallel group)"
        )
    return sorted(unique.values(), key=lambda record: sortable_id(record[key]))
