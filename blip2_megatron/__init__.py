"""blip2-megatron: BLIP-2-family training with tensor/pipeline-parallel LLMs and DeepSpeed ZeRO.

The public face (what the README shows)::

    from blip2_megatron import load_model_and_preprocess
    model, image_processors, text_processors = load_model_and_preprocess("/models/blip2-opt-2.7b")

The names below are imported on first use, so ``import blip2_megatron.config`` (a config
check, a data tool) does not pay for torch.distributed, megatron-core and transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any


def _map_cuda_to_npu_first() -> None:
    """On a machine with torch_npu, import it and its mapping of the CUDA API onto the NPU now.

    megatron-core binds some CUDA functions by name when it is imported (its RNG tracker), so
    the mapping must be in place before any module of this package imports megatron-core;
    the package root is the one place that runs before all of them. Skipped where
    ``DS_ACCELERATOR`` asks for another device, and free on machines without torch_npu.
    """
    if os.environ.get("DS_ACCELERATOR", "npu") != "npu" or importlib.util.find_spec("torch_npu") is None:
        return
    importlib.import_module("torch_npu")
    importlib.import_module("torch_npu.contrib.transfer_to_npu")


_map_cuda_to_npu_first()

_EXPORTS = {
    "load_model_and_preprocess": "blip2_megatron.api",
    "load_trained_model": "blip2_megatron.api",
    "export_to_hf": "blip2_megatron.api",
    "build_model": "blip2_megatron.build",
    "Blip2Predictor": "blip2_megatron.inference",
    "Blip2Config": "blip2_megatron.config",
    "JobConfig": "blip2_megatron.config",
    "FLAVOURS": "blip2_megatron.config",
    "build_model_config": "blip2_megatron.config",
    "load_job_config": "blip2_megatron.config",
}

__all__ = [
    "FLAVOURS",
    "Blip2Config",
    "Blip2Predictor",
    "JobConfig",
    "build_model",
    "build_model_config",
    "export_to_hf",
    "load_job_config",
    "load_model_and_preprocess",
    "load_trained_model",
]

if TYPE_CHECKING:
    from blip2_megatron.api import export_to_hf, load_model_and_preprocess, load_trained_model
    from blip2_megatron.build import build_model
    from blip2_megatron.config import FLAVOURS, Blip2Config, JobConfig, build_model_config, load_job_config
    from blip2_megatron.inference import Blip2Predictor


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blip2_megatron' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
