"""Document masking in the GPT model (``--reset-position-ids``, ``--reset-attention-mask``,
``--eod-mask-loss``), one process, float32, both recipes (learned positions; RoPE with GQA).

* No leakage: changing every token of a document leaves the logits of the documents after it
  bitwise unchanged (each document's attention is computed from its own keys only; every
  other operation acts per token), and the same change does move them without the mask (so
  the test can fail).
* Equals unpacked: the packed loss with the three flags equals the token-weighted mean of each
  document's loss computed alone (a batch of one unpacked document) within 1e-6 relative: the
  same float32 operations on the same values, only the GEMMs over [tokens, h] and the sums over
  tokens are blocked/ordered differently (a few ulps, ~1e-7).
* Start-up: the flags need the tokenizer's eod id; BERT and T5 refuse them.
"""
from __future__ import annotations

import pytest
import torch

from megalite.data.documents import packed_gpt_collate
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import ConfigError
from megalite.model import get_preset
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext
from megalite.training.loss import GPTLoss
from megalite.training.prepare import parse_train_args

VOCAB, EOD = 200, 199
FLAGS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]


@pytest.fixture(params=["tiny", "tiny-llama"])
def model(request):
    cfg = get_preset(request.param).replace(vocab_size=VOCAB)
    model = GPTModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(3)
    return model.eval()


def documents(lengths, seed):
    """Documents of ``lengths`` content tokens in [0, EOD), each followed by EOD."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(0, EOD, (n,), generator=g), torch.tensor([EOD])])
            for n in lengths]


def run_config(*flags):
    """A TrainConfig whose data has a NullTokenizer (eod = vocab size - 1 = EOD)."""
    return parse_train_args(["--model-preset", "tiny", "--mock-data", "--tokenizer-type",
                             "NullTokenizer", "--vocab-size", str(VOCAB - 1), *flags])


def test_no_leakage_across_documents(model):
    collate = packed_gpt_collate(run_config(*FLAGS))
    docs = documents([20, 17, 30], seed=0)          # A, B, C (C cut by the sample's end)
    sample = torch.cat(docs)[:65]
    changed = sample.clone()
    changed[:20] = (sample[:20] + 1 + torch.arange(20)) % EOD        # every token of A, not EOD
    assert torch.all(changed[:20] != sample[:20]) and torch.all(changed[:20] != EOD)

    def logits(s, masked=True):
        mb = collate([s.numpy()]) if masked else {"tokens": s[None, :-1]}
        return model(mb["tokens"], position_ids=mb.get("position_ids"),
                     doc_ids=mb.get("doc_ids"))
    with torch.no_grad():
        before, after = logits(sample), logits(changed)
        assert torch.equal(before[:, 21:], after[:, 21:])            # B and C: bit for bit
        assert not torch.equal(before[:, :20], after[:, :20])
        plain = logits(sample, masked=False), logits(changed, masked=False)
        assert not torch.equal(plain[0][:, 21:], plain[1][:, 21:])   # leaks without the mask


def test_packed_loss_equals_the_documents_alone(model):
    collate = packed_gpt_collate(run_config(*FLAGS))
    rows = [documents([11, 25, 40], seed=1), documents([30, 50], seed=2)]
    samples = [torch.cat(docs)[:65] for docs in rows]
    mb = collate([s.numpy() for s in samples])
    assert set(mb) == {"tokens", "labels", "position_ids", "doc_ids", "loss_mask"}
    with torch.no_grad():
        per_token = model.forward_microbatch(None, mb)
        _, packed = GPTLoss(1)(per_token, mb)
        total, count = 0.0, 0
        for docs, sample in zip(rows, samples):
            used = 0
            for doc in docs:
                piece = doc[:65 - used]                 # the part of it inside the sample
                used += len(piece)
                if len(piece) < 2:
                    continue
                loss = model(piece[None, :-1], labels=piece[None, 1:])   # alone, unpacked
                total += loss.double().sum().item()
                count += loss.numel()
                if used == 65:
                    break
    assert count == int(mb["loss_mask"].sum())
    want = total / count
    assert abs(packed.item() - want) <= 1e-6 * abs(want), (packed.item(), want)


def test_flags_need_the_eod_id_and_only_gpt_takes_them():
    with pytest.raises(ConfigError, match="--eod-mask-loss needs the end-of-document id"):
        parse_train_args(["--model-preset", "tiny", "--mock-data", "--vocab-size", "100",
                          "--eod-mask-loss"])
    for family, extra in (("bert", []), ("t5", ["--decoder-seq-length", "16"])):
        with pytest.raises(ConfigError, match=f"--reset-position-ids is for GPT's packed "
                                              f"samples; --model-type {family}"):
            parse_train_args(["--model-type", family, "--model-preset", "tiny", "--mock-data",
                              "--vocab-size", "100", "--reset-position-ids", *extra])
