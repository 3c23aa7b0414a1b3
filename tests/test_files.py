"""common/files.py: the one atomic-write mechanism (reports, WAVs, checkpoints, artifacts, state)."""
from __future__ import annotations

import os

import pytest

from common.files import atomic_files, atomic_path, write_atomic


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    write_atomic(target, '{"new": 1}\n')
    assert target.read_text() == '{"new": 1}\n' and os.listdir(tmp_path) == ["report.json"]
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like any new file, not mkstemp's 0600


def test_a_failed_write_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "model.pth"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of it")
            raise RuntimeError("disk full")
    assert target.read_text() == "good" and os.listdir(tmp_path) == ["model.pth"]


def test_several_files_appear_in_the_order_given(tmp_path, monkeypatch):
    graph, sidecar = tmp_path / "a.onnx", tmp_path / "a.json"
    order = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (order.append(os.path.basename(dst)), real_replace(src, dst)))
    with atomic_files(graph, sidecar) as (g, s):
        g.write_bytes(b"graph")
        s.write_text("{}")
        assert not graph.exists() and not sidecar.exists()  # nothing visible before the block ends
    assert order == ["a.onnx", "a.json"]  # the sidecar last: whoever sees it sees the graph
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.onnx"]


def test_a_missing_folder_is_an_os_error_and_nothing_is_left(tmp_path):
    with pytest.raises(OSError):
        write_atomic(tmp_path / "nope" / "x.json", "{}")
    assert os.listdir(tmp_path) == []
