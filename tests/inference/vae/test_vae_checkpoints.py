"""Checkpoints: atomic saves, weights-only loads, truncated/tampered files are clear errors."""

import os

import pytest
import torch

from vilab.inference.vae.checkpoints import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_safetensors,
    save_checkpoint,
    save_safetensors,
)


def _state():
    return {"state_dict": {"w": torch.arange(300.0)}, "epoch": 3, "loops": {"fit": [1, 2.5, "x", None]}}


def test_checkpoint_round_trip(tmp_path):
    path = str(tmp_path / "a.ckpt")
    save_checkpoint(_state(), path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(300.0))
    assert loaded["epoch"] == 3 and loaded["loops"] == {"fit": [1, 2.5, "x", None]}


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = str(tmp_path / "a.ckpt")
    save_checkpoint(_state(), path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(path)


def test_tampered_checkpoint_fails_its_checksum(tmp_path):
    path = str(tmp_path / "a.ckpt")
    save_checkpoint(_state(), path)
    data = bytearray(open(path, "rb").read())
    offset = data.find(torch.tensor([150.0]).numpy().tobytes())
    data[offset + 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_with_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.ckpt")
    torch.save({"x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(path)


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "a.ckpt")
    save_checkpoint(_state(), path)
    before = open(path, "rb").read()

    def crash(file):
        file.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["a.ckpt"]


def test_safetensors_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_safetensors({"a": torch.ones(4, 5), "b": torch.arange(3)}, path, metadata={"k": "v"})
    tensors, metadata = load_safetensors(path)
    assert torch.equal(tensors["a"], torch.ones(4, 5)) and metadata == {"k": "v"}
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_safetensors(path)
    open(path, "wb").write(bytes(data[:40]))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_safetensors(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_safetensors(str(tmp_path / "none.safetensors"))
