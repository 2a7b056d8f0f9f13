"""Split GGUF (`<name>-0000k-of-0000N.gguf`): the real SmolLM2 file rewritten into 3 splits by gguf-py's GGUFWriter
(split_max_tensors: metadata in the first split only, split.no / split.count / split.tensors.count in each, as
llama.cpp's gguf-split writes them) loads to the same tensors and logits as the unsplit file."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from shardserve.workers.loader.gguf_source import GGUFSource
from shardserve.workers.loader.source import CheckpointError
from shardserve.workers.worker import Worker

SPLITS = 3


def _split(src: str, out_dir: str) -> list[str]:
    """Rewrite `src` into SPLITS files under out_dir: every key (the tokenizer's included) and every tensor's
    bytes unchanged."""
    reader = GGUFReader(src)
    per_split = -(-len(reader.tensors) // SPLITS)
    stem = os.path.join(out_dir, "model.gguf")
    writer = GGUFWriter(stem, reader.fields["general.architecture"].contents(), split_max_tensors=per_split)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the header, and the key GGUFWriter writes itself
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [str(p) for p in writer.format_shard_names(writer.path)]


@pytest.fixture(scope="module")
def split_dir(cache_dir, smollm2_path) -> str:
    """A directory holding the 3 splits of SmolLM2 (cached)."""
    folder = os.path.join(cache_dir, "smollm2-split-v1")
    if not os.path.isfile(os.path.join(folder, f"model-{SPLITS:05d}-of-{SPLITS:05d}.gguf")):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        files = _split(smollm2_path, folder)
        assert [os.path.basename(f) for f in files] == [f"model-{k:05d}-of-{SPLITS:05d}.gguf" for k in range(1, SPLITS + 1)]
    return folder


def test_split_gguf_reads_the_same_tensors_and_config(split_dir, smollm2_path):
    whole, split = GGUFSource(smollm2_path), GGUFSource(split_dir)
    assert split.path.endswith(f"model-00001-of-{SPLITS:05d}.gguf")
    assert len({split.file_of(n) for n in split.names()}) == SPLITS  # the tensors really are spread out
    assert split.model_config == whole.model_config
    assert sorted(split.names()) == sorted(whole.names())
    for name in whole.names():  # the packed blocks, byte for byte (the dequantizer is then the same function)
        assert split.qtype(name) == whole.qtype(name), name
        assert np.array_equal(split.read_quantized(name, None, 0, 0), whole.read_quantized(name, None, 0, 0)), name


@pytest.mark.slow
def test_split_gguf_gives_the_same_logits(split_dir, smollm2_path):
    """Bit-identical fp32 logits: the same bytes through the same kernels (two SmolLM2 loads: ~40 s on 2 cores)."""
    ids = [1, 504, 3575, 282, 4649, 314, 7042, 30, 657, 314, 3729, 327, 260, 1867, 17]
    logits = []
    for path in (smollm2_path, split_dir):
        w = Worker(path, "cpu", "float32", None, 0, 1)
        w.init("127.0.0.1", 0)
        w.init_cache(4, 16)
        logits.append(w.score(ids))
    assert torch.equal(logits[0], logits[1])


def test_split_gguf_missing_a_split_fails_naming_it(split_dir, tmp_path):
    for k in (1, 3):  # the middle split is absent
        os.symlink(os.path.join(split_dir, f"model-{k:05d}-of-{SPLITS:05d}.gguf"), tmp_path / f"model-{k:05d}-of-{SPLITS:05d}.gguf")
    missing = str(tmp_path / f"model-00002-of-{SPLITS:05d}.gguf")
    for path in (str(tmp_path), str(tmp_path / f"model-00001-of-{SPLITS:05d}.gguf")):
        with pytest.raises(CheckpointError, match="missing 1 of its 3 files") as e:
            GGUFSource(path)
        assert missing in str(e.value)
