"""Bad input to the MMIDIDX builder: clear errors naming the dataset, nothing left on disk.

Token values that do not fit the dtype, malformed arrays and arguments, a failing write (a
file-size limit in a subprocess), and a builder inherited by a forked child.
"""
import gc
import os
import subprocess
import sys

import numpy as np
import pytest

from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megalite.errors import DataFormatError, MegaliteError


@pytest.mark.parametrize("dtype,tokens,pattern", [
    (np.uint16, [1, 70000], r"token id 70000 \(position 1\) does not fit the dataset dtype uint16"),
    (np.uint16, [-1], r"token id -1 .* uint16 \[0, 65535\]"),
    (np.int32, np.array([2**31], dtype=np.uint64), r"token id 2147483648 .* int32"),
    (np.int32, [-2**31 - 1], r"token id -2147483649 .* int32"),
    (np.uint8, [256], r"token id 256 .* uint8"),
    (np.uint16, [1.5, 2.0], r"token.*integers, got dtype float64"),
    (np.uint16, [[1, 2]], r"must be 1-D"),
    (np.uint16, [[1, 2], [3]], r"must be a 1-D integer array"),
    (np.uint16, [True, False], r"integers, got dtype bool"),
])
def test_tokens_that_do_not_fit_are_clear_errors(tmp_path, dtype, tokens, pattern):
    with pytest.raises(DataFormatError, match=pattern) as err:
        with IndexedDatasetBuilder(str(tmp_path / "ds"), dtype) as b:
            b.add_document(tokens)
    assert str(tmp_path / "ds") in str(err.value)
    assert os.listdir(tmp_path) == []


def test_bad_builder_arguments(tmp_path):
    p = str(tmp_path / "ds")
    with pytest.raises(DataFormatError, match="unsupported token dtype"):
        IndexedDatasetBuilder(p, np.complex64)
    with pytest.raises(DataFormatError, match="unsupported token dtype 'no-such-type'"):
        IndexedDatasetBuilder(p, "no-such-type")
    (tmp_path / "afile").write_text("")
    with pytest.raises(MegaliteError, match="cannot write dataset .*afile/ds"):
        IndexedDatasetBuilder(str(tmp_path / "afile" / "ds"), np.uint16)
    with IndexedDatasetBuilder(p, np.uint16) as b:
        with pytest.raises(DataFormatError, match="sum to 3 but 2 tokens were given"):
            b.add_document([1, 2], [1, 2])
        with pytest.raises(DataFormatError, match=r"length -1 \(sequence 1 of this call\) is not in"):
            b.add_document([1, 2], [3, -1])
        with pytest.raises(DataFormatError, match="sum to 1 but 2 tokens were given"):
            b.add_documents([1, 2], [1])
        with pytest.raises(DataFormatError, match="1-D integer"):
            b.add_documents([1, 2], [1.0, 1.0])
        b.add_item([1])
        with pytest.raises(DataFormatError, match="still open"):
            b.add_documents([1, 2], [1, 1])
        with pytest.raises(DataFormatError, match="not multimodal"):
            b.add_item([1], mode=3)
    with IndexedDatasetBuilder(p, np.uint16, multimodal=True) as b:
        with pytest.raises(DataFormatError, match="does not fit int8"):
            b.add_item([1], mode=200)
        with pytest.raises(DataFormatError):
            b.add_item([1], mode=2**40)
        with pytest.raises(DataFormatError, match="modes for 2 sentences"):
            b.add_document([1, 2], [1, 1], mode=[1, 2, 3])
    os.makedirs(tmp_path / "ro")
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # root ignores permissions
            with pytest.raises(MegaliteError, match="cannot write dataset.*ro/ds"):
                IndexedDatasetBuilder(str(tmp_path / "ro" / "ds"), np.uint16)
    finally:
        os.chmod(tmp_path / "ro", 0o700)


_WRITE_FAILS = r"""
import os, resource, signal, sys
import numpy as np
from megalite.data.indexed import IndexedDatasetBuilder
from megalite.errors import MegaliteError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so an oversized write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    with IndexedDatasetBuilder(sys.argv[1], np.int32) as b:
        for _ in range(4):
            b.add_document(np.arange(300_000))
        b.finalize()
except MegaliteError as e:
    print("ERROR", e)
"""


def test_write_error_is_clear_and_cleans_up(tmp_path):
    """A failing write (here: a 1 MiB file-size limit, EFBIG) is one clear error, and nothing is left."""
    r = subprocess.run([sys.executable, "-c", _WRITE_FAILS, str(tmp_path / "ds")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERROR cannot write dataset " + str(tmp_path / "ds")), r.stdout
    assert "File too large" in r.stdout and "ds.bin.tmp-" in r.stdout
    assert os.listdir(tmp_path) == []


def test_forked_child_neither_writes_nor_removes_the_parents_files(tmp_path):
    """A child forked while a builder is open (e.g. a fork-based worker pool) must not touch it:
    writes raise, and dropping its copy leaves the parent's temporaries alone."""
    prefix = str(tmp_path / "ds")
    b = IndexedDatasetBuilder(prefix, np.uint16)
    b.add_document([1, 2])
    pid = os.fork()
    if pid == 0:  # child: report through the exit status, never return into pytest
        code = 0
        try:
            b.add_document([3])
            code = 1
        except MegaliteError as e:
            code = 0 if "belongs to the process" in str(e) else 2
        b.abort()
        del b
        gc.collect()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    b.add_document([4])
    b.finalize()
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [4]] and ds.num_documents == 2
