"""Checkpoint files in one process: exact round trip, manifest checks, safe loading, atomicity.

Real files, a real GPTModel and torch.optim.AdamW (standing in for megalite's optimizer: its
state_dict is the same kind of nested dict of tensors), and a real process killed with SIGKILL
mid-save. Exactness: a round trip must be bitwise (torch.equal), as must the random numbers
drawn after restoring the RNG states.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from megalite.checkpoint import (capture_rng_states, list_checkpoints, load_checkpoint,
                                 load_model_weights, read_model_config, restore_rng_states,
                                 save_checkpoint)
from megalite.checkpoint import io as ckio
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model import get_preset
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext

PS = ParallelState.single()
CFG = get_preset("tiny").replace(vocab_size=203, hidden_dropout=0.1)


def make(seed: int, cfg=CFG):
    """A model whose optimizer has taken one real step (non-trivial Adam moments)."""
    torch.manual_seed(seed)
    model = GPTModel(cfg, ModelContext(PS))
    model.init_weights(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():     # gradients need not come from a loss to fill Adam's state
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad()
    return model, opt


def save(directory, iteration, model, opt, **kw):
    return save_checkpoint(str(directory), iteration, model_chunks=[model], optimizer=opt,
                           config={"note": "test"}, ps=PS,
                           extra={"consumed_samples": 7 * iteration},
                           **kw)


def load(directory, seed=99, **kw):
    model, opt = make(seed)
    out = load_checkpoint(str(directory), model_chunks=[model], optimizer=opt, ps=PS, **kw)
    return out, model, opt


def draws(tracker):
    with tracker.fork():
        tp = torch.rand(3)
    return (random.random(), float(np.random.rand()), torch.rand(3), tp)


def assert_same_state(a, b):
    for (n, x), (m, y) in zip(a[0].named_parameters(), b[0].named_parameters(), strict=True):
        assert n == m and torch.equal(x, y), n
    sa, sb = a[1].state_dict(), b[1].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][k][key], sb["state"][k][key]), (k, key)


def test_round_trip_is_bitwise_including_rng(tmp_path):
    model, opt = make(1)
    path = save(tmp_path, 10, model, opt)
    expected = draws(model.rng_tracker)        # what follows the saved RNG states
    random.seed(5), np.random.seed(5), torch.manual_seed(5)   # scramble every stream
    out, model2, opt2 = load(tmp_path)
    assert out["iteration"] == 10 and out["consumed_samples"] == 70
    assert out["checkpoint_dir"] == path and out["rng_restored"] and not out["layout_changed"]
    assert_same_state((model, opt), (model2, opt2))
    got = draws(model2.rng_tracker)
    assert got[:2] == expected[:2]
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    # Training continues bitwise: one more identical step from both.
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    for m, o in ((model, opt), (model2, opt2)):
        torch.manual_seed(8)
        m.rng_tracker.set_states(model.rng_tracker.get_states())
        m(ids, labels=ids).mean().backward()
        o.step()
    assert_same_state((model, opt), (model2, opt2))


def test_rng_states_round_trip_alone():
    tracker = GPTModel(CFG, ModelContext(PS)).rng_tracker
    states = capture_rng_states(tracker)
    expected = draws(tracker)
    restore_rng_states(states, tracker)
    got = draws(tracker)
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    assert torch.equal(got[3], expected[3])


def test_directory_layout_manifest_and_metadata(tmp_path):
    model, opt = make(1)
    path = save(tmp_path, 100, model, opt)
    assert os.path.basename(path) == "iter_0000100"
    assert (tmp_path / "latest").read_text() == "iter_0000100\n"
    assert sorted(os.listdir(path)) == ["config.json", "manifest.json", "meta.json",
                                        "model_tp00_pp00.safetensors", "rank_00000.pt"]
    manifest = json.loads((tmp_path / "iter_0000100" / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["config.json", "meta.json", "model_tp00_pp00.safetensors",
                                "rank_00000.pt"]
    for name, entry in manifest.items():
        assert ckio.finish_file(os.path.join(path, name)) == (entry["size"], entry["sha256"])
    meta = json.loads((tmp_path / "iter_0000100" / "meta.json").read_text())
    assert meta["iteration"] == 100 and meta["extra"] == {"consumed_samples": 700}
    assert meta["layout"] == {"tp_size": 1, "pp_size": 1, "dp_size": 1, "vp_size": 1,
                              "world_size": 1, "ep_size": 1}
    qkv = meta["tensors"]["layers.0.attention.linear_qkv.weight"]
    assert qkv["tensor_parallel_dim"] == 0 and qkv["full_shape"] == [3 * 64, 64]
    with safe_open(os.path.join(path, "model_tp00_pp00.safetensors"), "pt") as f:
        header = json.loads(f.metadata()["megalite"])
        assert header["tensors"] == meta["tensors"]
        assert torch.equal(f.get_tensor("final_norm.weight"), model.final_norm.weight)
    state = torch.load(os.path.join(path, "rank_00000.pt"), weights_only=True)
    assert set(state) >= {"optimizer", "rng", "param_names"}
    assert read_model_config(str(tmp_path)) == CFG


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("victim", ["model_tp00_pp00.safetensors", "rank_00000.pt"])
def test_damaged_file_is_named(tmp_path, damage, victim):
    model, opt = make(1)
    save(tmp_path, 2, model, opt)
    path = save(tmp_path, 3, model, opt)
    target = os.path.join(path, victim)
    data = bytearray(open(target, "rb").read())
    if damage == "flip":        # same size: only the checksum can notice
        data[len(data) // 2] ^= 0x40
        open(target, "wb").write(data)
    elif damage == "truncate":
        open(target, "wb").write(data[:-100])
    else:
        os.remove(target)
    expect = {"flip": "sha256", "truncate": "bytes", "delete": "missing"}[damage]
    with pytest.raises(MegaliteError, match=expect) as info:
        load(tmp_path)
    assert target in str(info.value)
    assert "older checkpoints in" in str(info.value) and "iter_0000002" in str(info.value)


def test_flip_passes_without_checksums_but_size_is_always_checked(tmp_path):
    # Documents the trade-off of verify_checksums=False: sizes still, contents no longer.
    model, opt = make(1)
    path = save(tmp_path, 3, model, opt)
    target = os.path.join(path, "meta.json")
    with open(target, "ab") as f:
        f.write(b" ")
    with pytest.raises(MegaliteError, match="meta.json has"):
        load(tmp_path, verify_checksums=False)


class _Payload:
    """Unpickling this runs a shell command (the classic pickle attack)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, container):
    model, opt = make(1)
    path = save(tmp_path, 4, model, opt)
    marker = tmp_path / "PWNED"
    target = os.path.join(path, "rank_00000.pt")
    evil = {"format": "megalite-checkpoint-1", "optimizer": _Payload(marker)}
    if container == "torch.save":
        torch.save(evil, target)
    else:
        with open(target, "wb") as f:
            pickle.dump(evil, f)
    # The attacker rewrites the manifest too, so size and checksum checks pass.
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_path))
    size, digest = ckio.finish_file(target)
    manifest["files"]["rank_00000.pt"] = {"size": size, "sha256": digest}
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(MegaliteError, match="refusing to load .*rank_00000.pt"):
        load(tmp_path)
    assert not marker.exists(), "the payload ran"
    # Sanity check of the test itself: an unrestricted load would have run it.
    torch.load(target, weights_only=False) if container == "torch.save" else \
        pickle.load(open(target, "rb"))
    assert marker.exists()


