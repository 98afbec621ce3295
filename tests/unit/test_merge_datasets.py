"""``megalite merge-datasets`` never drops data silently: missing ``I-of-N`` shards and half
datasets (a ``.idx`` without its ``.bin`` or the reverse) are errors naming them, exit 2, nothing
written. Shards are built directly with the MMIDIDX builder (no tokenizer needed)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from megalite.cli import run_main
from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megalite.dataprep import merge_datasets


def shard_name(i: int, n: int = 3) -> str:
    return f"part_shard{i:05d}-of-{n:05d}_text_document"


def make_shards(directory, indices, n: int = 3) -> list[str]:
    """Shard i holds i + 1 documents of tokens [i, i]."""
    os.makedirs(directory, exist_ok=True)
    prefixes = []
    for i in indices:
        prefix = os.path.join(str(directory), shard_name(i, n))
        with IndexedDatasetBuilder(prefix, np.uint16) as b:
            for _ in range(i + 1):
                b.add_document([i, i])
            b.finalize()
        prefixes.append(prefix)
    return prefixes


def merge(inputs, out, capsys):
    rc = run_main(merge_datasets.main, ["--input", *map(str, inputs), "--output-prefix", str(out)])
    return rc, capsys.readouterr().err


def test_complete_shard_set_merges_in_order(tmp_path, capsys):
    make_shards(tmp_path / "s", [2, 0, 1])
    rc, err = merge([tmp_path / "s"], tmp_path / "m", capsys)
    assert rc == 0, err
    ds = IndexedDataset(str(tmp_path / "m"))
    assert [int(ds[d][0]) for d in range(ds.num_documents)] == [0, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("how", ["directory", "glob", "explicit"])
def test_a_missing_shard_is_refused_naming_it(how, tmp_path, capsys):
    prefixes = make_shards(tmp_path / "s", [0, 2])
    inputs = {"directory": [tmp_path / "s"], "glob": [tmp_path / "s" / "part_shard*_text_document"],
              "explicit": prefixes}[how]
    rc, err = merge(inputs, tmp_path / "m", capsys)
    assert rc == 2
    assert f"1 of 3 shards are missing: {tmp_path / 's' / shard_name(1)}" in err, err
    assert "--shard-index 1 --num-shards 3" in err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("m")]


def test_many_missing_shards_are_listed_up_to_ten(tmp_path, capsys):
    make_shards(tmp_path / "s", [0], n=20)
    rc, err = merge([tmp_path / "s"], tmp_path / "m", capsys)
    assert rc == 2 and "19 of 20 shards are missing" in err and "and 9 more" in err, err
    assert shard_name(10, 20) in err and shard_name(11, 20) not in err


@pytest.mark.parametrize("present, absent", [(".idx", ".bin"), (".bin", ".idx")])
@pytest.mark.parametrize("how", ["directory", "explicit"])
def test_half_a_dataset_is_an_error_naming_the_file(present, absent, how, tmp_path, capsys):
    prefixes = make_shards(tmp_path / "s", [0, 1, 2])
    os.unlink(prefixes[1] + absent)  # what a failed task or a partial copy leaves
    inputs = [tmp_path / "s"] if how == "directory" else prefixes
    rc, err = merge(inputs, tmp_path / "m", capsys)
    assert rc == 2
    assert f"{prefixes[1]}{present} has no {prefixes[1]}{absent}" in err, err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("m")]


def test_shards_of_two_runs_with_different_counts_are_refused(tmp_path, capsys):
    make_shards(tmp_path / "s", [0, 1, 2], n=3)
    make_shards(tmp_path / "s", [0, 1], n=2)
    rc, err = merge([tmp_path / "s"], tmp_path / "m", capsys)
    assert rc == 2 and "different shard counts (2 and 3)" in err, err


def test_a_shard_index_beyond_the_count_is_refused(tmp_path, capsys):
    make_shards(tmp_path / "s", [0, 1, 3], n=3)
    rc, err = merge([tmp_path / "s"], tmp_path / "m", capsys)
    assert rc == 2 and f"{shard_name(3)} says shard 3 of 3, which does not exist" in err, err


def test_output_prefix_under_a_regular_file_names_the_file(tmp_path, capsys):
    make_shards(tmp_path / "s", [0, 1, 2])
    (tmp_path / "notes.txt").write_text("not a directory")
    rc, err = merge([tmp_path / "s"], tmp_path / "notes.txt" / "m", capsys)
    assert rc == 2
    assert f"--output-prefix {tmp_path / 'notes.txt' / 'm'}: {tmp_path / 'notes.txt'} is a file" in err, err
