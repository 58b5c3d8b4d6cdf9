"""The DeepSpeed side of megatrain: the DeepSpeed config (``ds_config``), the engine around the
model (``build``), and every use of DeepSpeed's private internals (``internals``)."""

from megatrain.telemetry.ds_output import use_cpu_accelerator

# Every path of megatrain into DeepSpeed (training, checkpoint scans, conversion) comes through this
# package first: name the accelerator before DeepSpeed guesses it and warns on every rank.
use_cpu_accelerator()

from megatrain.engine.build import (Built, build_ctx, build_engine, build_partitioned_model, build_pipeline_module,
                                    pipeline_batches)
from megatrain.engine.ds_config import build_ds_config, load_template

__all__ = ["Built", "build_ctx", "build_ds_config", "build_engine", "build_partitioned_model",
           "build_pipeline_module", "load_template", "pipeline_batches"]
