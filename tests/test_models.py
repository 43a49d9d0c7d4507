"""Tests for common/models.py on tiny random GPT-2 and T5 models built here (fast, no hub)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.models import (
    ValueHead,
    entropy_of,
    frozen_copy,
    load_policy,
    logprobs_of,
    resolve_model_path,
    response_mask_from,
)

NOUNS = ["movie", "film", "plot", "acting", "ending"]
ADJS = ["great", "terrible", "long", "boring", "wonderful", "short", "bad", "fun", "dull", "lovely"]
SENTENCES = [f"the {n} was {a} ." for n in NOUNS for a in ADJS]  # 50 short sentences


def make_tokenizer(with_pad: bool = True):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>"] if with_pad else ["<|endoftext|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES, vocab_size=300, min_frequency=1, special_tokens=specials, show_progress=False)
    kwargs = dict(pad_token="<pad>") if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", **kwargs
    )


def save_tiny_gpt2(out_dir: str, with_pad: bool = True) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer(with_pad)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=1,
            n_embd=32,
            n_head=2,
            n_positions=64,
            vocab_size=len(tok),
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def save_tiny_t5(out_dir: str) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(
        T5Config(
            d_model=32,
            d_ff=64,
            d_kv=16,
            num_layers=1,
            num_heads=2,
            vocab_size=len(tok),
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    )
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {"gpt2": str(root / "gpt2"), "t5": str(root / "t5"), "gpt2_nopad": str(root / "gpt2_nopad")}
    save_tiny_gpt2(dirs["gpt2"])
    save_tiny_t5(dirs["t5"])
    save_tiny_gpt2(dirs["gpt2_nopad"], with_pad=False)
    return dirs


@pytest.fixture(scope="module")
def policies(model_dirs):
    return {arch: load_policy(model_dirs[arch], task=None) for arch in ("gpt2", "t5")}


ARCHS = ["gpt2", "t5"]


class ScriptedEOS:
    """A logits processor: per row, force EOS at step `force[row]` (None: never allow EOS)."""

    def __init__(self, eos: int, force: list):
        self.eos, self.force, self.start = eos, force, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        scores = scores.clone()
        for row, at in enumerate(self.force):
            if at is not None and step == at:
                scores[row, :] = -float("inf")
                scores[row, self.eos] = 0.0
            else:
                scores[row, self.eos] = -float("inf")
        return scores


class BoostEOS:
    """A logits processor that adds a large bonus to EOS (so EOS is sampled whenever it is allowed)."""

    def __init__(self, eos: int):
        self.eos = eos

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.eos] += 1e4
        return scores


def processors(*procs):
    from transformers import LogitsProcessorList

    return LogitsProcessorList(list(procs))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,seq2seq", [("gpt2", False), ("t5", True)])
def test_load_policy(model_dirs, arch, seq2seq):
    from transformers import AutoConfig, AutoTokenizer

    raw_config = AutoConfig.from_pretrained(model_dirs[arch])
    dropout = raw_config.resid_pdrop if arch == "gpt2" else raw_config.dropout_rate
    assert dropout > 0  # the saved model does have dropout, so the check below means something
    assert AutoTokenizer.from_pretrained(model_dirs[arch]).padding_side == "right"

    policy = load_policy(model_dirs[arch], task=None)
    assert policy.is_seq2seq is seq2seq
    assert policy.tokenizer.padding_side == "left"
    assert policy.hidden_size == 32
    dropouts = [m for m in policy.model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts, "expected dropout modules in the model"
    assert all(m.p == 0.0 for m in dropouts)


def test_load_policy_without_pad_token_uses_eos(model_dirs):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(model_dirs["gpt2_nopad"]).pad_token is None
    policy = load_policy(model_dirs["gpt2_nopad"], task=None)
    tok = policy.tokenizer
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id
    ids, mask = policy.encode_prompts(["the movie was great .", "the plot"], max_tokens=16, device="cpu")
    assert mask[1, 0] == 0 and ids[1, 0] == tok.eos_token_id


def test_load_causal_lm_adds_missing_words_and_refuses_seq2seq(model_dirs):
    from common.models import load_causal_lm

    model, tok = load_causal_lm(model_dirs["gpt2"], ["<+>", "<->", "the"], device="cpu")
    vocab = tok.get_vocab()
    assert "<+>" in vocab and "<->" in vocab and tok.convert_tokens_to_ids("<+>") >= len(vocab) - 2
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)  # a row for every new token
    assert tok("<+>")["input_ids"] == [vocab["<+>"]]  # one token, never split into characters
    with pytest.raises(ValueError, match="seq2seq"):
        load_causal_lm(model_dirs["t5"], ["<+>"])
    with pytest.raises(ValueError, match="built-in"):
        load_causal_lm("tiny-t5", ["<+>"])


def test_resolve_model_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no stray local directory called "gpt2" or "org"
    with pytest.raises(FileNotFoundError):
        resolve_model_path("./does/not/exist", None)
    assert resolve_model_path("gpt2", None) == "gpt2"
    assert resolve_model_path("org/model", None) == "org/model"
    (tmp_path / "local_model").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):  # a directory, but no saved model in it
        resolve_model_path("local_model", None)
    (tmp_path / "local_model" / "config.json").write_text("{}")
    assert resolve_model_path("local_model", None) == "local_model"
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_path("local_model/config.json", None)


def test_saved_dir_round_trip(model_dirs):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    model = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"])
    assert isinstance(model, GPT2LMHeadModel)
    assert model.config.n_embd == 32 and model.config.n_layer == 1


# ----------------------------------------------------------------------------------------------
# Prompts and generation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_encode_prompts_left_pads_and_truncates(policies, arch):
    policy = policies[arch]
    tok = policy.tokenizer
    short, long = "the plot", "the movie was wonderful . the ending was lovely ."
    short_ids, long_ids = tok(short)["input_ids"], tok(long)["input_ids"]
    assert len(short_ids) < 6 < len(long_ids)

    ids, mask = policy.encode_prompts([short, long], max_tokens=6, device="cpu")
    assert ids.shape == mask.shape == (2, 6)
    n_pad = 6 - len(short_ids)
    assert mask[0].tolist() == [0] * n_pad + [1] * len(short_ids)
    assert ids[0].tolist() == [tok.pad_token_id] * n_pad + short_ids
    assert mask[1].tolist() == [1] * 6
    assert ids[1].tolist() == long_ids[-6:]  # keeps the end of the prompt

    ids, mask = policy.encode_prompts([short, long], max_tokens=100, device="cpu")
    assert ids.shape == (2, len(long_ids))
    assert ids[1].tolist() == long_ids
    assert mask[0].sum() == len(short_ids) and mask[0, 0] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_mask_and_padding_after_eos(policies, arch):
    policy = policies[arch]
    eos, pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    ids, mask = policy.encode_prompts(["the movie was", "the ending"], max_tokens=16, device="cpu")

    # Row 0 ends with EOS at step 2, row 1 never does.
    torch.manual_seed(0)
    resp, rmask = policy.generate(
        ids, mask, max_new_tokens=6, do_sample=True, logits_processor=processors(ScriptedEOS(eos, [2, None]))
    )
    assert resp.shape == rmask.shape == (2, 6)
    assert rmask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert resp[0, 2] == eos
    assert (resp[0, :2] != eos).all()
    assert resp[0, 3:].tolist() == [pad] * 3
    assert rmask[1].tolist() == [1] * 6
    assert (resp[1] != eos).all()

    # Both rows end early: generation stops, the width stays within max_new_tokens.
    resp, rmask = policy.generate(
        ids, mask, max_new_tokens=6, do_sample=False, logits_processor=processors(ScriptedEOS(eos, [0, 2]))
    )
    assert resp.shape[1] <= 6
    assert rmask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert resp[0].tolist() == [eos, pad, pad]
    assert resp[1, 2] == eos

    # Unscripted generation: width <= N, mask agrees with "1 up to and including the first EOS".
    for n in (1, 4, 9):
        resp, rmask = policy.generate(ids, mask, max_new_tokens=n, do_sample=True)
        assert resp.shape[0] == 2 and 1 <= resp.shape[1] <= n
        for row, m in zip(resp.tolist(), rmask.tolist(), strict=True):
            first = row.index(eos) if eos in row else len(row)
            assert m == [1] * min(first + 1, len(row)) + [0] * (len(row) - first - 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_min_new_tokens(policies, arch):
    policy = policies[arch]
    eos = policy.tokenizer.eos_token_id
    ids, mask = policy.encode_prompts(["the movie was", "the ending"], max_tokens=16, device="cpu")

    resp, rmask = policy.generate(
        ids, mask, max_new_tokens=8, do_sample=True, logits_processor=processors(BoostEOS(eos))
    )
    assert resp.tolist() == [[eos], [eos]]  # without a minimum, the boosted EOS comes first

    resp, rmask = policy.generate(
        ids, mask, max_new_tokens=8, min_new_tokens=4, do_sample=True, logits_processor=processors(BoostEOS(eos))
    )
    assert resp.shape == (2, 5)
    assert (resp[:, :4] != eos).all()
    assert (resp[:, 4] == eos).all()
    assert rmask.tolist() == [[1] * 5] * 2


# ----------------------------------------------------------------------------------------------
# Alignment of Policy.forward with generate
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_generate_scores(policies, arch):
    policy = policies[arch]
    tok = policy.tokenizer
    prompt_ids, prompt_mask = policy.encode_prompts(
        ["the movie was great . the plot", "the ending"], max_tokens=32, device="cpu"
    )
    assert (prompt_mask[1] == 0).any()  # the batch really is left-padded
    policy.model.eval()
    out = policy.model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        max_new_tokens=5,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    gen_logits = torch.stack(out.logits, 1).float()  # [B, R, V]
    response = out.sequences[:, 1:] if policy.is_seq2seq else out.sequences[:, prompt_ids.shape[1] :]
    assert response.shape[1] == gen_logits.shape[1] == 5
    assert torch.equal(response, gen_logits.argmax(-1))  # greedy: the scores generate used
    rmask = response_mask_from(response, tok.eos_token_id)

    start = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response], 1)
    attention_mask = torch.cat([prompt_mask, rmask], 1)
    with torch.no_grad():
        logits, hidden = policy(input_ids, attention_mask, start)
    assert logits.shape == gen_logits.shape
    assert hidden.shape == (2, 5, 32)

    keep = rmask.bool()
    torch.testing.assert_close(logits[keep], gen_logits[keep], atol=1e-4, rtol=0)
    logp = logprobs_of(logits, input_ids[:, start:])
    expected = torch.gather(F.log_softmax(gen_logits, -1), 2, response.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp[keep], expected[keep], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_invariant_to_left_padding(policies, arch):
    policy = policies[arch]
    tok = policy.tokenizer
    prompt = tok("the movie was great .")["input_ids"]
    response = tok(" the plot was dull .")["input_ids"] + [tok.eos_token_id]
    pad = tok.pad_token_id

    def logprobs(n_pad):
        ids = torch.tensor([[pad] * n_pad + prompt + response])
        mask = torch.tensor([[0] * n_pad + [1] * (len(prompt) + len(response))])
        start = n_pad + len(prompt)
        with torch.no_grad():
            logits, _ = policy(ids, mask, start)
        return logprobs_of(logits, ids[:, start:])

    base, padded = logprobs(0), logprobs(3)
    assert base.shape == (1, len(response))
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_nll_matches_the_models_own_loss(policies, arch):
    """text_nll = the model's teacher-forced NLL of the continuation tokens after the prompt, per text, batched
    and padded like any batch; an empty continuation costs nothing."""
    policy = policies[arch]
    tok, model = policy.tokenizer, policy.model
    prompts, continuations = ["the movie was great .", "the plot was"], [" the ending was dull .", " fun ."]
    nll, count = policy.text_nll(prompts + ["the film"], continuations + [""], max_prompt_tokens=16, batch_size=2)
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        prompt_ids = tok(prompt, add_special_tokens=policy.is_seq2seq, return_tensors="pt")["input_ids"]
        target = tok(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            if policy.is_seq2seq:  # the decoder reads the target shifted right behind its start token
                start = torch.full_like(target[:, :1], model.config.decoder_start_token_id)
                logits = model(input_ids=prompt_ids, decoder_input_ids=torch.cat([start, target[:, :-1]], 1)).logits
            else:
                logits = model(input_ids=torch.cat([prompt_ids, target], 1)).logits[:, prompt_ids.shape[1] - 1 : -1]
        expected = F.cross_entropy(logits[0], target[0], reduction="sum")
        assert count[i] == target.shape[1]
        assert nll[i] == pytest.approx(expected.item(), rel=1e-4)
    assert count[2] == 0 and nll[2] == 0
    # another distribution over the same batch (ilql.py's deployed policy): uniform logits cost log V per token
    vocab = model.get_output_embeddings().weight.shape[0]

    def uniform(ids, mask, start):
        return torch.zeros(len(ids), ids.shape[1] - start, vocab)

    nll, count = policy.text_nll(prompts, continuations, max_prompt_tokens=16, logits_fn=uniform)
    assert nll == pytest.approx(count * math.log(vocab))
    # a distribution that cannot produce a token (top-k): infinite NLL there, and padding stays 0
    banned = tok(" fun", add_special_tokens=False)["input_ids"][0]

    def top_k(ids, mask, start):
        logits = torch.zeros(len(ids), ids.shape[1] - start, vocab)
        return logits.index_fill_(2, torch.tensor([banned, tok.pad_token_id]), float("-inf"))

    nll, _ = policy.text_nll(prompts, continuations, max_prompt_tokens=16, logits_fn=top_k)
    assert math.isfinite(nll[0]) and nll[1] == math.inf


# ----------------------------------------------------------------------------------------------
# Token-level helpers
# ----------------------------------------------------------------------------------------------
def test_response_mask_from():
    eos = 7
    ids = torch.tensor(
        [
            [3, 4, 7, 5, 7],  # EOS in the middle: everything after it is 0, including a second EOS
            [3, 4, 5, 6, 2],  # no EOS: all 1
            [7, 1, 1, 1, 1],  # EOS first
            [1, 2, 3, 4, 7],  # EOS last
        ]
    )
    assert response_mask_from(ids, eos).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]


def test_logprobs_and_entropy_hand_values():
    logits = torch.tensor([[[0.0, math.log(2), math.log(3)]]])
    probs = [1 / 6, 2 / 6, 3 / 6]
    for token, p in enumerate(probs):
        lp = logprobs_of(logits, torch.tensor([[token]]))
        assert lp.shape == (1, 1)
        assert lp.item() == pytest.approx(math.log(p), abs=1e-6)
    ent = entropy_of(logits)
    assert ent.shape == (1, 1)
    assert ent.item() == pytest.approx(-sum(p * math.log(p) for p in probs), abs=1e-6)
    # Shifting the logits changes nothing; low-precision logits are computed in float32.
    torch.testing.assert_close(entropy_of(logits + 5.0), ent)
    assert logprobs_of(logits.to(torch.bfloat16), torch.tensor([[2]])).dtype == torch.float32


def test_frozen_copy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    net.train()
    ref = frozen_copy(net)
    assert net.training  # the original is untouched
    assert all(p.requires_grad for p in net.parameters())
    assert not any(p.requires_grad for p in ref.parameters())
    assert not any(m.training for m in ref.modules())

    x = torch.randn(3, 4)
    net.eval()
    torch.testing.assert_close(ref(x), net(x), atol=0, rtol=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert not torch.allclose(ref(x), net(x))
    assert not any(torch.equal(a, b) for a, b in zip(ref.parameters(), net.parameters(), strict=True))


def test_value_head():
    head = ValueHead(32)
    hidden = torch.randn(3, 5, 32)
    values = head(hidden)
    assert values.shape == (3, 5)
    assert torch.equal(values, torch.zeros(3, 5))
    assert head(hidden.to(torch.bfloat16)).dtype == torch.float32
    with torch.no_grad():
        head.linear.weight.fill_(1.0)
    torch.testing.assert_close(head(hidden), hidden.sum(-1))


def test_generate_ignores_saved_generation_config(model_dirs, tmp_path):
    from transformers import GenerationConfig

    path = str(tmp_path / "gpt2_gencfg")
    shutil.copytree(model_dirs["gpt2"], path)
    policy = load_policy(path, task=None)
    eos = policy.tokenizer.eos_token_id
    # A saved generation config with processors that Policy.forward does not apply.
    GenerationConfig(
        repetition_penalty=3.0,
        no_repeat_ngram_size=1,
        num_beams=3,
        min_length=40,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=policy.tokenizer.pad_token_id,
    ).save_pretrained(path)
    policy = load_policy(path, task=None)
    ids, mask = policy.encode_prompts(["the movie was", "the ending"], max_tokens=16, device="cpu")
    # Greedy rollouts must be the argmax of the logits that PPO scores them with.
    resp, rmask = policy.generate(ids, mask, max_new_tokens=20, do_sample=False)
    with torch.no_grad():
        logits, _ = policy(torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1), ids.shape[1])
    keep = rmask.bool()
    assert torch.equal(resp[keep], logits.argmax(-1)[keep])