def test_unloadable_state_is_refused_at_save_and_nothing_changes(tmp_path):
    model, opt = make(1)
    save(tmp_path, 1, model, opt)

    class Odd(torch.optim.AdamW):
        def state_dict(self):
            return {"scaler": object()}

    odd = Odd(model.parameters())
    with pytest.raises(MegaliteError, match=r"'/optimizer/scaler' is a builtins.object"):
        save(tmp_path, 2, model, odd)
    assert [n for _, n in list_checkpoints(str(tmp_path))] == ["iter_0000001"]
    assert ckio.read_latest(str(tmp_path)) == "iter_0000001"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_no_checkpoint_bad_latest_and_explicit_iteration(tmp_path):
    assert load_checkpoint(str(tmp_path / "nothing"), model_chunks=[make(1)[0]], optimizer=None,
                           ps=PS) is None
    model, opt = make(1)
    save(tmp_path, 1, model, opt)
    save(tmp_path, 2, model, opt)
    assert load(tmp_path, iteration=1)[0]["iteration"] == 1
    with pytest.raises(MegaliteError, match="no checkpoint for iteration 5"):
        load(tmp_path, iteration=5)
    (tmp_path / "latest").write_text("../../etc/passwd\n")
    with pytest.raises(MegaliteError, match="does not name a checkpoint"):
        load(tmp_path)
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(MegaliteError, match="iter_0000009 does not exist"):
        load(tmp_path)
    os.remove(tmp_path / "latest")      # no pointer: the newest complete checkpoint
    assert load(tmp_path)[0]["iteration"] == 2


