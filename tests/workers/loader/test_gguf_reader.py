"""The checked GGUF reader's whole-array field parse against gguf-py's own GGUFReader (the reference)."""

from __future__ import annotations

import os
import shutil

import pytest
from gguf import GGUFReader

from shardserve.workers.loader.gguf_source import open_gguf_reader
from shardserve.workers.loader.source import CheckpointError


def test_every_field_reads_as_gguf_py_reads_it(smollm2_path):
    ours, reference = open_gguf_reader(smollm2_path), GGUFReader(smollm2_path)
    assert list(ours.fields) == list(reference.fields)
    for key, field in reference.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
    assert len(ours.fields["tokenizer.ggml.tokens"].contents()) == 49152  # the arrays were read, not skipped
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    assert ours.data_offset == reference.data_offset


# SmolLM2 Q4_1: tokens at bytes [1062, 763493), token_type (int32s) to 960150, merges to 1768872
@pytest.mark.parametrize("keep", [200_000, 800_000, 1_300_000])  # inside the strings, the scalars, the merges
def test_a_file_cut_inside_its_arrays_is_a_checkpoint_error(smollm2_path, tmp_path, keep):
    path = str(tmp_path / "cut.gguf")
    shutil.copyfile(smollm2_path, path)
    os.truncate(path, keep)
    with pytest.raises(CheckpointError, match=rf"not a readable GGUF file \({keep} bytes; truncated or corrupt header\?\)"):
        open_gguf_reader(path)
