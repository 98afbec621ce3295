"""``megalite.atomic_text.atomic_text_file``: the file appears whole or not at all, with the mode
a plain ``open(path, "w")`` gives. The vocabulary and corpus writers that use it are tested end to
end in test_train_wordpiece.py and test_cli.py."""
from __future__ import annotations

import os

import pytest

from megalite.atomic_text import atomic_text_file


def test_writes_the_text_with_the_usual_mode(tmp_path):
    path = tmp_path / "out.txt"
    with atomic_text_file(str(path), prefix=".tmp-x-") as f:
        f.write("héllo\n")
        # not in place yet: only the temporary name exists
        assert [p.name.startswith(".tmp-x-") for p in tmp_path.iterdir()] == [True]
    assert path.read_bytes() == "héllo\n".encode("utf-8")
    with open(tmp_path / "plain.txt", "w"):  # the mode the umask gives a plain open()
        pass
    assert os.stat(path).st_mode == os.stat(tmp_path / "plain.txt").st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "plain.txt"]


def test_an_error_in_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with pytest.raises(KeyError, match="boom"):
        with atomic_text_file(str(path)) as f:
            f.write("new\n")
            raise KeyError("boom")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
