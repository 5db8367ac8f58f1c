"""Typed configs: model (flavours), data, training, evaluation and whole jobs.

* :mod:`.base`: the dataclass machinery (dict / YAML in, dotted overrides, errors naming
  the key);
* :mod:`.model`: :class:`Blip2Config` and its parts, the named :data:`FLAVOURS`;
* :mod:`.data`: :class:`DataConfig`;
* :mod:`.job`: :class:`TrainConfig`, :class:`EvalConfig`, :class:`JobConfig` and the
  shipped job YAMLs.
"""

from blip2_megatron.config.base import (
    ConfigError,
    check_choice,
    check_positive,
    from_dict,
    load_yaml,
    merge_dicts,
    parse_overrides,
    to_dict,
)
from blip2_megatron.config.data import ANNOTATION_KINDS, DATASET_KINDS, DataConfig
from blip2_megatron.config.job import (
    DEFAULT_JOB,
    EvalConfig,
    JobConfig,
    TrainConfig,
    job_config_from_dict,
    job_config_to_dict,
    load_job_config,
    save_job_config,
    shipped_job_names,
)
from blip2_megatron.config.model import (
    DTYPES,
    FLAVOURS,
    Blip2Config,
    LLMConfig,
    QFormerConfig,
    VisionConfig,
    build_model_config,
    flavour_dict,
)

__all__ = [
    "ANNOTATION_KINDS",
    "DATASET_KINDS",
    "DEFAULT_JOB",
    "DTYPES",
    "FLAVOURS",
    "Blip2Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "JobConfig",
    "LLMConfig",
    "QFormerConfig",
    "TrainConfig",
    "VisionConfig",
    "build_model_config",
    "check_choice",
    "check_positive",
    "flavour_dict",
    "from_dict",
    "job_config_from_dict",
    "job_config_to_dict",
    "load_job_config",
    "load_yaml",
    "merge_dicts",
    "parse_overrides",
    "save_job_config",
    "shipped_job_names",
    "to_dict",
]
