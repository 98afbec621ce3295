"""The three conversions behind ``megalite convert`` (see :mod:`megalite.convert.cli`), each
writing into a temporary directory ``tmp`` that the CLI renames into place on success.

Every tensor goes through the one name map of its model (``param_mappings`` of the model
family's ``hf_converter``, :mod:`megalite.families`), one parameter at a time.
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys

import numpy as np
import torch

from megalite.convert import config_from_hf
from megalite.families import family_of
from megalite.model.weights import WORD_EMBEDDINGS
from megalite.convert.hf_io import HFReader, HFShardedWriter, progress
from megalite.convert.hf_tokenizer import import_tokenizer, write_tokenizer_files
from megalite.convert.offline import CheckpointReader, write_checkpoint
from megalite.errors import MegaliteError

__all__ = ["to_hf", "from_hf", "reshard", "verify_logits"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _train_config(path: str):
    from megalite.checkpoint import read_train_config
    try:
        return read_train_config(path)
    except MegaliteError as e:
        print(f"warning: {e}; continuing without the training config", file=sys.stderr)
        return None


def _tokenizer_of(train_config, ckpt_path: str) -> tuple[str | None, str | None, str | None]:
    """(tokenizer_model, tokenizer_type, vocab_file) of a checkpoint's config; a relative path
    is found as ``megalite generate`` finds it (the working directory, else beside the
    checkpoint)."""
    from megalite.checkpoint.io import locate_beside_checkpoint
    data = getattr(train_config, "data", None)
    if data is not None:
        data = dataclasses.asdict(data)
    elif isinstance(train_config, dict) and isinstance(train_config.get("data"), dict):
        data = train_config["data"]
    else:
        return None, None, None
    where = os.path.dirname(ckpt_path)
    return (locate_beside_checkpoint(data.get("tokenizer_model"), where),
            data.get("tokenizer_type"), locate_beside_checkpoint(data.get("vocab_file"), where))


# -- megalite -> Hugging Face -----------------------------------------------------------------
def to_hf(args, tmp: str) -> str:
    reader = CheckpointReader(args.load, verify_checksums=not args.no_verify_checksums)
    try:
        cfg = reader.config
        mod = family_of(cfg).hf_converter
        rows = reader.meta_tensor(WORD_EMBEDDINGS).shape[0]
        maps = mod.param_mappings(cfg, rows)
        out_dtype = _DTYPES.get(args.dtype)
        specs = []
        for m in maps:   # shapes from the meta device: nothing read yet
            outs = m.to_hf(reader.meta_tensor(m.megalite))
            specs += [(n, out_dtype or t.dtype, tuple(t.shape)) for n, t in zip(m.hf, outs)]
        extra = mod.extra_tensors(cfg, out_dtype or specs[0][1])   # no megalite tensor behind
        specs += [(n, t.dtype, tuple(t.shape)) for n, t in extra.items()]
        writer = HFShardedWriter(tmp, specs, int(args.max_shard_size * 1e9))
        bar = progress(len(maps), "to-hf")
        for m in maps:
            outs = m.to_hf(reader.full(m.megalite))
            for n, t in zip(m.hf, outs):
                writer.write(n, t.to(out_dtype) if out_dtype else t)
            del outs
            bar.update(1)
        for n, t in extra.items():
            writer.write(n, t)
        bar.close()
        writer.close()
        train_config = _train_config(reader.path)
        tok_model, tok_type, vocab_file = _tokenizer_of(train_config, reader.path)
        tok_files, ids = write_tokenizer_files(tok_model, tok_type, tmp,
                                               cfg.max_position_embeddings, vocab_file)
        hf_cfg = mod.config_to_hf(cfg)
        hf_cfg.dtype = str(specs[0][1]).removeprefix("torch.")
        fields = {} if ids is None else ids.config_fields()
        if cfg.is_encoder_decoder:
            fields.update(_seq2seq_fields(cfg, train_config, reader.path, fields))
        if ids is not None or fields:
            # HF generate stops at eos_token_id: without it, it runs past </s>.
            for key, value in fields.items():
                setattr(hf_cfg, key, value)
            from transformers import GenerationConfig
            GenerationConfig(**fields).save_pretrained(tmp)
        else:
            print("warning: no tokenizer files written, so config.json names no eos/bos "
                  "token ids", file=sys.stderr)
        hf_cfg.save_pretrained(tmp)
        ckpt_path = reader.path
    finally:
        reader.close()
    msg = (f"converted {ckpt_path} (TP={reader.tp} PP={reader.meta['layout']['pp_size']}) to "
           f"{hf_cfg.architectures[0]}: {len(specs)} tensors in {len(writer.names)} file(s)"
           + (f", tokenizer files {tok_files}" if tok_files else ""))
    if args.verify:
        err = verify_logits(ckpt_path, tmp, args)
        msg += f"; verified: max |logit difference| {err:.3g}"
    return msg


def _seq2seq_fields(cfg, train_config, ckpt_path: str, fields: dict) -> dict:
    """An encoder-decoder's decoder start, eos and pad ids for HF's configs: those megalite
    generates with (:func:`megalite.inference.seq2seq_tokens.seq2seq_ids`: for a WordPiece run,
    the T5 data's [BOS] and [EOS], [PAD]), else the model's start id (or the tokenizer's bos)."""
    from megalite.checkpoint.io import locate_beside_checkpoint
    from megalite.data.tokenizers import build_tokenizer
    from megalite.inference.seq2seq_tokens import seq2seq_ids
    data = getattr(train_config, "data", None)
    if data is not None and data.tokenizer_type in ("BertWordPieceLowerCase",
                                                    "BertWordPieceCase"):
        vocab = locate_beside_checkpoint(data.vocab_file, os.path.dirname(ckpt_path))
        try:
            tok = build_tokenizer(data.tokenizer_type, vocab_file=vocab)
        except MegaliteError as e:
            print(f"warning: {e}; config.json names no decoder start id", file=sys.stderr)
            return {}
        special = seq2seq_ids(tok, cfg, train_config)
        return {"decoder_start_token_id": special.start, "eos_token_id": special.stop,
                "pad_token_id": special.pad}
    start = cfg.decoder_start_token_id
    return {"decoder_start_token_id": start if start is not None else fields.get("bos_token_id")}


# -- Hugging Face -> megalite -----------------------------------------------------------------
def from_hf(args, tmp: str) -> str:
    hf = HFReader(args.load)
    try:
        hf_cfg = config_from_hf(hf.config, set(hf.names()), hf.get)
        family = family_of(hf_cfg)
        # The tokenizer goes beside iter_* (SAVE/tokenizer/), named in config.json by its final
        # absolute path, so `megalite train/generate --load SAVE` find it from any directory.
        tokenizer, tok_fields = import_tokenizer(
            args.load, os.path.join(tmp, "tokenizer"),
            os.path.join(os.path.abspath(args.save), "tokenizer"), hf_cfg.vocab_size,
            family.hf_converter.TOKENIZER_FILES)
        cfg = hf_cfg
        if tokenizer is not None and tok_fields["tokenizer_type"].startswith("BertWordPiece"):
            # The model holds every id its data uses (BERT's appends [BOS] and [EOS] to
            # vocab.txt): rows the HF model lacks start at zero.
            cfg = hf_cfg.replace(vocab_size=max(hf_cfg.vocab_size, family.tokenizer_vocab_size(
                tokenizer, None)))
        maps = {m.megalite: m for m in family.hf_converter.param_mappings(
            hf_cfg, cfg.padded_vocab(1))}
        _check_hf_names(hf, maps, hf_cfg, args.load)
        out_dtype = _DTYPES.get(args.dtype)

        def dtype_of(name: str) -> torch.dtype:
            m = maps.get(name) or maps[WORD_EMBEDDINGS]     # tied output copy
            return out_dtype or hf.meta_tensor(m.hf[0]).dtype

        def full_of(name: str) -> torch.Tensor:
            m = maps.get(name)
            if m is None:
                raise MegaliteError(f"the name map has no entry for megalite tensor {name}")
            return m.from_hf(*(hf.get(n) for n in m.hf))

        tp, pp = args.target_tensor_parallel_size, args.target_pipeline_model_parallel_size
        ep = _target_ep(args, cfg)
        config_dict, config_type = _new_train_config(None, cfg, tp, pp, tok_fields, ep=ep)
        extra = {"consumed_samples": 0, "skipped_iters": 0, "weights_only": True,
                 "converted_from": f"hf:{os.path.abspath(args.load)}"}
        ckpt = write_checkpoint(tmp, cfg, tp, pp, full_of, dtype_of, config_dict=config_dict,
                                config_type=config_type, extra=extra, desc="from-hf", ep=ep)
    finally:
        hf.close()
    tok_file = tok_fields.get("tokenizer_model") or tok_fields.get("vocab_file")
    msg = (f"converted {hf.config.model_type} model {args.load} to a megalite checkpoint "
           f"(TP={tp} PP={pp}{f' EP={ep}' if ep > 1 else ''}, weights only, tokenizer "
           + (f"{tok_fields['tokenizer_type']} {os.path.basename(tok_file)}" if tok_fields
              else "none found")
           + (f"; vocabulary {hf_cfg.vocab_size} -> {cfg.vocab_size} for its data"
              if cfg.vocab_size != hf_cfg.vocab_size else "") + ")")
    if args.verify:
        err = verify_logits(ckpt, args.load, args)
        msg += f"; verified: max |logit difference| {err:.3g}"
    return msg


def _check_hf_names(hf: HFReader, maps: dict, cfg, where: str) -> None:
    expected = {n for m in maps.values() for n in m.hf}
    names = set(hf.names())
    ignorable = set(family_of(cfg).hf_converter.ignored_names(cfg, names))
    missing = sorted(expected - names)
    unexpected = sorted(names - expected - ignorable)
    if missing or unexpected:
        raise MegaliteError(f"{where}: the weights do not match the {hf.config.model_type} "
                            f"config: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _target_ep(args, cfg) -> int:
    """``--target-expert-model-parallel-size``, checked against the model's experts."""
    ep = getattr(args, "target_expert_model_parallel_size", 1)
    experts = getattr(cfg, "num_experts", None) or 0
    if ep < 1 or (ep > 1 and (not experts or experts % ep)):
        raise MegaliteError(f"--target-expert-model-parallel-size {ep} must be 1 or divide "
                            f"the model's --num-experts ({experts or 'no MoE layers'})")
    return ep


def _new_train_config(train_config, model_cfg, tp: int, pp: int,
                      tokenizer: dict | None = None, ep: int = 1) -> tuple[dict, str]:
    """config.json for the written layout: the source TrainConfig (or a default one around the
    model and the tokenizer, as a training save writes it) with the parallel section set to
    (tp, pp) and no ZeRO (the rank files hold megalite optimizer state; a ZeRO run reshards it
    into its partitions when it loads). ``tokenizer``: the data section's tokenizer fields."""
    from megalite.config import DataConfig, ParallelConfig, TrainConfig
    try:
        if train_config is not None and hasattr(train_config, "parallel"):
            par = dataclasses.replace(
                train_config.parallel, tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp, num_layers_per_virtual_pipeline_stage=None,
                pipeline_layer_split=None, zero_stage=0, deepspeed_config=None,
                expert_model_parallel_size=ep)
            return dataclasses.replace(train_config, parallel=par).to_dict(), "TrainConfig"
        return TrainConfig(model=model_cfg, data=DataConfig(**(tokenizer or {})),
            parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                    pipeline_model_parallel_size=pp)).to_dict(), "TrainConfig"
    except MegaliteError as e:
        raise MegaliteError(f"target layout TP={tp} PP={pp} does not fit the model: {e}") \
            from None


# -- megalite -> megalite (another layout) ----------------------------------------------------
def reshard(args, tmp: str) -> str:
    from megalite.checkpoint import io
    from megalite.checkpoint.reshard_optim import reshardable
    from megalite.checkpoint.sharded import rank_file_name
    reader = CheckpointReader(args.load, verify_checksums=not args.no_verify_checksums)
    tp, pp = args.target_tensor_parallel_size, args.target_pipeline_model_parallel_size
    try:
        cfg = reader.config
        ep = _target_ep(args, cfg)
        out_dtype = _DTYPES.get(args.dtype)
        index = reader.index

        def dtype_of(name: str) -> torch.dtype:
            e = index.get(name) or index[WORD_EMBEDDINGS]
            return out_dtype or getattr(torch, e["dtype"])

        train_config = _train_config(reader.path)
        config_dict, config_type = _new_train_config(train_config, cfg, tp, pp, ep=ep)
        _carry_tokenizer(config_dict, reader.path, tmp, args.save)
        extra = dict(reader.meta.get("extra") or {})
        rank0 = os.path.join(reader.path, rank_file_name(0))
        opt = None
        if rank_file_name(0) in reader.files:
            state = io.safe_torch_load(rank0, mmap=True)
            opt = state.get("optimizer") if isinstance(state, dict) else None
        carry = opt is not None and reshardable(opt) and hasattr(train_config, "optim") \
            and out_dtype is None
        if opt is not None and not carry:
            why = ("--dtype changes the weights' dtype" if out_dtype is not None else
                   "ZeRO partitions saved without a fragment map by an older megalite"
                   if isinstance(opt, dict) and "zero_stage" in opt else
                   "no TrainConfig in the checkpoint" if not hasattr(train_config, "optim")
                   else "not megalite Optimizer state")
            print(f"warning: optimizer state NOT carried over ({why}); the new checkpoint "
                  f"holds the model weights only", file=sys.stderr)
            extra["weights_only"] = True
        elif opt is None:
            extra["weights_only"] = True
        rank_state = (_optimizer_rank_state(reader, train_config, cfg, tp, pp, ep) if carry
                      else None)
        write_checkpoint(tmp, cfg, tp, pp, reader.full, dtype_of, config_dict=config_dict,
                         config_type=config_type, extra=extra,
                         iteration=int(reader.meta["iteration"]), rank_state=rank_state,
                         desc="reshard", ep=ep)
        src = reader.meta["layout"]
    finally:
        reader.close()
    return (f"resharded {reader.path} from TP={src['tp_size']} PP={src['pp_size']} "
            f"VP={src['vp_size']} EP={src.get('ep_size', 1)} to TP={tp} PP={pp} EP={ep}, "
            + ("optimizer state included" if carry else "model weights only"))


def _carry_tokenizer(config_dict: dict, src_ckpt: str, tmp: str, save: str) -> None:
    """A tokenizer kept inside the source save directory (from-hf's ``SAVE/tokenizer/``) is
    copied along and config.json renamed to the copy; one kept elsewhere stays where it is."""
    import shutil
    data = config_dict.get("data") or {}
    root = os.path.dirname(os.path.abspath(src_ckpt))
    for field in ("tokenizer_model", "vocab_file", "merge_file"):
        path = data.get(field)
        if not path or not os.path.isabs(path) or not os.path.exists(path):
            continue
        rel = os.path.relpath(path, root)
        top = rel.split(os.sep)[0]
        if rel.startswith("..") or top.startswith("iter_"):
            continue
        src, dst = os.path.join(root, top), os.path.join(tmp, top)
        if not os.path.exists(dst):
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                shutil.copyfile(src, dst)
        data[field] = os.path.join(os.path.abspath(save), rel)


def _optimizer_rank_state(reader: CheckpointReader, train_config, cfg, tp: int, pp: int,
                          ep: int = 1):
    """``(rank, tp_rank, pp_rank) -> rank-file dict`` with that target rank's optimizer state,
    resharded by engineer J's :func:`reshard_optimizer_state` from real (CPU) model chunks of
    that rank. Its RNG states are those a fresh run seeds (torch/python/numpy with the run's
    seed, the tensor-parallel tracker for that rank): per-rank random streams of another
    layout have no counterpart, as in an online layout change."""
    from megalite.checkpoint.reshard_optim import reshard_optimizer_state
    from megalite.checkpoint.rng import capture_rng_states
    from megalite.checkpoint.sharded import FORMAT, rank_file_name
    from megalite.distributed.parallel_state import ParallelState
    from megalite.optim.build import build_optimizer
    from megalite.parallel.context import ModelContext
    from megalite.parallel.pipeline.stages import build_model_chunks
    from megalite.parallel.random import model_parallel_seed
    new_config = dataclasses.replace(train_config, parallel=dataclasses.replace(
        train_config.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        num_layers_per_virtual_pipeline_stage=None, pipeline_layer_split=None, zero_stage=0,
        deepspeed_config=None, expert_model_parallel_size=ep))   # DP=1 (or EP) output: megalite's optimizer state, whatever the source
    seed = new_config.training.seed
    if reader.verify:    # once here, not again for every target rank that reads a file
        from megalite.checkpoint import io
        for name in sorted(reader.files):
            if name.startswith("rank_"):
                io.verify_checksum(reader.path, name, reader.files)

    def rank_state(rank: int, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict:
        ps = ParallelState.for_shapes(tp, tp_rank, pp, pp_rank, dp_size=ep, ep_size=ep,
                                      ep_rank=ep_rank)
        chunks = build_model_chunks(cfg, ModelContext(ps, device="meta"))
        dtype = new_config.precision.params_dtype
        # The rank file holds optimizer state only (masters come from the saved state), so the
        # chunks need shapes and storage, not the weights (write_checkpoint wrote those).
        chunks = [c.to_empty(device="cpu").to(dtype) for c in chunks]
        optimizer = build_optimizer(chunks, new_config, ps)
        reshard_optimizer_state(reader.path, reader.meta, reader.files, chunks, optimizer, ps,
                                rank_file=rank_file_name, verify_checksums=False)
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            rng = capture_rng_states(model_parallel_seed(seed, ps))   # seeds torch too
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
        return {"format": FORMAT, "rank": rank, "coordinates": {"tp": tp_rank, "pp": pp_rank,
                                                                 "dp": ep_rank},
                "param_names": [n for c in chunks for n, _ in c.named_parameters()],
                "layer_ranges": [list(c.layer_range) for c in chunks],
                "optimizer": optimizer.state_dict(), "rng": rng}
    return rank_state


# -- verification -----------------------------------------------------------------------------
@torch.no_grad()
def verify_logits(ckpt_dir: str, hf_dir: str, args) -> float:
    """Max |megalite - HF| over the real-vocabulary logits of ``args.verify_sequences`` random
    sequences (encoder-decoders: random source and decoder sequences of that length; the
    converter's ``verify_logits``), both models in float32 in this process; MegaliteError above
    the tolerance."""
    from megalite.checkpoint import load_model_weights, read_model_config
    from megalite.distributed.parallel_state import ParallelState
    from megalite.parallel.context import ModelContext
    cfg = read_model_config(ckpt_dir).replace(hidden_dropout=0.0, attention_dropout=0.0)
    ps = ParallelState.single()
    family = family_of(cfg)
    converter = family.hf_converter
    ours = family.model_class(cfg, ModelContext(ps, device="meta")).to_empty(device="cpu")
    load_model_weights(ckpt_dir, [ours], ps, verify_checksums=False)
    ours.eval()
    try:
        theirs = converter.hf_model_class(cfg).from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    except Exception as e:
        raise MegaliteError(f"--verify: transformers cannot load {hf_dir}: "
                            f"{type(e).__name__}: {e}") from None
    length = min(args.verify_seq_length, cfg.max_position_embeddings)
    g = torch.Generator().manual_seed(1234)
    # ids both models know (a from-hf BERT may hold [BOS] and [EOS] rows the HF model lacks)
    vocab = min(cfg.vocab_size, theirs.config.vocab_size)
    tokens = torch.randint(0, vocab, (args.verify_sequences, length), generator=g)
    a, b = converter.verify_logits(ours, theirs, tokens, cfg)
    if a.shape != b.shape:
        raise MegaliteError(f"--verify: logits shapes differ: megalite {tuple(a.shape)}, "
                            f"Hugging Face {tuple(b.shape)}")
    err = (a - b).abs().max().item()
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        err = float("inf")
    print(f"verify: max |megalite - HF| logit difference {err:.3g} over "
          f"{args.verify_sequences} x {length} tokens (tolerance {args.verify_tolerance:g}, "
          f"logit scale {b.abs().max().item():.3g})", file=sys.stderr)
    if not err <= args.verify_tolerance:
        raise MegaliteError(f"--verify failed: max |megalite - HF| logit difference {err:.3g} "
                            f"exceeds {args.verify_tolerance:g}; nothing was written to "
                            f"{args.save}")
    return err
