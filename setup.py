from setuptools import find_packages, setup

setup(
    name="cm_triton",
    version="0.2.0",
    description="Compositional Muon (CM) for transformer attention, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # triton_aot: the ahead-of-time Triton compile harness the compile report and gate use
    packages=find_packages(include=["cm_triton", "cm_triton.*", "triton_aot"]),
    py_modules=["compositional_muon"],
    install_requires=["torch>=2.5,<2.14", "tqdm", "matplotlib"],  # the last two for the demo
    entry_points={"console_scripts": ["cm-triton-demo = cm_triton.demo:main"]},
    extras_require={
        "triton": ["triton>=3.1"],
        # numpy<2.4: Triton 3.6's interpreter (TRITON_INTERPRET=1, used by the kernel tests) calls
        # int() on size-1 arrays, which NumPy 2.4 turned into an error.
        # transformers and timm: tiny models of real families, built from configs (no download).
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3",  # the README's test command spreads the tests over the cores
            "hypothesis>=6",
            "ruff>=0.6",
            "numpy<2.4",
            "transformers>=5",
            "timm>=1",
            "peft>=0.13",  # LoRA fine-tuning through PEFT's wrappers (tests/test_peft.py)
        ],
    },
)
