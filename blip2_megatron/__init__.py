"""blip2-megatron: BLIP-2-family training with tensor/pipeline-parallel LLMs and DeepSpeed ZeRO.

The public face (what the README shows)::

    from blip2_megatron import load_model_and_preprocess
    model, image_processors, text_processors = load_model_and_preprocess("/models/blip2-opt-2.7b")

The names below are imported on first use, so ``import blip2_megatron.config`` (a config
check, a data tool) does not pay for torch.distributed, megatron-core and transformers.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
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


class _LeanMegatronImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import megatron-core without the two parts of its import that we never use.

    Importing ``megatron.core`` costs ~11 CPU-seconds, more than half of it in two places:
    its JIT fuser decorates fused kernels with ``torch.compile`` at import, which loads
    torch._dynamo and torch._inductor (~3 s), and its inference context imports wandb (~1.5 s,
    installed here for img2dataset). We use megatron-core's tensor-parallel layers and process
    groups only, never its fused kernels nor its inference logging, and every process of every
    job pays the import, so while the package itself runs this finder makes ``torch.compile``
    return the function undecorated and ``import wandb`` fail (which megatron-core handles).
    Both are restored afterwards: later code compiles and imports wandb as usual.
    """

    def __init__(self) -> None:
        self._loader: importlib.abc.Loader | None = None

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "megatron.core":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        import torch

        compile_, torch.compile = torch.compile, _leave_uncompiled
        block_wandb = "wandb" not in sys.modules
        if block_wandb:
            sys.modules["wandb"] = None  # type: ignore[assignment]  # makes `import wandb` raise ImportError
        try:
            self._loader.exec_module(module)
            sys.modules["megatron.core.jit"].disable_jit_fuser()
        finally:
            torch.compile = compile_
            if block_wandb and sys.modules.get("wandb", 0) is None:
                del sys.modules["wandb"]


def _leave_uncompiled(model: Any = None, **_options: Any) -> Any:
    """``torch.compile``'s signature, giving back what it is given (a decorator when called bare)."""
    return model if model is not None else (lambda fn: fn)


_map_cuda_to_npu_first()
if "megatron.core" not in sys.modules:
    sys.meta_path.insert(0, _LeanMegatronImport())

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
