"""Tests for common/tasks.py (the sentiment task, rewards, evaluation) and the built-in model cache
(common/builtin_models.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

import common.builtin_models as builtin_models
import common.models as models
from common.tasks import (
    Task,
    continue_review,
    diversity_metrics,
    evaluate,
    is_review,
    make_task,
    sentiment_corpus,
    split_review,
    vader_compound,
)

POSITIVE = "the acting was truly wonderful ."
DIVERSITY = {
    "eval/distinct_1",
    "eval/distinct_2",
    "eval/unique_1",
    "eval/unique_2",
    "eval/msttr",
    "eval/entropy_1",
    "eval/entropy_2",
    "eval/response_length",
}


@pytest.fixture(scope="module")
def task():
    return make_task("sentiment")


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------
def test_vader_compound():
    scores = vader_compound([POSITIVE, "i hated the ending .", "the plot was long ."])
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64 and scores.shape == (3,)
    assert scores[0] > 0.5
    assert scores[1] < -0.5
    assert scores[2] == 0.0


# ----------------------------------------------------------------------------------------------
# The sentiment task
# ----------------------------------------------------------------------------------------------
def test_sentiment_task_prompts(task):
    assert task.name == "sentiment"
    assert len(task.train_prompts) == 4096
    assert len(task.eval_prompts) == 256
    assert len(set(task.train_prompts)) == 4096
    assert len(set(task.eval_prompts)) == 256
    assert not set(task.train_prompts) & set(task.eval_prompts)
    assert all(p.strip() for p in task.train_prompts + task.eval_prompts)


def test_sentiment_task_is_deterministic(task):
    again = make_task("sentiment")
    assert again.train_prompts == task.train_prompts
    assert again.eval_prompts == task.eval_prompts
    assert again.corpus()[:50] == task.corpus()[:50]


def test_sentiment_reward_scores_the_response_only(task):
    responses = [POSITIVE, "i hated the ending .", "the plot was long ."]
    expected = vader_compound(responses)
    np.testing.assert_array_equal(task.reward_fn(["a", "b", "c"], responses), expected)
    negative_prompts = ["i hated it . awful , terrible ."] * 3
    np.testing.assert_array_equal(task.reward_fn(negative_prompts, responses), expected)
    np.testing.assert_array_equal(task.score(negative_prompts, responses), expected)


def test_unknown_task():
    with pytest.raises(ValueError) as err:
        make_task("nope")
    assert "nope" in str(err.value)
    assert "sentiment" in str(err.value)


def test_split_review():
    review = "the movie was great . i hated the ending . it is a dull film ."
    words = review.split(" ")
    prompt, continuation = split_review(review)
    assert prompt.split(" ") == words[: len(words) // 2]
    assert prompt + continuation == review
    assert continuation.startswith(" ")
    for review in sentiment_corpus(200, seed=5):
        words = review.split(" ")
        prompt, continuation = split_review(review)
        assert prompt.split(" ") == words[: len(words) // 2]
        assert prompt + continuation == review


def test_sentiment_corpus_is_mixed():
    reviews = sentiment_corpus(2000, seed=0)
    assert len(reviews) == 2000
    scores = vader_compound([split_review(r)[1] for r in reviews])
    positive, negative = np.mean(scores > 0.05), np.mean(scores < -0.05)
    assert 0.2 < positive < 0.7
    assert 0.2 < negative < 0.7


def test_score_rejects_bad_rewards():
    def make(reward_fn):
        return Task(
            name="bad",
            train_prompts=["a"],
            eval_prompts=["b"],
            reward_fn=reward_fn,
            max_prompt_tokens=8,
            max_new_tokens=8,
        )

    good = make(lambda prompts, responses: [0.5] * len(responses))
    np.testing.assert_array_equal(good.score(["x", "y"], ["r", "s"]), [0.5, 0.5])
    with pytest.raises(ValueError):
        make(lambda prompts, responses: [0.5, float("nan")]).score(["x", "y"], ["r", "s"])
    with pytest.raises(ValueError):
        make(lambda prompts, responses: [0.5, float("inf")]).score(["x", "y"], ["r", "s"])
    with pytest.raises(ValueError):
        make(lambda prompts, responses: [0.5]).score(["x", "y"], ["r", "s"])
    with pytest.raises(ValueError):
        make(lambda prompts, responses: [[0.5], [0.5]]).score(["x", "y"], ["r", "s"])


def test_evaluate(task):
    batches, indices = [], []

    def generate_fn(prompts, positions):
        batches.append(list(prompts))
        indices.append(list(positions))
        return [POSITIVE] * len(prompts)

    metrics, samples = evaluate(task, generate_fn, n_prompts=10, batch_size=4)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sum(batches, []) == task.eval_prompts[:10]
    assert sum(indices, []) == list(range(10))  # positions in the held-out list, for per-prompt seeds
    # without a policy or a starting model: the reward, diversity and (sentiment has a grammar) grammatical
    assert set(metrics) == {"eval/return_mean", "eval/return_std", "eval/grammatical", *DIVERSITY}
    assert metrics["eval/grammatical"] == 0.0  # one sentence after half a review is not a review
    assert metrics["eval/distinct_1"] == pytest.approx(5 / 50)  # 5 words, 10 times
    assert metrics["eval/return_mean"] == pytest.approx(vader_compound([POSITIVE])[0])
    assert metrics["eval/return_mean"] > 0.5
    # np.std of identical float64 values can be ~1e-16 rather than exactly 0 (rounding in the mean).
    assert metrics["eval/return_std"] == pytest.approx(0.0, abs=1e-12)
    assert len(samples) == 10
    for (prompt, response, reward), expected_prompt in zip(samples, task.eval_prompts[:10], strict=True):
        assert prompt == expected_prompt
        assert response == POSITIVE
        assert reward == pytest.approx(metrics["eval/return_mean"])


def test_evaluate_mixed_rewards(task):
    texts = [POSITIVE, "i hated the ending ."]
    metrics, samples = evaluate(
        task, lambda prompts, _: [texts[i % 2] for i in range(len(prompts))], n_prompts=4, batch_size=4
    )
    expected = vader_compound(texts * 2)
    assert metrics["eval/return_mean"] == pytest.approx(expected.mean())
    assert metrics["eval/return_std"] == pytest.approx(expected.std())
    assert [s[2] for s in samples] == pytest.approx(expected.tolist())


# ----------------------------------------------------------------------------------------------
# The built-in model cache (training replaced by a fast fake)
# ----------------------------------------------------------------------------------------------
SENTENCES = [
    f"the {n} was {a} ."
    for n in ["movie", "plot", "ending", "cast", "music"]
    for a in ["great", "bad", "long", "dull", "fun", "lovely", "weak", "short", "good", "odd"]
]


def write_tiny_gpt2(out_dir: str) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        SENTENCES, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
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


@pytest.fixture
def fake_builder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMRL_CACHE", str(cache))
    calls = []

    def fake_train_builtin(task, arch, out_dir, **kwargs):
        calls.append((task.name, arch, out_dir))
        torch.rand(5)  # consumes the global RNG: the build must not shift the caller's stream
        write_tiny_gpt2(out_dir)

    monkeypatch.setattr(builtin_models, "_train_builtin", fake_train_builtin)
    return str(cache), calls


def test_builtin_model_cache(task, fake_builder):
    cache, calls = fake_builder
    target = builtin_models.ensure_builtin_model(task, "tiny-gpt2")
    assert len(calls) == 1 and calls[0][:2] == ("sentiment", "tiny-gpt2")
    assert target == os.path.join(cache, "sentiment-tiny-gpt2")
    info_path = os.path.join(target, "build_info.json")
    with open(info_path) as f:
        info = json.load(f)
    assert info["builtin_version"] == builtin_models.BUILTIN_VERSION
    assert info["task"] == "sentiment" and info["arch"] == "tiny-gpt2"
    assert info["grammar_version"] == task.extra["grammar_version"]
    assert os.path.isfile(os.path.join(target, "config.json"))
    assert sorted(os.listdir(cache)) == ["sentiment-tiny-gpt2", "sentiment-tiny-gpt2.lock"]  # no temp dir left

    assert builtin_models.ensure_builtin_model(task, "tiny-gpt2") == target  # cached: reused
    assert len(calls) == 1

    info["builtin_version"] = builtin_models.BUILTIN_VERSION + 1
    with open(info_path, "w") as f:
        json.dump(info, f)
    assert builtin_models.ensure_builtin_model(task, "tiny-gpt2") == target  # stale: rebuilt
    assert len(calls) == 2
    with open(info_path) as f:
        assert json.load(f)["builtin_version"] == builtin_models.BUILTIN_VERSION

    shutil.rmtree(target)
    assert builtin_models.ensure_builtin_model(task, "tiny-gpt2") == target  # missing: rebuilt
    assert len(calls) == 3
    assert sorted(os.listdir(cache)) == ["sentiment-tiny-gpt2", "sentiment-tiny-gpt2.lock"]

    newer_grammar = dataclasses.replace(task, extra={"grammar_version": task.extra["grammar_version"] + 1})
    builtin_models.ensure_builtin_model(newer_grammar, "tiny-gpt2")  # the corpus changed: rebuilt
    assert len(calls) == 4

    # load_policy goes through the same cache.
    policy = models.load_policy("tiny-gpt2", newer_grammar)
    assert len(calls) == 4
    assert not policy.is_seq2seq and policy.tokenizer.padding_side == "left"

    calls.clear()  # sentiment_grammar shares sentiment's corpus, so it uses sentiment's models: nothing is built
    grammar_task = dataclasses.replace(make_task("sentiment_grammar"), extra=newer_grammar.extra)  # as cached now
    assert builtin_models.ensure_builtin_model(grammar_task, "tiny-gpt2") == target and not calls


def test_builtin_build_leaves_rng_untouched(task, fake_builder):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    builtin_models.ensure_builtin_model(task, "tiny-gpt2")
    assert len(fake_builder[1]) == 1
    torch.testing.assert_close(torch.rand(3), expected, atol=0, rtol=0)


def test_builtin_model_needs_a_corpus(task, fake_builder):
    no_corpus = dataclasses.replace(task, corpus=None, pretrain_pairs=None)
    with pytest.raises(ValueError):
        builtin_models.ensure_builtin_model(no_corpus, "tiny-gpt2")
    with pytest.raises(ValueError):
        models.resolve_model_path("tiny-t5", no_corpus)
    assert fake_builder[1] == []


# ----------------------------------------------------------------------------------------------
# Fluency and diversity beside the reward
# ----------------------------------------------------------------------------------------------
def test_diversity_metrics_by_hand():
    # words: "a b a" | "b c" -> unigrams a, b, a, b, c; bigrams (a b), (b a) | (b c): none across texts
    metrics = diversity_metrics(["a b a", "B c"], segment=2)  # lowercased: "B" is "b"
    assert metrics["eval/distinct_1"] == pytest.approx(3 / 5)
    assert metrics["eval/unique_1"] == 1  # only c occurs once
    assert metrics["eval/entropy_1"] == pytest.approx(-(2 * 0.4 * np.log2(0.4) + 0.2 * np.log2(0.2)))  # 1.522 bits
    assert metrics["eval/distinct_2"] == 1.0 and metrics["eval/unique_2"] == 3
    assert metrics["eval/entropy_2"] == pytest.approx(np.log2(3))
    assert metrics["eval/msttr"] == 1.0  # windows [a b], [a b]; the last, [c], is dropped
    assert metrics["eval/response_length"] == 2.5
    assert diversity_metrics(["a b a", "b c"], segment=3)["eval/msttr"] == pytest.approx(2 / 3)  # [a b a]
    assert diversity_metrics(["a b a", "b c"])["eval/msttr"] == pytest.approx(3 / 5)  # fewer words than a window
    repeated = diversity_metrics(["great great great"] * 4)
    assert repeated["eval/distinct_1"] == pytest.approx(1 / 12) and repeated["eval/entropy_1"] == 0.0
    assert repeated["eval/distinct_2"] == pytest.approx(1 / 8) and repeated["eval/unique_2"] == 0
    empty = diversity_metrics(["", ""])
    assert empty["eval/distinct_1"] == 0.0 and empty["eval/msttr"] == 0.0 and empty["eval/response_length"] == 0.0


GOOD_REVIEW = "the plot was very dull . i loved it twice . the camera work made me happy . overall a so fun drama ."


def test_grammar_accepts_what_it_writes():
    assert all(is_review(r) for r in sentiment_corpus(500, seed=3))
    assert is_review(GOOD_REVIEW)
    assert is_review(GOOD_REVIEW.rsplit(" overall", 1)[0])  # 3 sentences are a review too


@pytest.mark.parametrize(
    "text",
    [
        # shuffled
        "plot the was very dull . i loved it twice . the camera work made me happy . overall a so fun drama .",
        "the plot was very dull dull . i loved it twice . the camera work made me happy .",  # a repeated adjective
        "great loved the twice drama happy film . very the .",  # a bag of grammar words
        "the plot was very dull . i loved it twice .",  # 2 sentences: not a review
        GOOD_REVIEW + " it is a fun film .",  # 5 sentences: not a review
        "the plot and the plot were dull . i loved it twice . the camera work made me happy .",  # one noun twice
        "the plot was very dull . i loved it twice . the camera work made me happy . overall a so",  # stopped early
        "the plot was very great movie . i loved it twice . the camera work made me happy .",  # not a template
    ],
)
def test_grammar_rejects(text):
    assert not is_review(text) and not is_review(text.replace(" .", "") + " .")


def test_grammar_cut_off_prefix():
    """A response the length limit cut off counts when what is there is a valid prefix."""
    cut = "the plot was very dull . i loved it twice . the camera work made me happy . overall a so"
    assert is_review(cut, cut_off=True) and not is_review(cut)
    assert is_review("the plot was very dull . i loved it twice . the camera", cut_off=True)  # inside "camera work"
    assert is_review("the plot was very dull . i loved it", cut_off=True)
    assert not is_review("the plot was very dull . i loved the twice", cut_off=True)  # no template goes on so
    assert not is_review(GOOD_REVIEW + " it is a", cut_off=True)  # a 5th sentence, even cut off


class FakeNLL:
    """text_nll by hand: each continuation costs 1 nat per word, over its words."""

    def __init__(self):
        self.tokenizer = lambda text, add_special_tokens=False: {"input_ids": text.split()}
        self.calls = []

    def text_nll(self, prompts, continuations, max_prompt_tokens, batch_size):
        self.calls.append(list(continuations))
        count = np.array([len(c.split()) for c in continuations], dtype=float)
        return count * np.array([1.0 + i % 2 for i in range(len(continuations))]), count


def test_evaluate_fluency_by_hand(task):
    policy, start = FakeNLL(), FakeNLL()
    responses = ["the film was dull .", "great"]
    metrics, _ = evaluate(
        task,
        lambda prompts, _: [responses[i % 2] for i in range(len(prompts))],
        n_prompts=4,
        batch_size=4,
        policy=policy,
        start_model=start,
        response_length=5,
    )
    # perplexity: the references under the policy; NLL 1 or 2 nats per word, alternating
    refs = task.eval_references[:4]
    assert policy.calls == [refs]
    words = np.array([len(r.split()) for r in refs], dtype=float)
    assert metrics["eval/perplexity"] == pytest.approx(np.exp((words * [1, 2, 1, 2]).sum() / words.sum()))
    # ref_nll: the sampled responses under the starting model: (5*1 + 1*2) * 2 nats over 12 words
    assert start.calls == [responses * 2]
    assert metrics["eval/ref_nll"] == pytest.approx(14 / 12)
    assert metrics["eval/response_length"] == 3.0
    # grammatical: "great" after half a review is no review; but 5 tokens (the limit) make the first cut off
    # (the 4 evaluated prompts: zip stops at the 4 responses)
    assert metrics["eval/grammatical"] == pytest.approx(
        np.mean([is_review(p + r, r.count(" ") >= 4) for p, r in zip(task.eval_prompts, responses * 2, strict=False)])
    )


def test_evaluate_without_references_omits_perplexity(task):
    plain = dataclasses.replace(task, eval_references=None, grammatical=None)
    metrics, _ = evaluate(plain, lambda prompts, _: ["ok"] * len(prompts), n_prompts=2, batch_size=2, policy=FakeNLL())
    assert "eval/perplexity" not in metrics and "eval/grammatical" not in metrics
    none_given = dataclasses.replace(task, eval_references=[None] * len(task.eval_prompts))
    metrics, _ = evaluate(
        none_given, lambda prompts, _: ["ok"] * len(prompts), n_prompts=2, batch_size=2, policy=FakeNLL()
    )
    assert "eval/perplexity" not in metrics  # omitted, not faked


def test_sentiment_references_are_the_reviews_second_halves(task):
    assert len(task.eval_references) == len(task.eval_prompts)
    for prompt, reference in zip(task.eval_prompts[:50], task.eval_references[:50], strict=True):
        assert reference.startswith(" ") and is_review(prompt + reference)


# ----------------------------------------------------------------------------------------------
# sentiment_grammar: the reward sees fluency, the log answers each prompt several times
# ----------------------------------------------------------------------------------------------
def test_continue_review_writes_grammar_continuations_of_every_sentiment():
    import random

    rng = random.Random(0)
    prompts = [split_review(r)[0] for r in sentiment_corpus(300, seed=11)]
    for prompt in prompts:
        assert is_review(prompt + continue_review(prompt, rng)), prompt
    # one prompt, many continuations: different texts, of both signs of sentiment
    continuations = [continue_review(prompts[0], rng) for _ in range(40)]
    scores = vader_compound(continuations)
    assert len(set(continuations)) > 20 and scores.min() < -0.3 and scores.max() > 0.3
    with pytest.raises(ValueError, match="cannot continue"):
        continue_review("not a review at all", rng)


def test_sentiment_grammar_reward_is_vader_minus_one_outside_the_grammar():
    task = make_task("sentiment_grammar")
    prompt = "the plot was dull . i loved the"
    responses = [" music . the acting was truly wonderful .", " wonderful was the truly music . acting ."]
    vader = vader_compound(responses)
    assert vader[0] == pytest.approx(vader[1])  # the same words: VADER cannot tell them apart
    np.testing.assert_allclose(task.score([prompt] * 2, responses), [vader[0], vader[1] - 1.0])
    assert task.eval_prompts == make_task("sentiment").eval_prompts


def test_sentiment_grammar_log_holds_good_and_bad_answers_to_the_same_prompts():
    task = make_task("sentiment_grammar")
    data = task.offline_data(0)
    assert len(data) == 4096 and data == task.offline_data(0)  # deterministic
    prompts = [d["prompt"] for d in data]
    assert all(prompts[i] == prompts[i - i % 4] for i in range(len(data)))  # 4 answers per prompt
    assert len(set(prompts)) > 1000 and not set(prompts) & set(task.eval_prompts)  # rarely, two reviews share one
    fluent = np.array([is_review(d["prompt"] + d["response"]) for d in data])
    assert 0.70 < fluent.mean() < 0.80  # a quarter corrupted (a shuffle is rarely grammatical by chance)
    np.testing.assert_allclose(
        [d["reward"] for d in data], vader_compound([d["response"] for d in data]) - (1.0 - fluent)
    )
    # most prompts have a fluent and a corrupted answer, so the reward separates them within a prompt
    mixed = sum(0 < fluent[i : i + 4].sum() < 4 for i in range(0, len(data), 4))
    assert mixed > 0.6 * 1024
