"""prefgrpo_jax: Pref-GRPO (pairwise-preference GRPO for flow models) in JAX/Flax."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
REQUIREMENTS = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="prefgrpo_jax",
    version="0.1.0",
    description="Pref-GRPO for FLUX-class flow models in JAX/Flax (TPU, GPU, CPU)",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["prefgrpo_jax", "prefgrpo_jax.*"]),
    # The toy world's pretrained pipeline and prompts ship inside the package.
    package_data={"prefgrpo_jax": ["toyworld/assets/*", "toyworld/assets/**/*"]},
    install_requires=REQUIREMENTS,
    extras_require={
        # torch 2.13.0 is pinned: that release resolves to a CPU build here, newer
        # or unpinned ones pull a multi-GB CUDA build.
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "scipy>=1.13",
            "torch==2.13.0",
            "diffusers>=0.40",
            "transformers>=5.0",
            "sentencepiece>=0.2",
            # diffusers' load_lora_weights needs it (the LoRA export parity test).
            "peft==0.21.2",
            # tests/test_toyworld_study.py runs the study end to end, plots included.
            "matplotlib>=3.8",
        ],
        # Plots of the toy-world study (experiments/toyworld/study.py).
        "experiments": ["matplotlib>=3.8"],
        "cuda12": ["jax[cuda12]>=0.10"],
        "tpu": ["jax[tpu]>=0.10"],
    },
)
