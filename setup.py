"""Install the SparCode model zoo (a FuxiCTR plugin) with `pip install -e ".[test]"`.

PyTorch is not listed as a hard pin: install the build for your platform first
(CPU: `pip install torch==2.13.0`), otherwise pip may pull several GB of CUDA wheels.
"""
from setuptools import find_packages, setup

setup(
    name="sparcode-model-zoo",
    version="0.1.0",
    description="SparCode (SIGIR'23) and matching baselines as FuxiCTR-compatible models",
    packages=find_packages(include=["model_zoo", "model_zoo.*"]),
    # An explicit root package_dir makes `pip install -e .` put the project folder on
    # sys.path (a static .pth) instead of a meta-path finder that runs after the regular
    # path search: fuxictr installs a namespace package `model_zoo` that would win otherwise.
    package_dir={"": "."},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "fuxictr>=2.3,<2.4",
        "numpy",
        "pandas",
        "polars",
        "h5py",
        "pyyaml",
        "scikit-learn",
        "scipy",
        "faiss-cpu",
        "tqdm",
        "pyarrow",
        "numba",
    ],
    extras_require={
        # qdrant-client: the in-process sparse engine of the export tests (pure-Python wheels, no CUDA).
        "test": ["pytest", "qdrant-client"],
        "plot": ["matplotlib"],
        "ray": ["ray"],                      # run_param_tuner.py --ray-address (optional; a large install)
        "export": ["qdrant-client"],         # python -m model_zoo.serving.export --engine qdrant
    },
)
