"""Installs the `megatron` package (editable installs: `pip install -e .`); dependencies are in
requirements.txt, installed by tools/install.sh in the order PyTorch and DeepSpeed need."""

from setuptools import find_packages, setup

setup(
    name="neox-framework",
    version="0.1.0",
    description="GPT-NeoX-style LLM pretraining: YAML configs, deepy.py, DeepSpeed",
    packages=find_packages(include=["megatron", "megatron.*"]),
    python_requires=">=3.10",
)
