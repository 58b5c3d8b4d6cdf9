"""Every file megatrain writes gets the umask's mode: others on a shared cluster can read exports."""

from __future__ import annotations

import os
import stat

from megatrain.files import default_file_mode
from tests.convert.conftest import convert, debug_config, make_checkpoint


def _modes(root) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.stat(p).st_mode)
    return out


def test_checkpoint_and_exports_are_readable_like_any_new_file(tmp_path, tokenizer_path):
    # safetensors' save_file makes owner-only (0600) files: model.safetensors was 0600, config.json 0644
    want = default_file_mode()
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, debug_config(), tokenizer=tokenizer_path)
    assert convert(ckpt, tmp_path / "hf", "--to", "hf", "--no-verify") == 0
    assert convert(ckpt, tmp_path / "m.gguf", "--to", "gguf", "--outtype", "f32", "--no-verify") == 0
    modes = {f"ckpt/{k}": v for k, v in _modes(ckpt).items()}
    modes.update({f"hf/{k}": v for k, v in _modes(tmp_path / "hf").items()})
    modes["m.gguf"] = stat.S_IMODE(os.stat(tmp_path / "m.gguf").st_mode)
    assert "hf/model.safetensors" in modes and any(k.endswith(".safetensors") for k in modes if k.startswith("ckpt"))
    wrong = {k: oct(v) for k, v in modes.items() if v != want}
    assert not wrong, f"expected {oct(want)}: {wrong}"
