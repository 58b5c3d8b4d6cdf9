"""megatrain: LLaMA pretraining with tensor, pipeline and ZeRO data parallelism through DeepSpeed."""

__version__ = "0.1.0"
