"""The built-in English corpus: text that every Python installation carries, no downloads.

Two sources, in this order:

1. ``pydoc_data.topics.topics``: the help texts of ``help("TOPIC")`` (the language reference
   chapters), one document per topic, in sorted topic order.
2. Docstrings of a fixed allow-list of standard-library modules: one document for the module
   docstring, one per function, and one per class (the class docstring followed by the
   docstrings of its methods), members in sorted name order (dunder names left out).

Only modules whose import has no side effects are listed (no ``this``, ``antigravity``, GUI
toolkits, ...); a module missing from a trimmed-down Python build is skipped. Empty and duplicate
texts are dropped, so the output is deterministic for a given Python version (docstrings change
between Python releases, so the exact bytes do too).

It is the default corpus of the quickstart and of the tests.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import warnings
from typing import Iterator

# Modules whose import only defines things (no I/O, no printing, no threads started).
SAFE_MODULES = (
    "builtins", "abc", "argparse", "array", "ast", "asyncio", "asyncio.base_events",
    "asyncio.base_futures", "asyncio.base_subprocess", "asyncio.base_tasks", "asyncio.coroutines",
    "asyncio.events", "asyncio.exceptions", "asyncio.format_helpers", "asyncio.futures",
    "asyncio.locks", "asyncio.protocols", "asyncio.queues", "asyncio.runners",
    "asyncio.selector_events", "asyncio.sslproto", "asyncio.staggered", "asyncio.streams",
    "asyncio.subprocess", "asyncio.taskgroups", "asyncio.tasks", "asyncio.threads",
    "asyncio.timeouts", "asyncio.transports", "asyncio.trsock", "asyncio.unix_events", "base64",
    "bdb", "binascii", "bisect", "bz2", "calendar", "cmath", "cmd", "code", "codecs", "codeop",
    "collections", "collections.abc", "colorsys", "compileall", "concurrent.futures",
    "concurrent.futures.process", "concurrent.futures.thread", "configparser", "contextlib",
    "contextvars", "copy", "copyreg", "csv", "ctypes", "ctypes.util", "dataclasses", "datetime",
    "dbm", "dbm.dumb", "decimal", "difflib", "dis", "doctest", "email", "email.charset",
    "email.contentmanager", "email.encoders", "email.errors", "email.feedparser",
    "email.generator", "email.header", "email.headerregistry", "email.iterators", "email.message",
    "email.parser", "email.policy", "email.utils", "email._header_value_parser",
    "email._policybase", "encodings", "encodings.idna", "encodings.punycode", "enum", "errno",
    "faulthandler", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc",
    "genericpath", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq",
    "hmac", "html", "html.entities", "html.parser", "http", "http.client", "http.cookiejar",
    "http.cookies", "http.server", "imaplib", "importlib", "importlib.abc", "importlib.machinery",
    "importlib.metadata", "importlib.resources", "importlib.util", "importlib._bootstrap",
    "importlib._bootstrap_external", "inspect", "io", "ipaddress", "itertools", "json",
    "json.decoder", "json.encoder", "json.scanner", "keyword", "linecache", "locale", "logging",
    "logging.config", "logging.handlers", "lzma", "mailbox", "marshal", "math", "mimetypes",
    "mmap", "modulefinder", "multiprocessing", "multiprocessing.connection",
    "multiprocessing.context", "multiprocessing.heap", "multiprocessing.managers",
    "multiprocessing.pool", "multiprocessing.process", "multiprocessing.queues",
    "multiprocessing.reduction", "multiprocessing.shared_memory", "multiprocessing.sharedctypes",
    "multiprocessing.synchronize", "multiprocessing.util", "netrc", "numbers", "opcode",
    "operator", "optparse", "os", "os.path", "pathlib", "pdb", "pickle", "pickletools", "pkgutil",
    "platform", "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "py_compile",
    "pyclbr", "pydoc", "queue", "quopri", "random", "re", "re._compiler", "re._parser", "reprlib",
    "runpy", "sched", "secrets", "select", "selectors", "shelve", "shlex", "shutil", "signal",
    "site", "smtplib", "socket", "socketserver", "sqlite3", "sqlite3.dump", "ssl", "stat",
    "statistics", "string", "stringprep", "struct", "subprocess", "symtable", "sys", "sysconfig",
    "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "token",
    "tokenize", "tomllib", "tomllib._parser", "trace", "traceback", "tracemalloc", "types",
    "typing", "unicodedata", "unittest", "unittest.case", "unittest.loader", "unittest.main",
    "unittest.mock", "unittest.result", "unittest.runner", "unittest.suite", "unittest.util",
    "urllib", "urllib.error", "urllib.parse", "urllib.request", "urllib.response",
    "urllib.robotparser", "uuid", "warnings", "wave", "weakref", "wsgiref.handlers",
    "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate", "xml.dom",
    "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree", "xml.parsers.expat", "xml.sax",
    "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server",
    "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)


def _doc(obj) -> str:
    """The cleaned docstring of ``obj`` (its own, not an inherited one), or ``""``."""
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    return inspect.cleandoc(doc) if doc else ""


def _members(namespace: dict) -> list:
    """``(name, value)`` pairs in name order, dunders left out (their docs are boilerplate)."""
    return [(n, namespace[n]) for n in sorted(namespace) if not n.startswith("__")]


def _class_text(qualname: str, cls: type) -> str:
    parts = []
    head = _doc(cls)
    if head:
        parts.append(f"{qualname}\n\n{head}")
    for name, member in _members(vars(cls)):
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property):
            member = member.fget
        if member is None or not callable(member):
            continue
        text = _doc(member)
        if text:
            parts.append(f"{qualname}.{name}\n\n{text}")
    return "\n\n".join(parts)


def _module_texts(module_name: str) -> list[str]:
    # Importing a deprecated module, or touching a deprecated attribute (typing.io), warns; that
    # is not the corpus reader's business. The list is built inside the filter, not yielded from
    # it, because a generator would leave the process-wide warning filter changed between items.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # e.g. a Python built without sqlite3/ssl/lzma
            return []
        texts = []
        text = _doc(module)
        if text:
            texts.append(f"Module {module_name}\n\n{text}")
        for name, obj in _members(vars(module)):
            # Only what the module itself defines: re-exports would duplicate other modules' docs.
            if module_name != "builtins" and getattr(obj, "__module__", None) != module.__name__:
                continue
            qualname = f"{module_name}.{name}"
            if inspect.isclass(obj):
                texts.append(_class_text(qualname, obj))
            elif callable(obj):
                text = _doc(obj)
                if text:
                    texts.append(f"{qualname}\n\n{text}")
        return texts


def iter_builtin_texts() -> Iterator[str]:
    """Yield the corpus documents (non-empty, distinct strings) in their fixed order.

    This reads the modules as this process sees them: a test runner or library that replaced a
    standard-library function (pytest swaps ``sys.unraisablehook``) changes the result. Use
    :func:`write_builtin_corpus`, which runs it in a fresh interpreter, for the reproducible corpus.
    """
    from pydoc_data.topics import topics

    seen = set()
    sources = (topics[k] for k in sorted(topics))
    for source in (sources, *(_module_texts(m) for m in SAFE_MODULES)):
        for text in source:
            text = text.strip()
            if text and text not in seen:
                seen.add(text)
                yield text


def _write_here(path: str, max_documents: int | None) -> int:
    from megalite.atomic_text import atomic_text_file  # here: the __main__ block sets sys.path

    count = 0
    with atomic_text_file(path, prefix=".tmp-corpus-") as f:
        for text in iter_builtin_texts():
            if max_documents is not None and count >= max_documents:
                break
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_builtin_corpus(path: str, max_documents: int | None = None) -> int:
    """Write the corpus as jsonl lines ``{"text": ...}`` to ``path``; return the document count.

    ``max_documents`` keeps only the first documents. The work runs in a fresh, isolated
    interpreter (``python -I -S`` on this file, which imports only the standard library and the
    stdlib-only :mod:`megalite.atomic_text`), so the
    bytes depend only on the Python installation, not on what the calling process has imported
    or patched, and the ~200 module imports stay out of the caller. The file is written under a
    temporary name in the same directory and renamed into place.
    """
    from megalite.errors import MegaliteError  # not at the top: this file also runs under -I -S

    limit = "-1" if max_documents is None else str(int(max_documents))
    proc = subprocess.run([sys.executable, "-I", "-S", os.path.abspath(__file__), str(path), limit],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise MegaliteError(f"writing the built-in corpus to {path} failed: "
                            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return int(proc.stdout.strip())


if __name__ == "__main__":  # the fresh interpreter of write_builtin_corpus
    # -I leaves this file's directory off sys.path; the package root goes after the standard
    # library, so the corpus modules cannot be shadowed by it.
    sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    _limit = int(sys.argv[2])
    print(_write_here(sys.argv[1], None if _limit < 0 else _limit))
