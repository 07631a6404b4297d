from setuptools import find_packages, setup

# jax/flax/orbax minor versions are pinned: the NNX and Orbax APIs still move between minors.
JAX = "0.10.2"

setup(
    name="imitation_jax",
    version="0.1.0",
    description="Train and evaluate LLaMA-family imitation students with JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["imitation_jax", "imitation_jax.*"]),
    install_requires=[
        f"jax=={JAX}",
        "flax>=0.12.8,<0.13",
        "orbax-checkpoint>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "grain>=0.2.18,<0.3",
        # Prepared data: ArrayRecord files written/read by a tensorflow-datasets builder (no TensorFlow).
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "markdownify>=1.1",  # HTML turns of scraped ShareGPT dumps -> markdown
        "beautifulsoup4>=4.12",
        "sacrebleu>=2.4",  # the diversity figure (BLEU between user queries)
        "omegaconf>=2.3,<2.5",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "transformers>=5.24,<6",
        "safetensors>=0.5",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "pyyaml>=6",
        "matplotlib>=3.8",  # `plot`
        "fastapi>=0.115", "uvicorn>=0.30", "httpx>=0.27",  # `serve`
        "openai>=1.50",  # `collect`, `judge`
    ],
    extras_require={
        # torch is pinned: an unpinned torch would pull a multi-GB CUDA build.
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "lm-eval[hf]>=0.4.13,<0.5",
                "import-linter>=2.13,<3",  # the layer contract (.importlinter)
                "peft>=0.21,<1"],  # LoRA export tests: PEFT loads our adapters (with the pinned CPU torch)
        # lm-eval needs torch: pinned here too, so `.[eval]` alone never pulls a CUDA build.
        "eval": ["lm-eval[hf]>=0.4.13,<0.5", "torch==2.13.0"],
        "cpu": [f"jax[cpu]=={JAX}"],
        "gpu": [f"jax[cuda13]=={JAX}"],
        "tpu": [f"jax[tpu]=={JAX}"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["imitation-jax=imitation_jax.cli:main"]},
)
