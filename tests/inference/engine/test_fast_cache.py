"""The kernel cache: loaded only from a private, per-user directory."""

import os
import stat

import pytest

from vilab.inference.engine import cache as fast_cache


def test_the_cache_is_created_private_under_vilab_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VILAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert fast_cache.cache_problem() == ""
    directory = tmp_path / "cache" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(directory)
    assert stat.S_IMODE(os.stat(directory).st_mode) & 0o077 == 0


def test_a_cache_others_can_write_is_refused_with_the_fix(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(shared))
    assert "writable by group or others" in fast_cache.cache_problem()
    with pytest.raises(PermissionError, match="chmod go-w"):
        fast_cache.inductor_cache_dir()


def test_a_link_in_place_of_the_cache_is_refused(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "link"))
    assert "not a link" in fast_cache.cache_problem()


def test_no_cached_kernel_is_loaded_from_a_shared_directory(tmp_path, monkeypatch):
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from vilab.inference.engine.backends import inductor as fast_inductor

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(shared))
    example = (torch.ones(3),)
    graph = make_fx(lambda x: (x * 2.0,))(*example)
    assert fast_inductor.load_cached(graph, example) is None
    assert not fast_inductor.is_cached(graph, example)


def test_inductors_own_default_in_the_temp_directory_is_replaced(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("VILAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", f"{tempfile.gettempdir()}/torchinductor_someone")
    assert fast_cache.cache_problem() == ""
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
