from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="deqir_fast",
    version="0.1.0",
    description="Diffusion restoration (DDIM, DDRM, DDNM) solved as one parallel "
                "fixed-point system (DeqIR), with serial reference samplers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["deqir_fast", "deqir_fast.*"]),
    package_data={"deqir_fast": ["assets/*", "assets/model/*"]},
    install_requires=["torch>=2.13", "numpy"],
    extras_require={
        "demo": ["diffusers", "safetensors", "scikit-image", "matplotlib", "tqdm", "pillow"],
        "deepinv": ["deepinv"],
    },
    entry_points={"console_scripts": ["deqir-fast = deqir_fast.cli:main"]},
)
