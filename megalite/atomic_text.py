"""Write a text file all at once or not at all: a temporary name in the same directory, then a
rename into place.

Standard library only, on purpose: :mod:`megalite.data.builtin_corpus` imports it inside its
fresh ``python -I -S`` interpreter, where nothing else is importable.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_text_file(path: str, prefix: str = ".tmp-") -> Iterator[IO[str]]:
    """Yield a UTF-8 text file that becomes ``path`` when the block ends without an exception.

    The file is ``prefix`` + random letters in ``path``'s directory until then; an exception in
    the block (or in the rename) removes it and leaves ``path`` as it was. The result has the
    mode ``open(path, "w")`` would give (0666 less the umask), not mkstemp's 0600. No fsync: for
    outputs a rerun rewrites, not for checkpoints (``megalite.checkpoint.io`` has those rules).
    """
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        umask = os.umask(0)  # the only way to read the umask is to set it
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
