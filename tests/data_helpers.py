"""Helpers for the data tests: realistic JPEGs, odd-mode images, tiny hand-made tar shards."""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import tarfile
import types
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

TOOLS_DIR = Path(__file__).resolve().parents[1] / "data_tools"


@functools.cache
def load_tool(name: str) -> types.ModuleType:
    """Import ``data_tools/<name>.py`` (a script folder, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"data_tools_{name}", TOOLS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image (the benchmark's generator: gradients, texture, noise)."""
    return load_tool("bench_loader").make_photo(width, height, seed)


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    """Encode a PIL image to bytes (``options`` go to ``Image.save``)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg_bytes(width: int = 24, height: int = 20, seed: int = 0, quality: int = 90) -> bytes:
    """A small photo-like JPEG."""
    return encode(make_photo(width, height, seed), "JPEG", quality=quality)


def truncated_jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A JPEG cut in the middle of its entropy-coded data (PIL: "image file is truncated")."""
    data = jpeg_bytes(width, height, seed)
    return data[: len(data) // 2]


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """Write a tar of (name, content) pairs exactly as given, for shards with deliberate defects."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def sample_members(key: str, image: bytes | None, caption: str | None, meta: dict | None = None):
    """Tar members of one img2dataset-style sample (any of the parts may be left out)."""
    members = []
    if image is not None:
        members.append((f"{key}.jpg", image))
    if caption is not None:
        members.append((f"{key}.txt", caption.encode("utf-8")))
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode("utf-8")))
    return members


def write_id_shards(
    folder: Path,
    num_shards: int,
    per_shard: int | Iterable[int],
    prefix: str = "s",
    image_size: int = 16,
) -> str:
    """Shards whose samples carry unique ids ``{prefix}{shard}-{index}`` in caption and json.

    ``per_shard`` may be one count or one per shard. Returns the brace pattern. Images
    are tiny JPEGs (a few distinct ones reused, to keep the tests fast).
    """
    counts = [per_shard] * num_shards if isinstance(per_shard, int) else list(per_shard)
    images = [jpeg_bytes(image_size, image_size, seed) for seed in range(4)]
    for shard, count in enumerate(counts):
        members = []
        for index in range(count):
            sample_id = f"{prefix}{shard}-{index}"
            meta = {"key": f"{shard:05d}{index:04d}", "image_id": sample_id}
            members += sample_members(
                f"{shard:05d}{index:04d}", images[index % 4], f"photo {sample_id}", meta
            )
        write_tar(folder / f"{shard:05d}.tar", members)
    return str(folder / f"{{00000..{num_shards - 1:05d}}}.tar")
