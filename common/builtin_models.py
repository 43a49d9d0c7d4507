"""The built-in tiny models `tiny-gpt2` and `tiny-t5` of the embedded tasks: each is pretrained on its task's corpus
(with a byte-level BPE tokenizer of its own) on first use and cached in `~/.cache/lmrl/<task>-<arch>` (or under
`$LMRL_CACHE`); rebuilt when the `build_info.json` saved with it differs from what this recipe and the task would
write now (`BUILTIN_VERSION`, the task's `extra` such as its grammar version). `common/models.py` loads the cached
directory like any `save_pretrained` one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile

import torch

from common.batches import right_pad

BUILTIN_MODELS = ("tiny-gpt2", "tiny-t5")
# Bump when the built-in models' recipe changes; cached models from another version are rebuilt.
BUILTIN_VERSION = 1


def cache_dir() -> str:
    return os.environ.get("LMRL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lmrl"))


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # two processes never build the same model at once
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_info(task, arch: str) -> dict:
    return {"builtin_version": BUILTIN_VERSION, "task": _builtin_task(task), "arch": arch, **task.extra}


def _builtin_task(task) -> str:
    """The task whose built-in models `task` uses: its own, or the one whose corpus it shares."""
    return getattr(task, "builtin_models_of", None) or task.name


def ensure_builtin_model(task, arch: str) -> str:
    """The cached directory of the built-in `arch` model of `task`, (re)built when missing or stale."""
    if task.corpus is None:
        raise ValueError(f"task {task.name!r} has no built-in model; pass --model-name (a hub id or a directory)")
    target = os.path.join(cache_dir(), f"{_builtin_task(task)}-{arch}")
    info = _build_info(task, arch)
    with _file_lock(target + ".lock"):
        try:
            with open(os.path.join(target, "build_info.json")) as f:
                if json.load(f) == info:
                    return target
        except (OSError, ValueError):
            pass
        print(f"building the built-in {arch} for task {_builtin_task(task)!r} in {target} (once; cached after)")
        tmp = tempfile.mkdtemp(dir=cache_dir())
        try:
            with torch.random.fork_rng(devices=[]):  # a build leaves the caller's RNG stream untouched
                _train_builtin(task, arch, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted build leaves nothing behind
            raise
        with open(os.path.join(tmp, "build_info.json"), "w") as f:
            json.dump(info, f)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # atomic: a killed build never leaves a half-written model
    return target


def _train_builtin(task, arch: str, out_dir: str, epochs: int = 2, batch_size: int = 64, lr: float = 2e-3) -> None:
    """Pretrain a tiny model (and its byte-level BPE tokenizer) on the task's corpus."""
    from tokenizers import ByteLevelBPETokenizer
    from tqdm import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    texts = task.corpus()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=1024, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    eos, pad, vocab = tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if arch == "tiny-gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_positions=128,
                n_embd=128,
                n_layer=2,
                n_head=4,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=eos,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        )
        examples = [(tokenizer(t)["input_ids"] + [eos], None) for t in texts]
    else:
        model = T5ForConditionalGeneration(
            T5Config(
                vocab_size=vocab,
                d_model=128,
                d_ff=256,
                d_kv=32,
                num_layers=2,
                num_heads=4,
                dropout_rate=0.0,
                feed_forward_proj="relu",
                eos_token_id=eos,
                pad_token_id=pad,
                decoder_start_token_id=pad,
            )
        )
        examples = [
            (tokenizer(p)["input_ids"] + [eos], tokenizer(c)["input_ids"] + [eos]) for p, c in task.pretrain_pairs()
        ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    steps = epochs * (len(examples) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)

    model.train()
    bar = tqdm(total=steps, desc=f"pretraining {arch}", unit="step", mininterval=1.0 if sys.stderr.isatty() else 15.0)
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = [examples[j] for j in order[i : i + batch_size]]
            if arch == "tiny-gpt2":
                ids = right_pad([x for x, _ in batch], pad)
                loss = model(
                    input_ids=ids, attention_mask=(ids != pad).long(), labels=ids.masked_fill(ids == pad, -100)
                ).loss
            else:
                src, tgt = right_pad([x for x, _ in batch], pad), right_pad([y for _, y in batch], pad)
                loss = model(
                    input_ids=src, attention_mask=(src != pad).long(), labels=tgt.masked_fill(tgt == pad, -100)
                ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
