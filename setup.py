"""Installs the four packages of the project and its console scripts.

Install for development with ``make install`` (editable, pinned versions), or
``pip install -c requirements/constraints.txt -e .[dev]`` after installing
``torch==2.13.0`` (CPU) or the CUDA build you need.
"""
from setuptools import find_packages, setup

setup(
    name="rag-e2e",
    version="0.1.0",
    description="End-to-end trainable retrieval-augmented generation (RAG-Sequence, RAG-Token).",
    python_requires=">=3.10",
    packages=find_packages(include=["rag_models", "index", "decoding", "training", "training.*"]),
    package_data={"training.evaluation": ["templates/*.j2"]},  # report.html's template
    install_requires=[
        "torch>=2.2",
        "transformers>=5.0",
        "tokenizers>=0.20",
        "faiss-cpu>=1.8",
        "datasets>=3.0",
        "lightning>=2.0",
        "hydra-core>=1.3",
        "tensorboard>=2.14",
        "numpy>=1.26",
        "tqdm>=4.66",
        "psutil>=5.9",
        "pypdf>=5.0",  # rag-build-index --documents: text of PDF pages (pure Python)
        "regex>=2023.0",  # DPR answer tokens: Unicode classes such as \p{L} (transformers installs it too)
        "matplotlib>=3.8",  # rag-eval's figures (Agg backend, PNG and SVG)
        "jinja2>=3.1",  # rag-eval's report.html
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.15"],
        # faiss-gpu replaces faiss-cpu on CUDA machines; the exact torch index needs neither.
        "gpu": ["faiss-gpu>=1.8"],
    },
    entry_points={
        "console_scripts": [
            "rag-make-world=training.demo.world_cli:main",
            "rag-build-index=index.build_cli:main",
            "rag-export-index=index.dataset_export:main",
            "rag-train=training.lit.train_cli:main",
            "rag-eval=training.evaluation.eval_cli:main",
            "rag-score=training.evaluation.score_cli:main",
            "rag-compare=training.evaluation.compare_cli:main",
            "rag-ask=decoding.ask_cli:main",
            "rag-import=rag_models.convert_cli:import_main",
            "rag-export=rag_models.convert_cli:export_main",
            "rag-demo=training.demo.demo_cli:main",
        ]
    },
)