def test_keep_last_prunes_only_after_newer_is_complete_and_stale_tmp_is_ignored(tmp_path):
    model, opt = make(1)
    for it in (1, 2, 3):
        save(tmp_path, it, model, opt, keep_last=2)
    assert [n for _, n in list_checkpoints(str(tmp_path))] == ["iter_0000002", "iter_0000003"]
    # A crashed save's leftovers: ignored by load, removed by the next save.
    stale = tmp_path / "iter_0000004.tmp-deadbeef"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    assert load(tmp_path)[0]["iteration"] == 3
    # A failing save (unloadable state) must not prune anything.
    class Odd(torch.optim.AdamW):
        def state_dict(self):
            return {"bad": object()}
    with pytest.raises(MegaliteError):
        save(tmp_path, 4, model, Odd(model.parameters()), keep_last=1)
    assert [n for _, n in list_checkpoints(str(tmp_path))] == ["iter_0000002", "iter_0000003"]
    save(tmp_path, 5, model, opt, keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000005", "latest"]


def test_saving_the_same_iteration_again_replaces_it(tmp_path):
    model, opt = make(1)
    save(tmp_path, 7, model, opt)
    model2, opt2 = make(2)
    save(tmp_path, 7, model2, opt2)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000007", "latest"]
    _, m, o = load(tmp_path)
    assert_same_state((model2, opt2), (m, o))
    # Crash between moving the old one aside and renaming the new one in: still loadable,
    # and the next save puts it back before cleaning.
    os.rename(tmp_path / "iter_0000007", tmp_path / "iter_0000007.del-abc123")
    _, m, o = load(tmp_path)
    assert_same_state((model2, opt2), (m, o))
    save(tmp_path, 8, model, opt)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000007", "iter_0000008", "latest"]


def test_weights_into_a_different_model_config_are_refused(tmp_path):
    model, opt = make(1)
    save(tmp_path, 1, model, opt)
    other = GPTModel(CFG.replace(activation="gelu_tanh"), ModelContext(PS))
    with pytest.raises(MegaliteError, match="activation: checkpoint 'gelu', model 'gelu_tanh'"):
        load_model_weights(str(tmp_path), [other], PS)
    # Fields that do not change the weights' meaning may differ (dropout, padding multiple).
    looser = GPTModel(CFG.replace(hidden_dropout=0.0, make_vocab_size_divisible_by=8),
                      ModelContext(PS))
    assert load_model_weights(str(tmp_path), [looser], PS) == {"note": "test"}
    w = looser.embedding.word_embeddings.weight
    assert w.shape[0] == 208 and torch.equal(w[:203], model.embedding.word_embeddings.weight[:203])
    assert not w[203:].any()


# -- kill -9 mid-save -----------------------------------------------------------------------------
KILL_CFG = get_preset("tiny").replace(num_layers=4, hidden_size=256, vocab_size=1000)
SAVER = textwrap.dedent("""
    import sys, torch
    from megalite.checkpoint import save_checkpoint, resolve_checkpoint
    from megalite.checkpoint.io import read_latest
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model import get_preset
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext
    directory = sys.argv[1]
    ps = ParallelState.single()
    # ~3.5M parameters: model + two Adam moments, about 45 MB per checkpoint.
    cfg = get_preset("tiny").replace(num_layers=4, hidden_size=256, vocab_size=1000)
    model = GPTModel(cfg, ModelContext(ps))
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    latest = read_latest(directory)
    it = int(latest[5:]) if latest else 0
    while True:
        it += 1
        with torch.no_grad():
            for p in model.parameters():   # every tensor encodes the iteration
                p.fill_(float(it))
        save_checkpoint(directory, it, model_chunks=[model], optimizer=opt, config={}, ps=ps,
                        extra={"it": it}, keep_last=3)
        print("saved", it, flush=True)
""")


def test_kill_9_mid_save_leaves_the_previous_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    rng = random.Random(0)
    killed_mid_write = 0
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(directory)],
                                stdout=subprocess.PIPE, text=True)
        try:
            last = int(proc.stdout.readline().split()[1])   # one complete save in this run
            # Wait until the next save is writing its temporary directory, then kill at a
            # random moment inside it (or, sometimes, right after it finished).
            deadline = time.monotonic() + 60
            while not any(".tmp-" in n for n in os.listdir(directory)):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.15) * attempt)
        finally:
            proc.kill()
            proc.wait()
        killed_mid_write += any(".tmp-" in n for n in os.listdir(directory))
        model = GPTModel(KILL_CFG, ModelContext(PS))
        out = load_checkpoint(str(directory), model_chunks=[model], optimizer=None, ps=PS)
        # The loaded checkpoint is complete and self-consistent, and no older than the last
        # save this run reported.
        assert out["iteration"] >= last and out["it"] == out["iteration"]
        for name, p in model.named_parameters():
            vocab = name.endswith("word_embeddings.weight")
            expect = p[:1000] if vocab else p
            assert torch.all(expect == out["iteration"]), name
        for it, name in list_checkpoints(str(directory)):
            ckio.verify_manifest(str(directory / name))
    # The test is only meaningful if at least one kill hit a save in progress.
    assert killed_mid_write >= 1


