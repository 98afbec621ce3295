"""The shard rule of ``megalite preprocess`` (``megalite.dataprep.jsonl_input``), as a property:
for any files, shard count and chunk size, the shards' lines in shard order are exactly the lines
of the sorted files, each once, with the right line numbers; so shard outputs merge to the
unsharded output. Pure Python, no tokenizer: hypothesis can try many layouts quickly."""
from __future__ import annotations

import gzip
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megalite.dataprep.jsonl_input import ChunkReader, plan_shard, resolve_inputs, split_lines

line = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"x"))
a_file = st.tuples(st.lists(line, max_size=12), st.booleans(), st.booleans())  # lines, gz, final \n


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(a_file, min_size=1, max_size=4), num_shards=st.integers(1, 9),
       chunk_bytes=st.integers(1, 40))
def test_shards_partition_the_lines_in_order(files, num_shards, chunk_bytes):
    with tempfile.TemporaryDirectory() as d:
        expected = []
        for k, (lines, gz, final_newline) in enumerate(files):
            data = b"\n".join(lines) + (b"\n" if lines and final_newline else b"")
            lines = data.split(b"\n")  # what the file holds: "" is no line, "\n" one empty line
            if not data or data.endswith(b"\n"):
                lines.pop()
            path = os.path.join(d, f"f{k:02d}.jsonl" + (".gz" if gz else ""))
            if gz:
                with gzip.open(path, "wb") as f:
                    f.write(data)
            else:
                with open(path, "wb") as f:
                    f.write(data)
            expected += [(path, i + 1, ln) for i, ln in enumerate(lines)]
        paths = resolve_inputs([d])
        got = []
        for shard in range(num_shards):
            for piece in plan_shard(paths, shard, num_shards):
                reader = ChunkReader(piece, chunk_bytes)
                for offset, data in reader:
                    for j, ln in enumerate(split_lines(data)):
                        got.append((piece.path, reader.line_number(offset + j), ln))
        assert got == expected


def test_a_line_starting_exactly_at_a_shard_boundary(tmp_path):
    """Byte 10 ends line 1 and starts line 2: shard 1 of [0, 10) / [10, 20) owns line 2."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"123456789\n123456789\n")
    first = [ln for p in plan_shard([str(path)], 0, 2) for _, c in ChunkReader(p, 4) for ln in split_lines(c)]
    second = [ln for p in plan_shard([str(path)], 1, 2) for _, c in ChunkReader(p, 4) for ln in split_lines(c)]
    assert first == [b"123456789"] and second == [b"123456789"]
