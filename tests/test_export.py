"""llama.cpp control-vector export: tensor names, values, block 0, the CLI. (llama.cpp itself reads these
files in tests/test_llamacpp.py.)"""

import dataclasses

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from jailbreak_antidote.cli import app
from jailbreak_antidote.errors import AntidoteError, InvalidParameter
from jailbreak_antidote.export import export_gguf, read_gguf_control_vector


def test_export_roundtrip_holds_alpha_times_the_sparse_vectors(qwen2_antidote, tmp_path):
    path = export_gguf(qwen2_antidote, tmp_path / "v.gguf", alpha=0.7)
    rows = read_gguf_control_vector(path)
    vectors = qwen2_antidote.vectors()
    assert sorted(rows) == sorted(layer for layer in vectors if layer != 0)
    for layer, row in rows.items():
        assert row.dtype == np.float32 and row.shape == (qwen2_antidote.hidden_size,)
        np.testing.assert_allclose(row, 0.7 * vectors[layer].numpy(), rtol=1e-6)
        assert (row != 0).sum() == int(qwen2_antidote.k * qwen2_antidote.hidden_size)  # sparse, zeros elsewhere


def test_block_0_is_refused_unless_skipped(qwen2_antidote, tmp_path):
    with_zero = dataclasses.replace(
        qwen2_antidote,
        layers=[0, *qwen2_antidote.layers[1:]] if qwen2_antidote.layers[0] != 0 else qwen2_antidote.layers,
    )
    with pytest.raises(InvalidParameter, match=r"direction\.0"):
        export_gguf(with_zero, tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()
    rows = read_gguf_control_vector(export_gguf(with_zero, tmp_path / "v.gguf", skip_layer_0=True))
    assert 0 not in rows and len(rows) == len(with_zero.layers) - 1


def test_reader_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(AntidoteError, match="not a readable GGUF"):
        read_gguf_control_vector(bad)


def test_export_cli(qwen2_antidote, tmp_path):
    artifact = tmp_path / "a.antidote"
    qwen2_antidote.save(artifact)
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(artifact), "--out", str(tmp_path / "v.gguf"), "--alpha", "2"])
    assert result.exit_code == 0, result.output
    rows = read_gguf_control_vector(tmp_path / "v.gguf")
    layer = next(iter(rows))
    torch.testing.assert_close(torch.from_numpy(rows[layer]), 2 * qwen2_antidote.vectors()[layer])
    result = runner.invoke(app, ["export", str(artifact), "--out", str(tmp_path / "w"), "--format", "onnx"])
    assert result.exit_code == 2 and "unknown format" in result.output
