"""Task registry: prompts, reward function and evaluation for every task.

A task is what the policy is asked to do (prompts), how it is scored (a reward function on the
generated text) and how it is evaluated (held-out prompts). Every method script takes
`--task NAME` and reads only the `Task` interface below, so any method runs on any task.

The embedded `sentiment` task is an offline stand-in for GRUE's IMDB continuation task
(Ramamurthy et al., 2023): short movie-review-like texts come from a seeded probabilistic grammar,
the prompt is the first half of a review (GRUE takes the first 50% of the words), and the reward is
the VADER compound score of the continuation alone, in [-1, 1]. Positive, negative and neutral
sentences are drawn independently inside a review, so a prompt does not fix the sentiment of its
continuation: the pretrained model continues positively about as often as negatively, and RL has
something to learn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# The review grammar. Bump GRAMMAR_VERSION whenever the grammar changes: the built-in models are
# trained on its corpus and are rebuilt when the version they were built from differs.
# ----------------------------------------------------------------------------------------------
GRAMMAR_VERSION = 1

NOUNS = ["movie", "film", "plot", "acting", "story", "ending", "cast", "script", "music", "director",
         "dialogue", "soundtrack", "camera work", "pacing", "lead actor", "villain", "humor", "finale"]
KINDS = ["movie", "film", "story", "drama", "comedy", "thriller", "sequel"]
WORDS = {
    "positive": {
        "adj": ["great", "wonderful", "brilliant", "excellent", "beautiful", "fun", "superb",
                "delightful", "charming", "amazing", "good", "lovely", "fantastic", "touching"],
        "verb": ["loved", "enjoyed", "liked", "admired", "adored", "appreciated"],
        "feeling": ["happy", "glad", "thrilled", "delighted", "grateful"],
    },
    "negative": {
        "adj": ["terrible", "awful", "boring", "dull", "bad", "horrible", "weak", "stupid",
                "painful", "dreadful", "ugly", "poor", "disappointing", "annoying"],
        "verb": ["hated", "disliked", "regretted", "despised", "resented"],
        "feeling": ["sad", "angry", "bored", "upset", "tired"],
    },
    "neutral": {
        "adj": ["long", "short", "slow", "quiet", "simple", "old", "typical", "loud", "familiar",
                "dark", "new", "different", "plain", "real"],
        "verb": ["watched", "saw", "rented", "noticed", "remember", "followed"],
        "feeling": ["awake", "hungry", "home", "there", "ready"],
    },
}
ADVERBS = ["very", "really", "quite", "truly", "rather", "so", "pretty"]
TIMES = ["last night", "on sunday", "with my family", "at the cinema", "twice", "on a plane", "alone"]
TEMPLATES = [
    "the {noun} was {adj} .",
    "the {noun} was {adv} {adj} .",
    "i {verb} the {noun} .",
    "the {noun} and the {noun2} were {adj} .",
    "it is a {adj} {kind} .",
    "i {verb} it {time} .",
    "the {noun} made me {feeling} .",
    "honestly , the {noun} felt {adj} .",
    "overall a {adv} {adj} {kind} .",
]


def make_review(rng: random.Random) -> str:
    """One review: 3 or 4 sentences, each positive, negative or neutral with equal chance."""
    sentences = []
    for _ in range(rng.choice([3, 4])):
        words = WORDS[rng.choice(["positive", "negative", "neutral"])]
        noun, noun2 = rng.sample(NOUNS, 2)
        sentences.append(rng.choice(TEMPLATES).format(
            noun=noun, noun2=noun2, kind=rng.choice(KINDS), adv=rng.choice(ADVERBS), time=rng.choice(TIMES),
            adj=rng.choice(words["adj"]), verb=rng.choice(words["verb"]), feeling=rng.choice(words["feeling"]),
        ))
    return " ".join(sentences)


def split_review(review: str) -> tuple[str, str]:
    """GRUE's split: the prompt is the first half of the whitespace-separated words."""
    words = review.split(" ")
    half = len(words) // 2
    return " ".join(words[:half]), " " + " ".join(words[half:])


