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

Hub tasks (need the network or local copies; `make_task(name, args)` reads their flags from `args`):
- `imdb`: GRUE's IMDB continuation task (prompts = first half of a review's words, reward = the
  positive-class probability of `lvwerra/distilbert-imdb` on prompt + continuation). Its data loads
  with `datasets`, imported only here.
- `jsonl`: your prompts (`--prompts-file`, one JSON object per line) with the reward of a sequence
  classifier (`--reward-model`, `--reward-label`) or of a Python callable (`--reward-fn`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# The review grammar. Bump GRAMMAR_VERSION whenever the grammar changes: the built-in models are
# trained on its corpus and are rebuilt when the version they were built from differs.
# ----------------------------------------------------------------------------------------------
GRAMMAR_VERSION = 1

NOUNS = [
    "movie",
    "film",
    "plot",
    "acting",
    "story",
    "ending",
    "cast",
    "script",
    "music",
    "director",
    "dialogue",
    "soundtrack",
    "camera work",
    "pacing",
    "lead actor",
    "villain",
    "humor",
    "finale",
]
KINDS = ["movie", "film", "story", "drama", "comedy", "thriller", "sequel"]
WORDS = {
    "positive": {
        "adj": [
            "great",
            "wonderful",
            "brilliant",
            "excellent",
            "beautiful",
            "fun",
            "superb",
            "delightful",
            "charming",
            "amazing",
            "good",
            "lovely",
            "fantastic",
            "touching",
        ],
        "verb": ["loved", "enjoyed", "liked", "admired", "adored", "appreciated"],
        "feeling": ["happy", "glad", "thrilled", "delighted", "grateful"],
    },
    "negative": {
        "adj": [
            "terrible",
            "awful",
            "boring",
            "dull",
            "bad",
            "horrible",
            "weak",
            "stupid",
            "painful",
            "dreadful",
            "ugly",
            "poor",
            "disappointing",
            "annoying",
        ],
        "verb": ["hated", "disliked", "regretted", "despised", "resented"],
        "feeling": ["sad", "angry", "bored", "upset", "tired"],
    },
    "neutral": {
        "adj": [
            "long",
            "short",
            "slow",
            "quiet",
            "simple",
            "old",
            "typical",
            "loud",
            "familiar",
            "dark",
            "new",
            "different",
            "plain",
            "real",
        ],
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
        sentences.append(
            rng.choice(TEMPLATES).format(
                noun=noun,
                noun2=noun2,
                kind=rng.choice(KINDS),
                adv=rng.choice(ADVERBS),
                time=rng.choice(TIMES),
                adj=rng.choice(words["adj"]),
                verb=rng.choice(words["verb"]),
                feeling=rng.choice(words["feeling"]),
            )
        )
    return " ".join(sentences)


def split_review(review: str) -> tuple[str, str]:
    """GRUE's split: the prompt is the first half of the whitespace-separated words."""
    words = review.split(" ")
    half = len(words) // 2
    return " ".join(words[:half]), " " + " ".join(words[half:])


@functools.cache  # every make_task("sentiment") reads the same reviews: written once per process (0.4 s each time)
def sentiment_corpus(n: int, seed: int) -> tuple[str, ...]:
    """`n` reviews from the grammar, reproducible from `seed`."""
    rng = random.Random(seed)
    return tuple(make_review(rng) for _ in range(n))


# The grammar read backwards: which word sequences each template slot accepts. A sentence is valid when
# it is an instance of one template with words from these lists; a review is 3 or 4 valid sentences.
# The recogniser makes `eval/grammatical` exact on this task: fluency measured, not estimated.
def _phrases(words: Sequence[str]) -> list[tuple[str, ...]]:
    return sorted({tuple(w.split()) for w in words})


_SLOTS = {
    "noun": _phrases(NOUNS),
    "noun2": _phrases(NOUNS),
    "kind": _phrases(KINDS),
    "adv": _phrases(ADVERBS),
    "time": _phrases(TIMES),
    **{
        slot: _phrases([w for sentiment in WORDS.values() for w in sentiment[slot]])
        for slot in ("adj", "verb", "feeling")
    },
}
_TEMPLATE_SLOTS = [tuple(t[1:-1] if t.startswith("{") else (t,) for t in template.split()) for template in TEMPLATES]


def _sentence_ends(words: Sequence[str], start: int) -> tuple[set[int], bool]:
    """Where a valid sentence starting at `words[start]` can end (exclusive indices), and whether the text
    runs out inside one (words[start:] is a non-empty proper prefix of some valid sentence)."""
    ends, prefix = set(), False

    def walk(slots, pos, noun):
        nonlocal prefix
        if not slots:
            ends.add(pos)
            return
        if pos == len(words):
            prefix = prefix or pos > start
            return
        slot, rest = slots[0], slots[1:]
        options = _SLOTS[slot] if slot in _SLOTS else [slot]
        for option in options:
            if slot == "noun2" and option == noun:  # the grammar draws two different nouns
                continue
            got = tuple(words[pos : pos + len(option)])
            if got == option:
                walk(rest, pos + len(option), option if slot == "noun" else noun)
            elif pos + len(got) == len(words) and option[: len(got)] == got:  # text ends inside a phrase
                prefix = True

    for slots in _TEMPLATE_SLOTS:
        walk(slots, start, None)
    return ends, prefix


def is_review(text: str, cut_off: bool = False) -> bool:
    """Is `text` a review the grammar can write: 3 or 4 sentences, each an instance of one template with
    words from the grammar's lists? With `cut_off` (the length limit stopped the text), a text that ends
    inside its 1st-4th sentence counts when what is there is a valid prefix."""
    words = text.split()
    frontier = {0}
    for sentences in range(1, 5):
        reached = set()
        for pos in frontier:
            ends, prefix = _sentence_ends(words, pos)
            if cut_off and prefix:
                return True
            reached |= ends
        if len(words) in reached and (sentences >= 3 or cut_off):
            return True
        frontier = reached - {len(words)}
        if not frontier:
            return False
    return False


def _fill(slots: Sequence, noun: Optional[tuple], rng: random.Random) -> list[str]:
    """Words for the rest of a sentence's template slots, drawn as the grammar draws them: a sentiment class
    for the sentence's one adjective, verb or feeling, and a second noun different from the first."""
    sentiment = rng.choice(["positive", "negative", "neutral"])
    words = []
    for slot in slots:
        if not isinstance(slot, str):  # a fixed word of the template
            option = slot
        elif slot in ("adj", "verb", "feeling"):
            option = tuple(rng.choice(WORDS[sentiment][slot]).split())
        else:
            option = rng.choice([o for o in _SLOTS[slot] if not (slot == "noun2" and o == noun)])
        noun = option if slot == "noun" else noun
        words += option
    return words


def continue_review(prompt: str, rng: random.Random) -> str:
    """A fresh continuation of `prompt` from the grammar: the sentence the prompt stops inside is completed
    (one of its parses, with new words for the slots not yet written) and new sentences follow, so that
    prompt + continuation is a review of 3 or 4 sentences. Each new sentence has its own random sentiment,
    so one prompt gets continuations of every sentiment (the offline log of `sentiment_grammar`)."""
    words = prompt.split()
    starts = {0: 0}  # where an unfinished sentence may start -> the complete sentences before it
    frontier = {0}
    for sentences in range(1, 5):
        reached = set()
        for pos in frontier:
            reached |= _sentence_ends(words, pos)[0]
        for pos in reached:
            starts.setdefault(pos, sentences)
        frontier = reached - {len(words)}
    tails = []  # (sentences in the prompt, the words that finish its last sentence)

    def walk(slots, before, i, at, noun):
        """Match words[at:] against the template `slots` from slot i; every way the prompt can end inside the
        template adds a tail (the rest of the template filled, after `before` complete sentences)."""
        if at == len(words):
            tails.append((before + 1, _fill(slots[i:], noun, rng)))
            return
        if i == len(slots):
            return
        slot = slots[i]
        for option in _SLOTS[slot] if isinstance(slot, str) else [slot]:
            if slot == "noun2" and option == noun:
                continue
            got = tuple(words[at : at + len(option)])
            if got == option:
                walk(slots, before, i + 1, at + len(option), option if slot == "noun" else noun)
            elif at + len(got) == len(words) and option[: len(got)] == got:  # ends inside a phrase
                tails.append((before + 1, list(option[len(got) :]) + _fill(slots[i + 1 :], noun, rng)))

    for pos, before in starts.items():
        if pos == len(words):
            tails.append((before, []))
            continue
        for slots in _TEMPLATE_SLOTS:  # templates whose beginning the unfinished words are
            walk(slots, before, 0, pos, None)
    tails = [t for t in tails if t[0] <= 4]
    if not tails:
        raise ValueError(f"the grammar cannot continue {prompt!r}")
    sentences, continuation = rng.choice(tails)
    for _ in range(max(rng.choice([3, 4]), sentences) - sentences):
        continuation += _fill(rng.choice(_TEMPLATE_SLOTS), None, rng)
    return " " + " ".join(continuation)


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
class RewardError(ValueError):
    """The reward function returned something other than one finite float per response. Before training
    it is bad input; during training the scripts stop with one line and keep the last checkpoint."""


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
    corpus: Optional[Callable[[], Sequence[str]]] = None
    """texts the built-in tiny models of this task are pretrained on (embedded tasks only)"""
    pretrain_pairs: Optional[Callable[[], list[tuple[str, str]]]] = None
    """(input, target) pairs the built-in tiny seq2seq model is pretrained on (embedded tasks only)"""
    offline_data: Optional[Callable[[int], list[dict]]] = None
    """offline_data(seed) -> [{"prompt", "response", "reward"}]: logged responses of mixed quality on
    training prompts (never on held-out ones), for the offline methods (ILQL, A-LoL)"""
    eval_references: Optional[list[Optional[str]]] = None
    """the reference continuation of each held-out prompt (None where a prompt has none), for
    `eval/perplexity`; None when the task has no references at all"""
    grammatical: Optional[Callable[[str, bool], bool]] = None
    """grammatical(prompt + response, cut_off) -> whether the text is valid in the task's own grammar
    (embedded sentiment only); `cut_off`: the length limit stopped the response, so a valid prefix counts"""
    builtin_models_of: Optional[str] = None
    """the task whose built-in models this one uses (the same corpus); None: its own"""
    extra: dict = field(default_factory=dict)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Rewards for a batch; fails loudly on a reward that is not a finite number. Scored in full
        precision: a classifier reward called inside a script's bf16 autocast region still runs in fp32."""
        from common.utils import full_precision

        with full_precision():
            raw = self.reward_fn(prompts, responses)
        try:
            rewards = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):  # None, strings, ragged lists: not numbers at all
            rewards = None
        if rewards is None or rewards.shape != (len(responses),) or not np.all(np.isfinite(rewards)):
            shown = " ".join(repr(raw).split())  # one line, whatever the type
            raise RewardError(
                f"task {self.name!r}: the reward function returned {shown[:200]}; "
                f"expected {len(responses)} finite floats"
            )
        return rewards


@functools.lru_cache(maxsize=1)
def _grammar_vocabulary() -> list[str]:
    """The words a bag of corrupted text is drawn from: those of 500 grammar reviews, sorted."""
    return sorted({w for r in sentiment_corpus(500, seed=0) for w in r.split(" ")})


def corrupt(response: str, rng: random.Random) -> str:
    """A noisy copy of a logged response: its words shuffled, a random bag of grammar words, or its first one
    or two words (one kind each, with equal chance)."""
    words = response.split()
    kind = rng.choice(["shuffle", "bag", "short"])
    if kind == "shuffle":
        rng.shuffle(words)
    elif kind == "bag":
        words = rng.choices(_grammar_vocabulary(), k=rng.randint(3, 12))
    else:
        words = words[: rng.randint(1, 2)]
    return " " + " ".join(words)


def make_sentiment_task(n_train: int = 4096, n_eval: int = 256, n_corpus: int = 16000) -> Task:
    """The embedded sentiment task: grammar reviews, VADER reward on the continuation."""
    train_prompts = sorted({split_review(r)[0] for r in sentiment_corpus(4 * n_train, seed=1)})
    random.Random(1).shuffle(train_prompts)
    train_prompts = train_prompts[:n_train]
    seen = set(train_prompts)
    eval_prompts, eval_references = [], []
    for review in sentiment_corpus(8 * n_eval, seed=2):
        prompt, continuation = split_review(review)
        if prompt not in seen:  # held-out means never trained on
            seen.add(prompt)
            eval_prompts.append(prompt)
            eval_references.append(continuation)  # the review's own second half (GRUE's reference)
        if len(eval_prompts) == n_eval:
            break

    def offline_data(seed: int, n: int = 4096, noise: float = 0.2) -> list[dict]:
        """Grammar continuations (the pretrained distribution: mixed sentiment) and, with probability
        `noise`, a corrupted response: its words shuffled, a random bag of grammar words, or one or two
        words. Every response is scored by the task's reward, like a logged dataset with its rewards."""
        rng = random.Random(seed)
        held_out = set(eval_prompts)
        data = []
        for review in sentiment_corpus(2 * n, seed=1000 + seed):
            prompt, response = split_review(review)
            if prompt in held_out:
                continue
            if rng.random() < noise:
                response = corrupt(response, rng)
            data.append({"prompt": prompt, "response": response})
            if len(data) == n:
                break
        rewards = vader_compound([d["response"] for d in data])
        for d, r in zip(data, rewards, strict=True):
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
        eval_references=eval_references,
        grammatical=is_review,
        extra={"grammar_version": GRAMMAR_VERSION},
    )


def make_sentiment_grammar_task() -> Task:
    """`sentiment` whose reward also sees fluency, and whose offline log holds good and bad answers to the same
    prompts: the A-LoL experiment (docs/alol.md). The reward is VADER's compound score of the continuation minus
    1 when prompt + continuation is not a review the grammar can write, in [-2, 1], like the LoL paper's Reddit
    reward, which adds a fluency classifier's score to the others. The prompts, references and built-in models
    are `sentiment`'s."""
    task = make_sentiment_task()

    def reward(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        fluent = np.array([is_review(p + r) for p, r in zip(prompts, responses, strict=True)], dtype=np.float64)
        return vader_compound(responses) - (1.0 - fluent)

    def offline_data(seed: int, n: int = 4096, per_prompt: int = 4, noise: float = 0.25) -> list[dict]:
        """`per_prompt` responses to each training prompt: the review's own continuation and fresh ones from
        the grammar (`continue_review`: mixed sentiment), each replaced with probability `noise` by a
        corrupted copy (its words shuffled, a bag of random grammar words, or its first one or two words),
        which the grammar rejects and the reward therefore scores 1 lower. Every response is scored by the
        task's reward, like a logged dataset with its rewards."""
        rng = random.Random(seed)
        held_out = set(task.eval_prompts)
        data = []
        for review in sentiment_corpus(2 * n, seed=2000 + seed):
            prompt, own = split_review(review)
            if prompt in held_out:
                continue
            for response in [own] + [continue_review(prompt, rng) for _ in range(per_prompt - 1)]:
                if rng.random() < noise:
                    response = corrupt(response, rng)
                data.append({"prompt": prompt, "response": response})
            if len(data) >= n:
                break
        data = data[:n]
        for d, r in zip(data, reward([d["prompt"] for d in data], [d["response"] for d in data]), strict=True):
            d["reward"] = float(r)
        return data

    return dataclasses.replace(
        task, name="sentiment_grammar", reward_fn=reward, offline_data=offline_data, builtin_models_of="sentiment"
    )


def make_wordle_task() -> Task:
    """The multi-turn Wordle game (ILQL's benchmark), from common/wordle.py's pieces. It is multi-turn
    (`extra["multi_turn"]`): there are no prompts to continue and no text reward; methods play games with
    `wordle.play` and read offline games with `wordle.offline_games`."""
    from common import wordle  # imported on use: single-turn scripts never load the word list

    def no_text_reward(prompts, responses):
        raise ValueError("wordle is multi-turn: it is played with common.wordle.play, not scored per response")

    return Task(
        name="wordle",
        train_prompts=[],
        eval_prompts=[],
        reward_fn=no_text_reward,
        max_prompt_tokens=1 + 12 * (wordle.MAX_GUESSES - 1),
        max_new_tokens=6,
        offline_data=lambda seed, n=4096: [
            {"answer": g.answer, "guesses": g.guesses, "text": g.text(), "reward": g.ret}
            for g in wordle.offline_games(wordle.DEFAULT_DATA, n, seed)
        ],
        extra={"multi_turn": True, "words": wordle.words_digest()},
    )


TASKS: dict[str, Callable[[], Task]] = {
    "sentiment": make_sentiment_task,
    "sentiment_grammar": make_sentiment_grammar_task,
    "wordle": make_wordle_task,
}


# ----------------------------------------------------------------------------------------------
# Hub tasks: GRUE IMDB and your own prompts. Data and reward models come from the hub or from local
# copies; `datasets` is imported on this path only (the embedded tasks never need it).
# ----------------------------------------------------------------------------------------------
DATASETS_REQUIREMENT = "datasets==5.2.0"
IMDB_DATASET = "stanfordnlp/imdb"
IMDB_REWARD_MODEL = "lvwerra/distilbert-imdb"
GRUE_SEED = 42  # RL4LMs' IMDB datapool seed (PR #50): shuffles the train split (80/20) and the test split
GRUE_TEST_SIZE = 5000  # RL4LMs evaluates on the first 5,000 reviews of the shuffled test split
HOLDOUT_FRACTION = 0.1  # jsonl without "split": "eval" lines: this share of distinct prompts is held out
HUB_FLAGS = ("dataset", "prompts_file", "reward_model", "reward_label", "reward_fn")  # TaskArgs fields
TASK_FLAGS = {
    "imdb": ("dataset", "reward_model", "reward_label", "reward_fn"),
    "jsonl": ("prompts_file", "reward_model", "reward_label", "reward_fn"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("name" or "org/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


class ClassifierReward:
    """reward(prompts, responses) = softmax(classifier(prompt + response))[label].

    Any `AutoModelForSequenceClassification` (hub id or `save_pretrained` directory). The prompt is
    included, as in GRUE's IMDB training reward (`include_prompt_for_eval: True`): the classifier
    judges the whole review. Batched, no gradients, on `device`; texts longer than the classifier's
    window keep their last tokens (left truncation, as GRUE's reward tokenizer). A one-output model
    (a reward-model head, num_labels = 1) scores with its raw logit instead of a probability.
    """

    def __init__(self, name: str, label: Optional[str], device, batch_size: int = 32):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers import logging as hf_logging

        from common.builtin_models import BUILTIN_MODELS
        from common.models import resolve_model_path

        if name in BUILTIN_MODELS:
            raise ValueError(f"--reward-model {name!r} is a built-in policy, not a sequence classifier")
        path = resolve_model_path(name, None)  # FileNotFoundError for a missing local path
        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval().to(device)
        if self.tokenizer.pad_token is None:  # GPT-2-style classifiers have none
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        config = self.model.config
        window = getattr(config, "max_position_embeddings", None) or 512
        self.max_length = min(window, self.tokenizer.model_max_length or window)
        self.device, self.batch_size, self.name = device, batch_size, name
        id2label = {int(i): str(v) for i, v in (config.id2label or {}).items()}
        n = config.num_labels
        if label is None:
            if n > 2:
                raise ValueError(f"reward model {name!r} has {n} labels ({id2label}); choose one with --reward-label")
            self.index = n - 1  # 2 labels: index 1, the positive class (GRUE: label_ix 1); 1 output: it
        else:
            names = [i for i, v in sorted(id2label.items()) if v == label] or [
                i for i, v in sorted(id2label.items()) if v.lower() == label.lower()
            ]
            if names:
                self.index = names[0]
            elif label.isdigit() and int(label) < n:
                self.index = int(label)
            else:
                raise ValueError(
                    f"--reward-label {label!r} is not a label of reward model {name!r} "
                    f"(labels: {id2label or list(range(n))})"
                )
        self.label = id2label.get(self.index, str(self.index))
        self.raw_logit = n == 1

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        import torch

        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        scores = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[i : i + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                # Only ids and mask: single-text inputs need no token types (DistilBERT takes none).
                logits = self.model(
                    input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
                ).logits.float()
                column = logits if self.raw_logit else logits.softmax(-1)
                scores.append(column[:, self.index].cpu())
        return torch.cat(scores).double().numpy() if scores else np.zeros(0)


def load_reward_fn(spec: str) -> Callable[[Sequence[str], Sequence[str]], Sequence[float]]:
    """`module:function` (importable from the current directory or PYTHONPATH) or `file.py:function`. The module and
    the function are the user's code: whatever they raise, importing or scoring, becomes one line naming --reward-fn
    (a ValueError, and a RewardError while scoring), not a traceback through our scripts."""
    module_name, _, fn_name = spec.rpartition(":")
    if not module_name or not fn_name.isidentifier():
        raise ValueError(f"--reward-fn {spec!r}: expected module:function, e.g. my_rewards:score")
    if module_name.endswith(".py") and not os.path.isfile(module_name):
        raise FileNotFoundError(f"--reward-fn {spec!r}: file {module_name!r} does not exist")
    module = None
    try:
        if module_name.endswith(".py"):
            loader = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())  # the scripts' sys.path[0] is the repository, not the cwd
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward-fn {spec!r}: cannot import {module_name!r} ({e})") from e
    except Exception as e:  # the user's module failed while it ran (a syntax error, an exception at import)
        raise ValueError(f"--reward-fn {spec!r}: importing {module_name!r} raised {_user_error(e, module)}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec!r}: module {module_name!r} has no function {fn_name!r}")

    def reward(prompts: Sequence[str], responses: Sequence[str]):
        try:
            return fn(prompts, responses)
        except Exception as e:  # the user's function, not ours: the scripts stop with this one line
            raise RewardError(f"--reward-fn {spec} raised {_user_error(e, module)}") from e

    return reward


def _user_error(error: Exception, module) -> str:
    """`ValueError: message (my_rewards.py, line 5)`: the exception and the deepest line of the user's file it
    passed through (or the deepest line of all, for an error raised before that file ran)."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError):  # the position is the error's own, not a frame's
        where = f" ({os.path.basename(error.filename or '?')}, line {error.lineno})"
        return f"SyntaxError: {error.msg}{where}"
    own = [f for f in frames if f.filename == getattr(module, "__file__", None)] or frames
    where = f" ({os.path.basename(own[-1].filename)}, line {own[-1].lineno})" if own else ""
    return f"{type(error).__name__}: {error}{where}"


def _reward_device(args):
    """The policy's device: the scripts' `pick_device(args.cuda)`, this rank's GPU under torchrun."""
    import torch

    if getattr(args, "cuda", True) and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def _check_reward_flags(task_name: str, args, default_model: Optional[str]) -> None:
    model, fn = getattr(args, "reward_model", None), getattr(args, "reward_fn", None)
    if model is not None and fn is not None:
        raise ValueError("give --reward-model or --reward-fn, not both")
    if fn is not None and getattr(args, "reward_label", None) is not None:
        raise ValueError("--reward-label chooses a label of --reward-model; it does not apply to --reward-fn")
    if model is None and fn is None and default_model is None:
        raise ValueError(
            f"task {task_name} needs a reward: --reward-model <hub id or directory> or --reward-fn module:function"
        )


def _make_reward(args, default_model: Optional[str]):
    if getattr(args, "reward_fn", None) is not None:
        return load_reward_fn(args.reward_fn)
    return ClassifierReward(
        getattr(args, "reward_model", None) or default_model, getattr(args, "reward_label", None), _reward_device(args)
    )


def load_imdb_texts(source: Optional[str] = None) -> tuple[list[str], list[str], list[str]]:
    """GRUE's IMDB datapool: (train, val, test) review texts.

    Train and val: the `train` split shuffled with seed 42, first 80% / last 20% (20k / 5k). Test:
    the `test` split shuffled with seed 42, first 5,000. `datasets`' shuffle is the one RL4LMs calls,
    so the orders are RL4LMs'. `source`: a hub id (default `stanfordnlp/imdb`), a directory written
    by `save_to_disk`, or a local data directory `load_dataset` reads (e.g. train/test parquet or json).
    """
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"task imdb needs the datasets package: pip install {DATASETS_REQUIREMENT}") from e
    source = source or IMDB_DATASET
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        saved = any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
        data = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
    elif _looks_like_path(source):
        raise FileNotFoundError(f"dataset path {source!r} does not exist")
    else:
        data = datasets.load_dataset(source)
    if (
        not isinstance(data, datasets.DatasetDict)
        or not {"train", "test"} <= set(data)
        or any("text" not in data[s].column_names for s in ("train", "test"))
    ):
        raise ValueError(f"dataset {source!r} needs a 'train' and a 'test' split with a 'text' column")
    train = data["train"].shuffle(seed=GRUE_SEED)
    cut = int(len(train) * 0.8)
    test = data["test"].shuffle(seed=GRUE_SEED)
    return train[:cut]["text"], train[cut:]["text"], test[:GRUE_TEST_SIZE]["text"]


def make_imdb_task(args=None) -> Task:
    """GRUE's IMDB continuation task (Ramamurthy et al., 2023; RL4LMs `imdb_text_continuation`).

    Prompt: the first 50% of a review's whitespace-separated words (`split_review`), truncated by the
    scripts to its last 64 tokens; the other 50% is its reference continuation (`eval/perplexity`).
    Exactly 48 new tokens. Reward: `lvwerra/distilbert-imdb`'s P(positive)
    (label index 1) of prompt + continuation. Held-out prompts: the 5,000 test reviews; the 5,000 val
    prompts are in `extra["val_prompts"]`. The rare training prompt identical to a held-out one (IMDB
    has duplicate reviews) is dropped, so the two sets are disjoint.
    """
    _check_reward_flags("imdb", args, IMDB_REWARD_MODEL)
    train_texts, val_texts, test_texts = load_imdb_texts(getattr(args, "dataset", None))
    eval_prompts, eval_references = (
        map(list, zip(*map(split_review, test_texts), strict=True)) if test_texts else ([], [])
    )
    held_out = set(eval_prompts)
    train_prompts = [p for p in (split_review(t)[0] for t in train_texts) if p not in held_out]
    return Task(
        name="imdb",
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        reward_fn=_make_reward(args, IMDB_REWARD_MODEL),
        max_prompt_tokens=64,
        max_new_tokens=48,
        min_new_tokens=48,
        eval_references=eval_references,
        extra={"val_prompts": [split_review(t)[0] for t in val_texts]},
    )


def read_prompts_file(path: Optional[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """(train, eval) prompts of a JSONL file, and the references it gives: one object per line with a
    string "prompt", an optional "split" ("train", the default, or "eval") and an optional string
    "reference" (a good continuation, for `eval/perplexity`). Without any "eval" line, a seeded 10% of
    the distinct prompts (seed 42, the same for every --seed) is held out. The two sets are disjoint."""
    if not path:
        raise ValueError('task jsonl needs --prompts-file PATH (one JSON object per line with a "prompt" field)')
    if os.path.isdir(path):
        raise ValueError(f"prompts file {path!r} is a directory, not a JSONL file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path!r} does not exist")
    train, held_out, references = [], [], {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading byte-order mark is no text
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{path}:{number}: expected an object with a string "prompt" field')
            split = row.get("split", "train")
            if split not in ("train", "eval"):
                raise ValueError(f'{path}:{number}: "split" must be "train" or "eval", got {split!r}')
            if "reference" in row:
                if not isinstance(row["reference"], str):
                    raise ValueError(f'{path}:{number}: "reference" must be a string')
                references[row["prompt"]] = row["reference"]
            (train if split == "train" else held_out).append(row["prompt"])
    if not train and not held_out:
        raise ValueError(f"prompts file {path!r} has no prompts")
    if not held_out:
        distinct = sorted(set(train))
        if len(distinct) < 2:
            raise ValueError(
                f"prompts file {path!r}: need at least 2 distinct prompts to hold some out "
                f'(or mark held-out ones with "split": "eval")'
            )
        random.Random(GRUE_SEED).shuffle(distinct)
        held_out = distinct[: max(1, round(HOLDOUT_FRACTION * len(distinct)))]
    eval_set = set(held_out)
    train = [p for p in train if p not in eval_set]
    if not train:
        raise ValueError(f"prompts file {path!r} has no training prompts (every prompt is held out)")
    return train, list(dict.fromkeys(held_out)), references


def make_jsonl_task(args=None) -> Task:
    """Your prompts (`--prompts-file`) and reward (`--reward-model` or `--reward-fn`); prompts keep their
    last 128 tokens, responses up to 48 tokens (the scripts' --response-length overrides it)."""
    _check_reward_flags("jsonl", args, None)
    train_prompts, eval_prompts, references = read_prompts_file(getattr(args, "prompts_file", None))
    return Task(
        name="jsonl",
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        reward_fn=_make_reward(args, None),
        max_prompt_tokens=128,
        max_new_tokens=48,
        eval_references=[references.get(p) for p in eval_prompts] if references else None,
    )


HUB_TASKS: dict[str, Callable[..., Task]] = {
    "imdb": make_imdb_task,
    "jsonl": make_jsonl_task,
}


def make_task(name: str, args=None) -> Task:
    """The task `name`. `args` (any object; the scripts pass their parsed `Args`) carries the hub
    tasks' flags (`HUB_FLAGS`, read with getattr, None when absent); the embedded tasks take none."""
    given = [f for f in HUB_FLAGS if getattr(args, f, None) is not None]
    if name in TASKS:
        if given:
            raise ValueError(
                f"{', '.join(map(_flag, given))} only apply to the hub tasks "
                f"({', '.join(HUB_TASKS)}), not to task {name!r}"
            )
        return TASKS[name]()
    if name not in HUB_TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted([*TASKS, *HUB_TASKS]))}")
    stray = [f for f in given if f not in TASK_FLAGS[name]]
    if stray:
        raise ValueError(f"{', '.join(map(_flag, stray))} does not apply to task {name!r}")
    from common.builtin_models import BUILTIN_MODELS

    if getattr(args, "model_name", None) in BUILTIN_MODELS:  # said now, before any download
        raise ValueError(
            f"task {name!r} has no built-in model; pass --model-name (a hub id such as "
            f"{'lvwerra/gpt2-imdb' if name == 'imdb' else 'gpt2'}, or a directory)"
        )
    task = HUB_TASKS[name](args)
    task.score(task.train_prompts[:2], task.train_prompts[:2])  # a broken reward fails now, before training
    return task


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def diversity_metrics(texts: Sequence[str], segment: int = 100) -> dict[str, float]:
    """GRUE's diversity metrics (RL4LMs' `DiversityMetrics`, from GEM-metrics' `NGramStats` and `MSTTR`) of
    a set of generated texts, on lowercased whitespace words; n-grams never cross from one text to the next.

    distinct_n: distinct n-grams / all n-grams.  unique_n: how many n-grams occur exactly once (a count:
    it grows with the number of texts).  entropy_n: Shannon entropy in bits of the n-gram frequencies,
    -sum_g p_g log2 p_g.  msttr: mean type-token ratio of the consecutive `segment`-word windows of all the
    words in order (a last, shorter window is dropped; fewer words than one window: the ratio of them all).
    response_length: mean words per text.
    """
    from collections import Counter

    tokenized = [t.lower().split() for t in texts]
    metrics = {}
    for n in (1, 2):
        counts = Counter(tuple(words[i : i + n]) for words in tokenized for i in range(len(words) - n + 1))
        total = sum(counts.values())
        p = np.array(list(counts.values()), dtype=np.float64) / max(total, 1)
        metrics[f"eval/distinct_{n}"] = len(counts) / total if total else 0.0
        metrics[f"eval/unique_{n}"] = float(sum(1 for c in counts.values() if c == 1))
        metrics[f"eval/entropy_{n}"] = float(-(p * np.log2(p)).sum()) if total else 0.0
    words = [w for ws in tokenized for w in ws]
    windows = [words[i : i + segment] for i in range(0, len(words) - segment + 1, segment)] or [words]
    metrics["eval/msttr"] = float(np.mean([len(set(w)) / len(w) for w in windows])) if words else 0.0
    metrics["eval/response_length"] = float(np.mean([len(w) for w in tokenized])) if texts else 0.0
    return metrics


def evaluate(
    task: Task,
    generate_fn: Callable[[list[str], list[int]], list[str]],
    n_prompts: int,
    batch_size: int,
    policy=None,
    start_model=None,
    response_length: Optional[int] = None,
) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    """Score the policy's responses to the first `n_prompts` held-out prompts, with fluency and diversity
    beside the reward, as GRUE reports them (Ramamurthy et al., 2023, section 4; docs/results.md).

    `generate_fn(prompts, indices) -> responses` is the method's deployed decoding; `indices` are the
    prompts' positions in the held-out list (for per-episode seeds). Under torchrun each rank answers
    its share of the prompts and the metrics are computed over all of them, on every rank. Returns the
    `eval/*` metrics and (prompt, response, reward) samples for logging:

    - eval/return_mean, eval/return_std: the task's reward of the responses.
    - eval/perplexity (with `policy` and a task with references): exp of the mean per-token NLL of the
      held-out reference continuations under `policy`, teacher-forced after their prompts.
    - eval/ref_nll (with `start_model`): mean per-token NLL of the sampled responses (re-tokenized) under
      the starting model: how far the policy's language moved from where it started.
    - diversity of the responses (`diversity_metrics`), and on tasks with a grammar eval/grammatical: the
      fraction of prompt + response texts the grammar accepts (a response that reached `response_length`
      tokens was cut off by the limit, and may end inside a valid sentence).
    `policy` and `start_model` are `common.models.Policy` objects (anything with `text_nll`).
    """
    from common.utils import all_gather_objects, rank_share

    prompts = task.eval_prompts[:n_prompts]
    mine = rank_share(len(prompts))
    responses: list[str] = []
    for i in range(mine.start, mine.stop, batch_size):
        batch = list(range(i, min(i + batch_size, mine.stop)))
        responses += generate_fn([prompts[j] for j in batch], batch)
    my_prompts = [prompts[j] for j in mine]
    local = {"responses": responses, "rewards": task.score(my_prompts, responses).tolist() if responses else []}
    if policy is not None and task.eval_references is not None:
        with_reference = [(prompts[j], task.eval_references[j]) for j in mine if task.eval_references[j] is not None]
        nll, count = policy.text_nll(
            [p for p, _ in with_reference], [r for _, r in with_reference], task.max_prompt_tokens, batch_size
        )
        local["policy_nll"] = (float(nll.sum()), float(count.sum()))
    if start_model is not None:
        nll, count = start_model.text_nll(my_prompts, responses, task.max_prompt_tokens, batch_size)
        local["start_nll"] = (float(nll.sum()), float(count.sum()))
    if task.grammatical is not None:
        tokenizer = (policy or start_model).tokenizer if (policy or start_model) is not None else None
        cut_off = [
            response_length is not None
            and tokenizer is not None
            and len(tokenizer(r, add_special_tokens=False)["input_ids"]) >= response_length
            for r in responses
        ]
        local["grammatical"] = [
            task.grammatical(p + r, c) for p, r, c in zip(my_prompts, responses, cut_off, strict=True)
        ]
    parts = all_gather_objects(local)
    responses = [r for part in parts for r in part["responses"]]
    rewards = np.asarray([r for part in parts for r in part["rewards"]])
    metrics = {"eval/return_mean": float(rewards.mean()), "eval/return_std": float(rewards.std())}
    for key, name, transform in (("policy_nll", "eval/perplexity", np.exp), ("start_nll", "eval/ref_nll", float)):
        if key in parts[0]:
            total, count = (sum(part[key][k] for part in parts) for k in (0, 1))
            if count > 0:  # no reference at all (a jsonl file without "reference" fields): omitted, not faked
                metrics[name] = float(transform(total / count))
    if "grammatical" in parts[0]:
        metrics["eval/grammatical"] = float(np.mean([g for part in parts for g in part["grammatical"]]))
    metrics.update(diversity_metrics(responses))
    return metrics, list(zip(prompts, responses, rewards.tolist(), strict=True))


def eval_line(metrics: dict[str, float]) -> str:
    """The console summary of an evaluation: the return, then fluency and diversity where measured (Wordle: the
    share of games won and of guesses that repeat an earlier one)."""
    line = f"return {metrics['eval/return_mean']:+.3f} +- {metrics['eval/return_std']:.3f}"
    for key, label, fmt in (
        ("eval/perplexity", "ppl", ".2f"),
        ("eval/ref_nll", "ref_nll", ".2f"),
        ("eval/grammatical", "grammatical", ".2f"),
        ("eval/distinct_2", "distinct_2", ".2f"),
        ("eval/win_rate", "win rate", ".3f"),
        ("eval/repeat_rate", "repeat rate", ".3f"),
    ):
        if key in metrics:
            line += f" | {label} {metrics[key]:{fmt}}"
    return line
