"""megatrain-convert: megatrain <-> Hugging Face, megatrain -> GGUF, offline resharding, with verification.

    megatrain-convert RUN_DIR/checkpoints/step_00001000 out/hf --to hf --dtype bf16
    megatrain-convert path/to/hf-llama out/ckpt --to megatrain --tp 2 --pp 2
    megatrain-convert RUN_DIR out/model-q8_0.gguf --to gguf --outtype q8_0
    megatrain-convert RUN_DIR/checkpoints/step_00001000 out/tp4 --to megatrain --tp 4

Exit status: 0 converted (and verified), 1 verification failed (nothing written),
2 bad input or arguments (the message says what to do).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from megatrain import files as outputs
from megatrain.checkpoint import layout
from megatrain.config import Config, ConfigError, validate
from megatrain.convert import gguf_export, hf_export, verify
from megatrain.convert.source import ConversionError, Source, load_source, load_tokenizer
from megatrain.files import file_in_the_way, replace_dir
from megatrain.telemetry.console import pipe_safe

log = logging.getLogger("megatrain.convert")

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE = 0, 1, 2
TARGETS = ("hf", "megatrain", "gguf")


def build_parser() -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="megatrain-convert", description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="megatrain checkpoint (step dir, checkpoints dir or run dir) or HF Llama directory")
    p.add_argument("output", help="output directory (hf, megatrain) or .gguf file (gguf)")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument("--from", dest="source_kind", default="auto", choices=("auto", "megatrain", "hf"),
                   help="input format (default: detected)")
    p.add_argument("--tp", type=int, default=1, help="--to megatrain: tensor-parallel size of the output")
    p.add_argument("--pp", type=int, default=1, help="--to megatrain: pipeline-parallel size of the output")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="--to hf / megatrain: weight dtype (auto keeps the source's)")
    p.add_argument("--outtype", default="f16", choices=gguf_export.OUTTYPES, help="--to gguf: tensor type")
    p.add_argument("--max-shard-size", default=hf_export.DEFAULT_MAX_SHARD,
                   help="--to hf: largest safetensors file before the weights are split (e.g. 5GB, 500MB)")
    p.add_argument("--tokenizer", help="sentencepiece .model to ship (default: found with the checkpoint)")
    p.add_argument("--no-tokenizer", action="store_true", help="--to hf / megatrain: write no tokenizer")
    p.add_argument("--allow-padded-vocab", action="store_true",
                   help="accept a tokenizer with fewer pieces than the embedding has rows (padded vocabulary)")
    p.add_argument("--name", default=None, help="--to gguf: general.name (default: the output file's stem)")
    p.add_argument("--verify", dest="verify", action="store_true", default=True,
                   help="compare logits and greedy continuations of source and output (default)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the comparison")
    p.add_argument("--verify-prompts", type=int, default=5, help="prompts for the greedy comparison")
    p.add_argument("--verify-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--atol", type=float, default=1e-4, help="logit tolerance (absolute)")
    p.add_argument("--rtol", type=float, default=1e-5, help="logit tolerance, relative to the largest logit")
    p.add_argument("--checkpoint-verify", default="sizes", choices=layout.VERIFY_LEVELS,
                   help="manifest check of a megatrain input (full = SHA-256 of every file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


@pipe_safe
def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file at INFO
    args = build_parser().parse_args(argv)
    # The only place that writes to the terminal: convert() returns its summary or raises.
    try:
        summary = convert(args)
    except VerificationFailed as e:
        sys.stderr.write("".join(f"  {line}\n" for line in e.mismatches) + f"error: {e}\n")
        return EXIT_VERIFY_FAILED
    except (ConversionError, layout.CheckpointError, ConfigError) as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    sys.stdout.write(summary + "\n")
    return EXIT_OK


class VerificationFailed(Exception):
    """The written output does not reproduce the source; nothing was installed."""

    def __init__(self, message: str, mismatches: list[str]):
        super().__init__(message)
        self.mismatches = mismatches


# --------------------------------------------------------------------------- steps


def check_args(args: argparse.Namespace) -> None:
    if args.to != "megatrain" and (args.tp != 1 or args.pp != 1):
        raise ConversionError("--tp / --pp apply to --to megatrain only")
    if args.tp < 1 or args.pp < 1:
        raise ConversionError(f"--tp {args.tp} --pp {args.pp}: sizes must be >= 1")
    if args.to == "gguf" and args.dtype != "auto":
        raise ConversionError("--dtype applies to hf / megatrain outputs; GGUF takes --outtype")
    if args.to == "gguf" and Path(args.output).is_dir():
        raise ConversionError(f"{args.output}: is a directory; --to gguf writes one file, e.g. "
                              f"{Path(args.output) / 'model-f16.gguf'}")
    if args.verify and (args.verify_prompts < 1 or args.verify_tokens < 1):
        raise ConversionError("--verify-prompts and --verify-tokens must be >= 1 (or pass --no-verify)")
    if not (args.atol >= 0 and args.rtol >= 0):  # also refuses nan
        raise ConversionError(f"--atol {args.atol} --rtol {args.rtol}: tolerances must be >= 0")
    blocker = file_in_the_way(Path(args.output).absolute().parent)
    if blocker is not None:
        raise ConversionError(f"{args.output}: {blocker} is a file, so nothing can be written under it; "
                              f"choose another output path")


MARKER = ".megatrain-convert.json"  # in every HF output: the mark that --overwrite may replace the directory
WRITTEN_BY = "megatrain-convert"  # meta.json["written_by"] of a megatrain output: the same mark
GGUF_MAGIC = b"GGUF"


def check_output(out: Path, overwrite: bool, source: Optional[Path] = None) -> None:
    """Refuse an output that is, holds or sits in the input or in a checkpoint, whatever the flags; refuse to
    replace anything unless --overwrite, and even then anything megatrain-convert did not write itself."""
    if source is not None:
        why = outputs.conflict(out, [source], inside_dirs=False)
        if why is None and outputs.is_inside(out, source) and out.is_dir() and any(out.glob(f"step_*/{layout.META}")):
            why = f"contains the checkpoints of the input {source}"  # e.g. RUN_DIR -> RUN_DIR/checkpoints
        if why is not None:
            raise ConversionError(f"{out}: the output {why}; choose an output path outside the input")
    ckpt = outputs.enclosing_checkpoint(out.absolute().parent, (layout.META, layout.MANIFEST, layout.COMPLETE))
    if ckpt is not None:
        raise ConversionError(f"{out}: lies inside the checkpoint {ckpt}, whose manifest would no longer match its "
                              f"files (resume and conversion would refuse it); choose an output path outside it")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    what = "a model" if (out.is_file() or (out / "config.json").exists() or (out / layout.META).exists()) \
        else "files"
    if not overwrite:
        raise ConversionError(f"{out}: already exists and holds {what}; choose another output path or pass "
                              f"--overwrite to replace it")
    if not written_by_us(out):
        raise ConversionError(f"{out}: already exists and holds {what} that megatrain-convert did not write (no "
                              f"{MARKER} / meta.json written_by / GGUF header), so --overwrite will not replace it; "
                              f"choose another output path or delete it yourself")


def written_by_us(out: Path) -> bool:
    """An earlier output of this tool: an HF directory with our marker, a megatrain checkpoint whose meta.json
    says so, or a GGUF file."""
    if out.is_file():
        with open(out, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    if (out / MARKER).is_file():
        return True
    try:
        return json.loads((out / layout.META).read_text()).get("written_by") == WRITTEN_BY
    except (OSError, ValueError, AttributeError):
        return False


def output_dtype(args: argparse.Namespace, src: Source) -> Optional[torch.dtype]:
    if args.dtype != "auto":
        return hf_export.DTYPES[args.dtype]
    if args.to == "hf" and src.dtype not in hf_export.HF_DTYPE_NAMES:
        return torch.float32
    return None if args.to == "megatrain" else src.dtype


def resolve_tokenizer(args: argparse.Namespace, src: Source) -> tuple[Optional[Path], Any]:
    if args.no_tokenizer:
        if args.to == "gguf":
            raise ConversionError("--no-tokenizer: a GGUF file must carry the vocabulary")
        return None, None
    if src.tokenizer is None:
        if args.to == "megatrain":
            log.warning("no tokenizer found with %s; the output carries none (pass --tokenizer to add one)", src.path)
            return None, None
        raise ConversionError(f"{src.path}: no tokenizer found (looked for tokenizer.model in the checkpoint and "
                              f"the recorded data.tokenizer); pass --tokenizer PATH, or --no-tokenizer for "
                              f"weights only")
    return src.tokenizer, load_tokenizer(src.tokenizer, src.model, args.allow_padded_vocab)


def _tmp_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def install(tmp: Path, out: Path) -> None:
    if tmp.is_dir():
        replace_dir(tmp, out)
    else:
        os.replace(tmp, out)


# --------------------------------------------------------------------------- writers


def megatrain_config(src: Source, tp: int, pp: int) -> dict:
    """The Config dict for a megatrain output, validated for the new topology."""
    config = json.loads(json.dumps(src.config))
    config.setdefault("parallel", {}).update({"tensor": tp, "pipeline": pp})
    train = config.setdefault("train", {})
    train["seq_len"] = min(int(train.get("seq_len", 256)), src.model.max_seq_len)
    try:
        validate(Config.from_dict(config))
    except ConfigError as e:
        raise ConversionError(f"--tp {tp} --pp {pp} do not fit this model: {e}") from None
    return config


def megatrain_extra_meta(src: Source, tok_path: Optional[Path], tok: Any) -> dict:
    if src.kind == "megatrain":
        keep = ("step", "consumed_samples", "data_fingerprint", "tokenizer_sha256", "tokenizer_path", "source")
        extra = {k: src.meta[k] for k in keep if k in src.meta}
        extra["converted_from"] = {"format": "megatrain", "path": str(src.path), "topology": src.meta["topology"]}
    else:
        extra = {"source": {"format": "hf", "path": str(src.path), "hf_config": src.hf_config,
                            "hf_generation_config": hf_export.source_generation_config(src)}}
    extra["written_by"] = WRITTEN_BY
    if tok is not None:
        extra["tokenizer_sha256"] = tok.sha256
        extra["tokenizer_path"] = str(Path(tok_path).resolve())
    return extra


def write_output(args: argparse.Namespace, src: Source, tmp: Path, dtype: Optional[torch.dtype],
                 tok_path: Optional[Path], tok: Any) -> tuple[int, int]:
    """Write the converted model at ``tmp``; returns (tensors written, bytes)."""
    from tqdm import tqdm

    n_layers = src.model.num_layers
    if args.to == "hf":
        total = len(src.weights) + 3 * n_layers
    elif args.to == "gguf":
        total = len(src.weights) + 3 * n_layers + (src.model.rope_scaling is not None)
    else:
        total = len(src.weights) * args.tp
    with tqdm(total=total, desc=f"writing {args.to}", unit="tensor", disable=None) as bar:
        if args.to == "hf":
            tmp.mkdir(parents=True)
            nbytes = hf_export.write_hf(tmp, src, dtype, hf_export.parse_size(args.max_shard_size), tok_path, tok,
                                        bar.update)
            layout.atomic_write_json(tmp / MARKER, {"written_by": WRITTEN_BY, "source": str(src.path),
                                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        elif args.to == "gguf":
            nbytes = gguf_export.write_gguf(tmp, src, args.outtype, tok_path, tok, bar.update,
                                            name=args.name or Path(args.output).stem)
        else:
            weights = hf_export.cast_weights(src.weights, dtype)
            layout.write_weights_only_checkpoint(
                tmp, megatrain_config(src, args.tp, args.pp), weights, tp=args.tp, pp=args.pp,
                extra_meta=megatrain_extra_meta(src, tok_path, tok),
                extra_files={"tokenizer.model": tok_path} if tok_path else None, progress=bar.update)
            nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    return total, nbytes


# --------------------------------------------------------------------------- verification


def reference_weights(args: argparse.Namespace, src: Source, dtype: Optional[torch.dtype]) -> dict:
    if args.to == "gguf":
        return gguf_export.rounded_canonical(src.model, src.weights, args.outtype)
    return hf_export.cast_weights(src.weights, dtype)


def output_runner(args: argparse.Namespace, src: Source, tmp: Path) -> verify.Runner:
    if args.to == "hf":
        if verify.transformers_available():
            return verify.hf_runner(tmp)
        log.warning("transformers is not installed: the HF output is checked by reading its files back, "
                    "not by running transformers")
        from megatrain.convert.source import load_hf_dir

        back = load_hf_dir(tmp)
        return verify.megatrain_runner(back.model, back.weights)
    if args.to == "gguf":
        _, tensors = gguf_export.read_gguf(tmp)
        return verify.megatrain_runner(src.model, gguf_export.canonical_from_gguf_tensors(src.model, tensors))
    meta, weights = layout.load_canonical_weights(tmp, verify="full")
    return verify.megatrain_runner(layout.model_config_of(meta, tmp), weights)


def reference_runner(src: Source, ref_w: dict, lossless: bool) -> verify.Runner:
    """transformers on an HF source when the output keeps its precision (an implementation independent of
    megatrain's on that side), else megatrain's model on the (rounded) source weights."""
    if src.kind == "hf" and lossless and verify.transformers_available():
        try:
            return verify.hf_runner(src.path)
        except Exception as e:  # transformers may reject what megatrain reads; fall back, do not fail
            log.warning("transformers cannot run %s (%s); verifying against megatrain's model instead", src.path, e)
    return verify.megatrain_runner(src.model, ref_w)


def run_verify(args: argparse.Namespace, src: Source, tmp: Path, dtype: Optional[torch.dtype],
               tok: Any) -> verify.VerifyResult:
    ref_w = reference_weights(args, src, dtype)
    lossless = all(torch.equal(ref_w[n].float(), src.weights[n].float()) for n in src.weights)
    ref = reference_runner(src, ref_w, lossless)
    prompts = verify.build_prompts(tok, src.model.vocab_size, args.verify_prompts)
    new_tokens = max(1, min(args.verify_tokens, src.model.max_seq_len - prompts.shape[1]))
    probe = verify.probe_tokens(src.model.vocab_size, min(64, src.model.max_seq_len))
    try:
        got = output_runner(args, src, tmp)
    except Exception as e:  # an output that does not even load is a failed verification, not a crash
        return verify.VerifyResult(float("inf"), args.atol, 0, 0, len(prompts), new_tokens,
                                   mismatches=[f"the written output does not load: {e.__class__.__name__}: {e}"])
    result = verify.compare(ref, got, prompts, probe, new_tokens, args.atol, args.rtol)
    if not lossless:
        result.rounding_drift = verify.rounding_drift(src.model, src.weights, ref_w, probe)
    return result


# --------------------------------------------------------------------------- the command


def convert(args: argparse.Namespace) -> str:
    """Write the output under a temporary name, verify it, rename it into place; returns a one-line summary.
    Raises VerificationFailed (nothing installed) or a ConversionError / CheckpointError / ConfigError."""
    check_args(args)
    out = Path(args.output)
    check_output(out, args.overwrite, Path(args.input))
    start = time.time()
    src = load_source(args.input, args.source_kind, args.tokenizer, verify=args.checkpoint_verify)
    why = outputs.conflict(out, [src.path], inside_dirs=False)  # the step directory a run directory resolved to
    if why is not None:
        raise ConversionError(f"{out}: the output {why}; choose an output path outside the input")
    dtype = output_dtype(args, src)
    tok_path, tok = resolve_tokenizer(args, src)
    tmp = _tmp_path(out)
    _remove(tmp)
    try:
        count, nbytes = write_output(args, src, tmp, dtype, tok_path, tok)
        result = run_verify(args, src, tmp, dtype, tok) if args.verify else None
        if result is not None and not result.ok:
            raise VerificationFailed(f"verification failed: {result.summary()}; nothing was written to {out} "
                                     f"(rerun with --no-verify to write it anyway)", result.mismatches)
        install(tmp, out)
    finally:
        _remove(tmp)
    secs = time.time() - start
    what = args.outtype if args.to == "gguf" else str(dtype or src.dtype).replace("torch.", "")
    topo = f" tp={args.tp} pp={args.pp}" if args.to == "megatrain" else ""
    check = f"; verify: {result.summary()}" if result is not None else "; not verified"
    return (f"{src.describe()} -> {args.to}[{what}{topo}] {out}: {count} tensors, {nbytes / 1e6:.1f} MB in "
            f"{secs:.1f} s ({nbytes / 1e6 / max(secs, 1e-9):.1f} MB/s){check}")


if __name__ == "__main__":
    sys.exit(main())
