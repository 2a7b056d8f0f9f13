"""Issue 20: a broken checkpoint fails at load, before serving, with one CheckpointError naming the file and the
tensor. Each case breaks one thing of a valid tiny checkpoint (a one-layer llama GGUF, the tiny llama safetensors
dir) and loads it the whole way through Worker.init, as a replica does."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from shardserve.workers.loader import CheckpointError
from shardserve.workers.worker import Worker
from tests.fixtures import broken_checkpoints as bc

Q0 = "model.layers.0.self_attn.q_proj.weight"


@dataclass(frozen=True)
class Case:
    build: Callable[[str, str], str]  # (tmp dir, cache dir) -> checkpoint path
    file: str  # basename of the file (or the checkpoint dir) the error names
    tensor: str | None  # the tensor it names (as CheckpointError.tensor), None for file-level errors
    message: str  # regex the message must match


def _gguf(tmp: str, **kw) -> str:
    return bc.write_gguf(os.path.join(tmp, "tiny.gguf"), **kw)


def _st(tmp: str, cache_dir: str) -> str:
    return bc.tiny_dir(cache_dir, os.path.join(tmp, "tiny"))


def _lie_offsets(header: dict) -> None:
    begin, _ = header[Q0]["data_offsets"]
    header[Q0]["data_offsets"] = [begin, begin + 10**9]


def _lie_size(header: dict) -> None:
    begin, end = header[Q0]["data_offsets"]
    header[Q0]["data_offsets"] = [begin, end - 4]


def _st_truncated(tmp: str, cache_dir: str, keep: int) -> str:
    path = _st(tmp, cache_dir)
    bc.truncate(bc.weights_file(path), keep)
    return path

CATALOG: dict[str, Case] = {
    # ---- GGUF ----
    "gguf-truncated": Case(
        lambda tmp, _: bc.truncate(_gguf(tmp), -100), "tiny.gguf", "blk.0.ffn_down.weight",
        r"truncated or lying header: the tensor needs bytes \[\d+, \d+\), the file has \d+$",
    ),
    "gguf-truncated-in-header": Case(
        lambda tmp, _: bc.truncate(_gguf(tmp), 200), "tiny.gguf", None,
        r"not a readable GGUF file \(200 bytes; truncated or corrupt header\?\)",
    ),
    "gguf-offset-past-eof": Case(
        lambda tmp, _: bc.patch_gguf_tensor_info(_gguf(tmp), "blk.0.attn_q.weight", offset=1 << 30), "tiny.gguf",
        "blk.0.attn_q.weight", r"the tensor needs bytes \[\d+, \d+\), the file has \d+",
    ),
    "gguf-offsets-overlap": Case(
        lambda tmp, _: bc.patch_gguf_tensor_info(
            p := _gguf(tmp), "blk.0.attn_k.weight", offset=bc.gguf_data_start(p, "blk.0.attn_q.weight")
        ),
        "tiny.gguf", "blk.0.attn_q.weight", r"overlaps tensor 'blk.0.attn_k.weight'",
    ),
    "gguf-unknown-ggml-type": Case(
        lambda tmp, _: bc.patch_gguf_tensor_info(_gguf(tmp), "blk.0.ffn_up.weight", type_id=99), "tiny.gguf",
        "blk.0.ffn_up.weight", r"unknown ggml type id 99; known: \[",
    ),
    "gguf-integer-ggml-type": Case(  # I32 has F32's size, so only the type is wrong
        lambda tmp, _: bc.patch_gguf_tensor_info(_gguf(tmp), "blk.0.ffn_up.weight", type_id=26), "tiny.gguf",
        "blk.0.ffn_up.weight", r"ggml type I32 cannot be loaded as a weight; supported: \[.*'Q4_0'",
    ),
    "gguf-unknown-architecture": Case(
        lambda tmp, _: _gguf(tmp, arch="mamba"), "tiny.gguf", None,
        r"unsupported general.architecture 'mamba'; supported: \[.*'llama'",
    ),
    "gguf-missing-tensor": Case(
        lambda tmp, _: _gguf(tmp, drop="blk.0.ffn_down.weight"), "tiny.gguf", "model.layers.0.mlp.down_proj.weight",
        r"missing \(needed by GGUFLinearMethod of model.layers.0.mlp.down_proj\)",
    ),
    "gguf-left-over-tensor": Case(
        lambda tmp, _: _gguf(tmp, extra={"blk.1.attn_q.weight": torch.zeros(64, 64).numpy()}), "tiny.gguf", None,
        r"1 tensors were not loaded by any layer: \['model.layers.1.self_attn.q_proj.weight'\]",
    ),
    "gguf-unknown-tensor": Case(  # gpt-oss's attention sinks: a weight no llama layer would load
        lambda tmp, _: _gguf(tmp, extra={"blk.0.attn_sinks.weight": np.zeros(4, np.float32)}), "tiny.gguf",
        "blk.0.attn_sinks.weight", r"no llama layer loads this tensor, nor is it rope_freqs.weight or "
        r"blk.N.attn_rot_embd.weight: .*1 such tensor\(s\): \['blk.0.attn_sinks.weight'\]$",
    ),
    "gguf-wrong-shape": Case(
        lambda tmp, _: _gguf(tmp, shapes={"blk.0.ffn_gate.weight": (96, 64)}), "tiny.gguf",
        "model.layers.0.mlp.gate_proj.weight", r"expected shape \(128, 64\) .*found \(96, 64\)",
    ),
    "gguf-split-part-missing": Case(
        lambda tmp, _: bc.write_gguf(os.path.join(tmp, "tiny-00001-of-00002.gguf")), "tiny-00001-of-00002.gguf", None,
        r"split GGUF is missing 1 of its 2 files: \[.*tiny-00002-of-00002.gguf'\]",
    ),
    # ---- safetensors ----
    "st-truncated": Case(
        lambda tmp, c: _st_truncated(tmp, c, -100), "model.safetensors", "model.norm.weight",
        r"truncated or lying header: data_offsets \[\d+, \d+\) past the \d+ data bytes",
    ),
    "st-truncated-in-header": Case(
        lambda tmp, c: _st_truncated(tmp, c, 100), "model.safetensors", None,
        r"truncated or corrupt: the header claims \d+ bytes, the file has 100$",
    ),
    "st-offsets-past-eof": Case(
        lambda tmp, c: bc.edit_header(_st(tmp, c), _lie_offsets), "model.safetensors", Q0,
        r"data_offsets \[\d+, \d+\) past the \d+ data bytes",
    ),
    "st-offsets-wrong-size": Case(
        lambda tmp, c: bc.edit_header(_st(tmp, c), _lie_size), "model.safetensors", Q0,
        r"header lies: data_offsets \[\d+, \d+\) hold 16380 bytes, F32 \[64, 64\] needs 16384",
    ),
    "st-header-not-json": Case(
        lambda tmp, c: bc.garble_header(_st(tmp, c)), "model.safetensors", None, r"invalid header JSON \(\d+ bytes\)",
    ),
    "st-missing-tensor": Case(
        lambda tmp, c: bc.edit_tensors(_st(tmp, c), lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
        "tiny", "model.layers.1.mlp.down_proj.weight",  # in no file: the error names the checkpoint dir
        r"missing \(needed by UnquantizedLinearMethod of model.layers.1.mlp.down_proj\)",
    ),
    "st-left-over-tensor": Case(
        lambda tmp, c: bc.edit_tensors(_st(tmp, c), lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(4)})),
        "model.safetensors", None, r"1 tensors were not loaded by any layer: \['model.layers.0.mlp.extra.weight'\]",
    ),
    "st-wrong-shape": Case(
        lambda tmp, c: bc.edit_tensors(_st(tmp, c), lambda t: t.update({Q0: torch.zeros(64, 48)})),
        "model.safetensors", Q0, r"expected shape \(64, 64\) for model.layers.0.self_attn.qkv_proj .*found \(64, 48\)",
    ),
    "st-wrong-dtype": Case(
        lambda tmp, c: bc.edit_tensors(_st(tmp, c), lambda t: t.update({Q0: bc.int_tensor((64, 64))})),
        "model.safetensors", Q0, r"expected a float dtype for model.layers.0.self_attn.qkv_proj .*found torch.int32",
    ),
    "pickled-weights-only": Case(
        lambda tmp, c: bc.pickled_only(c, os.path.join(tmp, "tiny")), "pytorch_model.bin", None,
        r"pickled PyTorch weights are not loaded \(unpickling can run code from the file\); convert them to safetensors",
    ),
    "config-unsupported-quant-method": Case(
        lambda tmp, c: bc.edit_config(_st(tmp, c), lambda cfg: cfg.update(quantization_config={"quant_method": "bitsandbytes"})),
        "config.json", None,
        r"declares quantization_config.quant_method 'bitsandbytes', which this build cannot load yet; supported: "
        r"\['auto-round', 'awq', 'compressed-tensors', 'gguf', 'gptq', 'modelslim'\]",
    ),
    "config-gptq-without-bits": Case(
        lambda tmp, c: bc.edit_config(_st(tmp, c), lambda cfg: cfg.update(quantization_config={"quant_method": "gptq"})),
        "config.json", "bits", r"missing from the quantization config",
    ),
    "config-invalid-json": Case(
        lambda tmp, c: _write(os.path.join(_st(tmp, c), "config.json"), '{"model_type": "llama",'), "config.json", None,
        r"invalid JSON: ",
    ),
    "config-unknown-architecture": Case(
        lambda tmp, c: bc.edit_config(_st(tmp, c), lambda cfg: cfg.update(model_type="mamba")), "config.json", None,
        r"unsupported model_type 'mamba' in config.json; supported: \[",
    ),
}


def _write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return os.path.dirname(path)


def test_the_catalog_is_large_enough():
    assert len(CATALOG) >= 10


def test_the_valid_checkpoints_load(tmp_path, cache_dir):
    """The base checkpoints every case breaks load as they are: each failure below is the break's."""
    for path in (_gguf(str(tmp_path)), _st(str(tmp_path), cache_dir)):
        worker = Worker(path, "cpu", "float32", None, 0, 1)
        assert worker.init("127.0.0.1", 0)["architecture"] == "llama"


