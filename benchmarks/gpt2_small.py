"""Write a GPT-2-small-shaped model to a local directory, so the speed benchmarks run offline at the scale users run.

    python benchmarks/gpt2_small.py                 # -> runs/gpt2-small-shape (tokenizer once, then the weights)
    python ppo.py --model-name runs/gpt2-small-shape --rollout-batch-size 16 --minibatch-size 8

The shape is GPT-2 small's (Radford et al. 2019; Hugging Face `gpt2`): 12 layers, 768 wide, 12 heads, 1,024
positions, a 50,257-token byte-level BPE vocabulary, tied input and output embeddings: 124M parameters. The
weights are transformers' random initialisation (seed 0), since no pretrained weights can be downloaded here,
so the text it writes is noise; what the benchmarks measure (time and memory of generation and of the
`[batch, tokens, vocabulary]` passes) depends on the shape, not on the weights.

The tokenizer is a byte-level BPE trained to exactly 50,257 tokens on the sentiment task's corpus plus
random letter strings (the corpus alone has too few distinct pairs to fill GPT-2's vocabulary). Training it
takes about a minute; it is written first and reused when the directory already holds it, so a machine with
little time (a GPU lease) can be handed the directory with the tokenizer and build only the weights.
"""

import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB, LAYERS, WIDTH, POSITIONS = 50257, 12, 768, 1024


def build_tokenizer(out_dir: str, vocab: int = VOCAB):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from common.tasks import make_task

    rng = random.Random(0)
    noise_lines = round(40000 * vocab / VOCAB)  # enough new pairs to fill the vocabulary, no more (slow to write)
    letters = "abcdefghijklmnopqrstuvwxyz"
    noise = [
        " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(50))
        for _ in range(noise_lines)
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(make_task("sentiment").corpus()) + noise,
        vocab_size=vocab,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    if bpe.get_vocab_size() != vocab:
        raise RuntimeError(
            f"the BPE reached {bpe.get_vocab_size()} tokens, not {vocab}: too few distinct pairs (more noise lines)"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpt2-small-shape"), help="directory to write")
    p.add_argument("--layers", type=int, default=LAYERS, help="transformer blocks (GPT-2 small: 12)")
    p.add_argument("--width", type=int, default=WIDTH, help="model width (GPT-2 small: 768)")
    p.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size (GPT-2: 50,257)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    if os.path.isfile(os.path.join(args.out, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(args.out)
    else:
        tokenizer = build_tokenizer(args.out, args.vocab)
    print(f"tokenizer: {len(tokenizer)} tokens ({time.time() - start:.0f} s)", flush=True)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=POSITIONS,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.width // 64,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.1f}M parameters ({time.time() - start:.0f} s)")
    return args.out


if __name__ == "__main__":
    main()
