"""Folder replacement shared by gen-repo and the exporters: all at once or not at all."""

from __future__ import annotations

import os

import pytest

from toolkit import files


def test_replace_dir_swaps_in_new_content_and_leaves_no_hidden_folders(tmp_path):
    target = tmp_path / "repo"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = files.staging_dir(target)
    (staging / "new.txt").write_text("new")
    files.replace_dir(staging, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700: others may read it


def test_replace_dir_restores_the_old_folder_when_the_final_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "repo"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = files.staging_dir(target)
    real_replace, calls = os.replace, []

    def failing_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="disk full"):
        files.replace_dir(staging, target)
    assert (target / "old.txt").read_text() == "old"
