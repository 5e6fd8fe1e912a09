from setuptools import find_packages, setup

setup(
    name="diffkd",
    version="0.1.0",
    description="Diffusion-based knowledge distillation (DiffKD), faithful to the paper's code and fast "
                "thanks to Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["diffkd", "diffkd.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    # triton comes with PyTorch's Linux builds and is imported lazily, only for the Triton backend.
    install_requires=["torch>=2.4", "torchvision", "numpy", "timm", "pyyaml", "matplotlib", "faster-coco-eval",
                      "pycocotools"],
    extras_require={
        # diffusers: the golden baseline some tests compare with; torchdistill: its integration's tests
        "test": ["pytest", "pytest-benchmark", "diffusers", "torchdistill"],
        "bench": ["diffusers"],
        # the timm task API diffkd.integrations.timm is written against; torchdistill 1.1.5 requires torch>=2.12
        "integrations": ["timm>=1.0.31", "torchdistill"],
    },
    entry_points={"console_scripts": ["diffkd-train=diffkd.train:main", "diffkd-eval=diffkd.eval:main"]},
)