def test_non_json_extra_fails_the_save_cleanly(tmp_path):
    model, opt = make(1)
    with pytest.raises(MegaliteError, match="meta.json is not JSON-serializable"):
        save_checkpoint(str(tmp_path), 1, model_chunks=[model], optimizer=opt, config={},
                        ps=PS, extra={"sampler": object()})
    assert os.listdir(tmp_path) == []
    # A checkpoint directory itself (not its parent) is accepted too.
    path = save(tmp_path, 2, model, opt)
    fresh = GPTModel(CFG, ModelContext(PS))
    load_model_weights(path, [fresh], PS)
    assert torch.equal(fresh.final_norm.weight, model.final_norm.weight)


def test_bit_flips_without_checksums_give_clear_errors_or_load(tmp_path):
    """With verify_checksums=False a flipped bit in a header or pickle must still end in a
    MegaliteError (or a load of wrong numbers, which is what the checksums are for), never
    another exception or a crash."""
    import shutil
    model, opt = make(1)
    save(tmp_path / "good", 1, model, opt)
    rng = random.Random(0)
    names = ["model_tp00_pp00.safetensors", "rank_00000.pt", "meta.json", "manifest.json"]
    refused = 0
    for trial in range(20):
        work = tmp_path / f"t{trial}"
        shutil.copytree(tmp_path / "good", work)
        target = work / "iter_0000001" / rng.choice(names)
        data = bytearray(target.read_bytes())
        data[rng.randrange(min(len(data), 4096))] ^= 1 << rng.randrange(8)   # headers live here
        target.write_bytes(data)
        try:
            load(work, verify_checksums=False)
        except MegaliteError:
            refused += 1     # any other exception fails the test
    assert refused >= 1      # the flips did reach the error paths (13 of 20 with this seed)
