from setuptools import find_packages, setup

setup(
    name="megatrain",
    version="0.1.0",
    description="Train LLaMA-family models at scale: tensor, pipeline and ZeRO data parallelism through DeepSpeed.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatrain", "megatrain.*"]) + ["megatrain_tools"],
    # tools/ stays a folder of scripts (python tools/X.py) and installs as megatrain_tools for the console scripts
    package_dir={"megatrain_tools": "tools"},
    install_requires=[
        "torch>=2.10",
        "deepspeed",
        "numpy",
        "sentencepiece",
        "mpi4py",
        "wandb",
        "pyyaml",
        "safetensors",
        "tqdm",
        "gguf",
        "matplotlib",
    ],
    # FP8 training (train.fp8) runs on torchao's float8 casts; megatrain.parallel.fp8 checks this same range
    # at start. The test extra includes it so that CI runs the FP8 tests (emulated on CPU).
    extras_require={"fp8": ["torchao>=0.18,<0.19"], "test": ["pytest", "transformers", "torchao>=0.18,<0.19"]},
    entry_points={
        "console_scripts": [
            "megatrain-train=megatrain.train:main",
            "megatrain-preprocess=megatrain_tools.preprocess_data:main",
            "megatrain-train-tokenizer=megatrain_tools.train_tokenizer:main",
            "megatrain-merge-datasets=megatrain_tools.merge_datasets:main",
            "megatrain-inspect-data=megatrain_tools.inspect_data:main",
            "megatrain-plot=megatrain_tools.plot_metrics:main",
            "megatrain-convert=megatrain.convert.cli:main",
            "megatrain-generate=megatrain_tools.generate:main",
        ]
    },
)
