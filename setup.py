"""Install blip2-megatron: `pip install -c constraints.txt -e .`."""

from pathlib import Path

from setuptools import find_packages, setup

# torch is capped at the build we test with: an open range would pull a newer CUDA build.
REQUIREMENTS = [
    "torch>=2.4,<=2.13.0",
    "deepspeed>=0.16,<0.20",
    "megatron-core>=0.12,<0.17",
    "transformers>=4.45",
    "safetensors>=0.4",
    "webdataset>=0.2.86,<0.3",
    "img2dataset>=1.45",
    "pycocoevalcap>=1.2",
    "pycocotools>=2.0",
    "pillow>=10",
    "numpy>=1.24",
    "pyyaml>=6",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "tokenizers>=0.19",
    # InternLM2's tokenizer.model is read without its remote code (data/tokenizers.py).
    "sentencepiece>=0.2",
    "protobuf>=4.21",
    # llm.quantize (int8 / nf4 frozen LLMs); its wheels carry CPU and CUDA kernels, torch is not pulled.
    "bitsandbytes>=0.48,<0.51",
    # How much memory CPU generation may use for packed LLM weights (models/cpu_linear.py).
    "psutil>=5.9",
]

setup(
    name="blip2-megatron",
    version="0.1.0",
    description="BLIP-2 family training with tensor/pipeline-parallel LLMs (megatron-core) and DeepSpeed ZeRO",
    long_description=Path(__file__).with_name("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["blip2_megatron", "blip2_megatron.*"]),
    package_data={"blip2_megatron": ["configs/*.yaml", "configs/prompts/*.txt", "configs/prompts/*.json"]},
    python_requires=">=3.10",
    install_requires=REQUIREMENTS,
    extras_require={
        # selenium drives the web chat demo's browser test (tests/test_chat.py).
        # accelerate: transformers loads its bitsandbytes reference models with it (tests/test_quantize.py).
        "dev": ["pytest>=8", "pytest-xdist>=3.6", "ruff>=0.5", "selenium>=4.20", "accelerate>=1.1"],
        "apex": ["apex"],
        # The web chat demo (launch/chat.py --web): gradio 6 (theme at launch, message-format chat).
        "demo": ["gradio>=6.0,<7"],
        # Experiment tracking (train.monitors): TensorBoard event files, W&B (offline or online).
        "tracking": ["tensorboard>=2.14", "wandb>=0.16"],
    },
)