def test_known_extra_gguf_tensors_load(tmp_path):
    """The unmapped tensors llama.cpp's files may hold load: RoPE frequency factors (read by the model) and the
    per-layer rotary inv_freq (recomputed)."""
    extra = {"rope_freqs.weight": np.ones(8, np.float32), "blk.0.attn_rot_embd.weight": np.ones(8, np.float32)}
    worker = Worker(_gguf(str(tmp_path), extra=extra), "cpu", "float32", None, 0, 1)
    assert worker.init("127.0.0.1", 0)["architecture"] == "llama"


@pytest.mark.parametrize("name", list(CATALOG))
def test_broken_checkpoint_fails_at_load(name, tmp_path, cache_dir):
    case = CATALOG[name]
    path = case.build(str(tmp_path), cache_dir)
    worker = Worker(path, "cpu", "float32", None, 0, 1)
    with pytest.raises(CheckpointError) as info:
        worker.init("127.0.0.1", 0)
    err = info.value
    message = str(err)
    assert worker.model is None and worker.runner is None  # nothing half-loaded to serve from
    assert any(os.path.basename(f.strip()) == case.file for f in err.file.split(",")), (err.file, message)
    assert err.tensor == case.tensor, message
    if case.tensor:
        assert f"tensor {case.tensor!r}" in message
    assert re.search(case.message, err.detail), message
    assert "Traceback" not in message and message.count("\n") == 0, message


def test_checkpoint_errors_cross_processes_whole():
    import pickle

    err = pickle.loads(pickle.dumps(CheckpointError("/m/model.safetensors", Q0, "expected a float dtype")))
    assert (err.file, err.tensor, str(err)) == ("/m/model.safetensors", Q0, f"/m/model.safetensors: tensor {Q0!r}: expected a float dtype")
