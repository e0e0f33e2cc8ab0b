from setuptools import find_packages, setup

setup(
    name="cm_triton",
    version="0.1.0",
    description="Compositional Muon (CM) for transformer attention, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["cm_triton", "cm_triton.*"]),
    py_modules=["compositional_muon"],
    install_requires=["torch>=2.5,<2.14", "numpy"],
    extras_require={
        "triton": ["triton>=3.1"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "ruff>=0.6"],
    },
)