def sentiment_corpus(n: int, seed: int) -> list[str]:
    """`n` reviews from the grammar, reproducible from `seed`."""
    rng = random.Random(seed)
    return [make_review(rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------
_VADER = None


def vader_compound(texts: Sequence[str]) -> np.ndarray:
    """VADER compound score of each text, in [-1, 1] (Hutto & Gilbert, 2014)."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return np.array([_VADER.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# The task interface and the registry
# ----------------------------------------------------------------------------------------------
@dataclass
class Task:
    """Everything a method needs to know about a task."""

    name: str
    train_prompts: list[str]
    """prompts the policy trains on"""
    eval_prompts: list[str]
    """held-out prompts, disjoint from `train_prompts`, used by `evaluate`"""
    reward_fn: Callable[[Sequence[str], Sequence[str]], np.ndarray]
    """reward_fn(prompts, responses) -> one float per response"""
    max_prompt_tokens: int
    """prompts are truncated from the left to this many tokens (GRUE keeps the end of the prompt)"""
    max_new_tokens: int
    """response length budget in tokens"""
    min_new_tokens: int = 0
    """responses shorter than this are not allowed (EOS is suppressed); GRUE IMDB uses 48 = max"""
    corpus: Optional[Callable[[], list[str]]] = None
    """texts the built-in tiny models of this task are pretrained on (embedded tasks only)"""
    pretrain_pairs: Optional[Callable[[], list[tuple[str, str]]]] = None
    """(input, target) pairs the built-in tiny seq2seq model is pretrained on (embedded tasks only)"""
    offline_data: Optional[Callable[[int], list[dict]]] = None
    """offline_data(seed) -> [{"prompt", "response", "reward"}]: logged responses of mixed quality on
    training prompts (never on held-out ones), for the offline methods (ILQL, A-LoL)"""
    extra: dict = field(default_factory=dict)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Rewards for a batch; fails loudly on a reward that is not a finite number."""
        rewards = np.asarray(self.reward_fn(prompts, responses), dtype=np.float64)
        if rewards.shape != (len(responses),) or not np.all(np.isfinite(rewards)):
            raise ValueError(f"task {self.name!r}: the reward function returned {rewards!r}; "
                             f"expected {len(responses)} finite floats")
        return rewards


def make_sentiment_task(n_train: int = 4096, n_eval: int = 256, n_corpus: int = 16000) -> Task:
    """The embedded sentiment task: grammar reviews, VADER reward on the continuation."""
    train_prompts = sorted({split_review(r)[0] for r in sentiment_corpus(4 * n_train, seed=1)})
    random.Random(1).shuffle(train_prompts)
    train_prompts = train_prompts[:n_train]
    seen = set(train_prompts)
    eval_prompts = []
    for review in sentiment_corpus(8 * n_eval, seed=2):
        prompt = split_review(review)[0]
        if prompt not in seen:  # held-out means never trained on
            seen.add(prompt)
            eval_prompts.append(prompt)
        if len(eval_prompts) == n_eval:
            break
    def offline_data(seed: int, n: int = 4096, noise: float = 0.2) -> list[dict]:
        """Grammar continuations (the pretrained distribution: mixed sentiment) and, with probability
        `noise`, a corrupted response: its words shuffled, a random bag of grammar words, or one or two
        words. Every response is scored by the task's reward, like a logged dataset with its rewards."""
        rng = random.Random(seed)
        vocabulary = sorted({w for r in sentiment_corpus(500, seed=0) for w in r.split(" ")})
        held_out = set(eval_prompts)
        data = []
        for review in sentiment_corpus(2 * n, seed=1000 + seed):
            prompt, response = split_review(review)
            if prompt in held_out:
                continue
            if rng.random() < noise:
                words = response.split()
                kind = rng.choice(["shuffle", "bag", "short"])
                if kind == "shuffle":
                    rng.shuffle(words)
                elif kind == "bag":
                    words = rng.choices(vocabulary, k=rng.randint(3, 12))
                else:
                    words = words[:rng.randint(1, 2)]
                response = " " + " ".join(words)
            data.append({"prompt": prompt, "response": response})
            if len(data) == n:
                break
        rewards = vader_compound([d["response"] for d in data])
        for d, r in zip(data, rewards):
            d["reward"] = float(r)
        return data

    return Task(
        name="sentiment",
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        reward_fn=lambda prompts, responses: vader_compound(responses),
        max_prompt_tokens=32,
        max_new_tokens=24,
        corpus=lambda: sentiment_corpus(n_corpus, seed=0),
        pretrain_pairs=lambda: [split_review(r) for r in sentiment_corpus(n_corpus, seed=0)],
        offline_data=offline_data,
        extra={"grammar_version": GRAMMAR_VERSION},
    )


def make_wordle_task() -> Task:
    """The multi-turn Wordle game (ILQL's benchmark); it lives in common/wordle.py."""
    from common import wordle  # imported on use: single-turn scripts never load the word list

    return wordle.make_task()


TASKS: dict[str, Callable[[], Task]] = {
    "sentiment": make_sentiment_task,
    "wordle": make_wordle_task,
}


def make_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def evaluate(task: Task, generate_fn: Callable[[list[str]], list[str]], n_prompts: int,
             batch_size: int) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    """Score the policy's responses to the first `n_prompts` held-out prompts.

    `generate_fn(prompts) -> responses` is the method's deployed decoding. Returns the `eval/*`
    metrics and (prompt, response, reward) samples for logging.
    """
    prompts = task.eval_prompts[:n_prompts]
    responses: list[str] = []
    for i in range(0, len(prompts), batch_size):
        responses += generate_fn(prompts[i:i + batch_size])
    rewards = task.score(prompts, responses)
    metrics = {"eval/return_mean": float(rewards.mean()), "eval/return_std": float(rewards.std())}
    return metrics, list(zip(prompts, responses, rewards.tolist()))
