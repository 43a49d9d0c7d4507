"""Wordle: the game, scripted players and offline game datasets (ILQL's benchmark, Snell et al. 2023).

The game. A hidden word is drawn uniformly from the words in play: `words.txt` (1,029 common 5-letter
words, hand-written for this project) or a fixed subset of it (`use_words(200)`, the size of the
original's experiments). The agent has 6 guesses; after each one the environment colours every letter green
(right letter, right place), yellow (in the word elsewhere) or black (absent), with the official rule
for repeated letters. Reward: -1 per guess and 0 on the guess that solves the game, so a game solved
on guess k returns -(k - 1) and a lost game returns -6 (the original code's `WordleGame.reward`).

One token per character. A game is written as the original code writes it (its `wordle_tokenizer.py`
and `rl_data.py`):

    <a>crane</a><b><b><g><b><g></s>plate</a><b><g><g><g><g></s>slate</a><g><g><g><g><g></s></eod>

Agent tokens (the 5 letters and `</a>`) are actions; the colours and `</s>` are the environment's
reply; `</eod>` closes a finished game. In the offline scripts' batch layout a turn's reward sits
on its `</a>` token and `done` is 1 on the last action token of a finished game.

Scripted players (the original `src/wordle/policy.py`, re-implemented): a greedy information-gain
`expert`, `random_consistent` (a random word that could still be the answer), `random`, `wrong` (a
word the feedback has already ruled out) and `repeat` (repeats one of its first two guesses). Offline
datasets of controllable quality mix them per turn (`"expert=0.5,repeat=0.5"`) or branch bad moves
off expert games (`"branch"`, as `generate_data_branch.py`).

Differences from the original environment, on purpose: a fixed hidden word per game (the original
redraws a consistent word each turn, which is the same distribution); the official repeated-letter
colouring (the original marks every copy of a letter yellow). As in the original, any 5-letter string
is a legal guess, words or not: a non-word costs its turn like any wrong guess.

Run `python -m common.wordle [games] [words]` to print every scripted player's return over the
evaluation games.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

WORDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "words.txt")
MAX_GUESSES = 6
LETTERS = "abcdefghijklmnopqrstuvwxyz"
BLACK, YELLOW, GREEN = 0, 1, 2
COLOUR_TOKENS = ("<b>", "<y>", "<g>")
SOLVED = sum(GREEN * 3**i for i in range(5))  # pattern id of five greens
# The character vocabulary (35 tokens like the original's): specials, colours, letters.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<a>", "</a>", "</s>", "</eod>")
VOCAB = SPECIAL_TOKENS + COLOUR_TOKENS + tuple(LETTERS)
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
PAD, BOA, EOA, EOS, EOD = (TOKEN_ID[t] for t in ("<pad>", "<a>", "</a>", "</s>", "</eod>"))
LETTER_IDS = tuple(TOKEN_ID[c] for c in LETTERS)


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------
def feedback(guess: str, answer: str) -> tuple[int, ...]:
    """Official Wordle colours: greens first; then, left to right, a letter is yellow while the
    answer still has unmatched copies of it, black otherwise (`speed` for `abide`: b b y b y)."""
    colours = [BLACK] * 5
    unmatched: dict[str, int] = {}
    for i, (g, a) in enumerate(zip(guess, answer, strict=True)):
        if g == a:
            colours[i] = GREEN
        else:
            unmatched[a] = unmatched.get(a, 0) + 1
    for i, g in enumerate(guess):
        if colours[i] != GREEN and unmatched.get(g, 0) > 0:
            colours[i] = YELLOW
            unmatched[g] -= 1
    return tuple(colours)


def pattern_id(colours: Sequence[int]) -> int:
    return int(sum(c * 3**i for i, c in enumerate(colours)))


def is_well_formed(guess: str) -> bool:
    return len(guess) == 5 and all(c in LETTERS for c in guess)


@functools.lru_cache(maxsize=None)
def shipped_words(path: str = WORDS_FILE) -> tuple[str, ...]:
    words = tuple(w.strip() for w in open(path) if w.strip() and not w.startswith("#"))
    bad = [w for w in words if not is_well_formed(w)]
    if bad or len(set(words)) != len(words):
        raise ValueError(f"{path}: every line must be a distinct 5-letter lowercase word; bad: {bad[:5]}")
    return words


_IN_PLAY: Optional[int] = None  # None: the whole shipped list


def use_words(n: Optional[int]) -> None:
    """Play on a fixed random subset of `n` words of the shipped list (None: all of it). The original's
    ILQL experiments used a 200-word subset of the official list (`wordle_official_200.txt`)."""
    global _IN_PLAY
    if n is not None and not 2 <= n <= len(shipped_words()):
        raise ValueError(f"the Wordle word list has {len(shipped_words())} words; cannot play on {n}")
    _IN_PLAY = n


def load_words() -> tuple[str, ...]:
    """The words in play, sorted: both the hidden words and the scripted players' guesses."""
    return _subset(_IN_PLAY)


@functools.lru_cache(maxsize=None)
def _subset(n: Optional[int]) -> tuple[str, ...]:
    words = shipped_words()
    return words if n is None else tuple(sorted(random.Random(0).sample(words, n)))


def words_digest() -> str:
    return hashlib.sha1("\n".join(load_words()).encode()).hexdigest()[:12]


def pattern_matrix() -> np.ndarray:
    return _pattern_matrix(_IN_PLAY)


@functools.lru_cache(maxsize=None)
def _pattern_matrix(n: Optional[int]) -> np.ndarray:
    """patterns[g, a] = pattern id of guessing word g when the answer is word a, for every pair of
    listed words, vectorised (about a million pairs in well under a second)."""
    w = np.array([[ord(c) - 97 for c in word] for word in _subset(n)], dtype=np.int8)
    G, A = w[:, None, :], w[None, :, :]  # [N, 1, 5], [1, N, 5]
    green = G == A  # [N, N, 5]
    yellow = np.zeros_like(green)
    for i in range(5):
        # copies of letter G[i] in the answer at non-green positions, minus those already used by
        # earlier yellows of the same letter in the guess
        available = sum((A[..., j] == G[..., i]) & ~green[..., j] for j in range(5))
        used = sum((G[..., k] == G[..., i]) & yellow[..., k] for k in range(i)) if i else 0
        yellow[..., i] = ~green[..., i] & (available > used)
    colours = green * GREEN + yellow * YELLOW
    return (colours * (3 ** np.arange(5))).sum(-1).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# A game and its token layout
# ----------------------------------------------------------------------------------------------
@dataclass
class Game:
    """One game: the hidden word and the guesses so far with their colours."""

    answer: str
    guesses: list[str] = field(default_factory=list)
    colours: list[tuple[int, ...]] = field(default_factory=list)
    candidates: Optional[np.ndarray] = None
    """indices of the listed words still consistent with the feedback (for the scripted players)"""

    @property
    def solved(self) -> bool:
        return bool(self.guesses) and self.guesses[-1] == self.answer

    @property
    def done(self) -> bool:
        return self.solved or len(self.guesses) >= MAX_GUESSES

    @property
    def rewards(self) -> list[float]:
        return [0.0 if g == self.answer else -1.0 for g in self.guesses]

    @property
    def ret(self) -> float:
        return float(sum(self.rewards))

    def step(self, guess: str) -> float:
        """Play one guess; returns its reward. Any 5 lowercase letters are a legal guess."""
        if self.done:
            raise ValueError("the game is over")
        if not is_well_formed(guess):
            raise ValueError(f"a guess is 5 lowercase letters, got {guess!r}")
        colours = feedback(guess, self.answer)
        if self.candidates is not None:
            index = word_index().get(guess)
            words = load_words()
            if index is not None:
                keep = pattern_matrix()[index, self.candidates] == pattern_id(colours)
            else:  # a non-word: colour it against each remaining candidate the slow way
                keep = np.array([feedback(guess, words[c]) == colours for c in self.candidates], dtype=bool)
            self.candidates = self.candidates[keep]
        self.guesses.append(guess)
        self.colours.append(colours)
        return 0.0 if guess == self.answer else -1.0

    def tokens(self) -> list[str]:
        """The transcript as tokens; ends with `</eod>` once the game is over, with `<a>` or `</s>` before
        the next guess otherwise (the context the agent guesses from)."""
        out = ["<a>"]
        for guess, colours in zip(self.guesses, self.colours, strict=True):
            out += list(guess) + ["</a>"] + [COLOUR_TOKENS[c] for c in colours] + ["</s>"]
        return out + (["</eod>"] if self.done else [])

    def layout(self) -> dict[str, list]:
        """The offline scripts' batch layout (docs/ilql.md, detail 1) for this game: token ids, action mask
        (the agent's letters and `</a>`), per-token rewards (each turn's reward on its `</a>`) and dones (1 on the
        last action token of a finished game: nothing is bootstrapped past it)."""
        ids = [TOKEN_ID[t] for t in self.tokens()]
        action = [0] * len(ids)
        rewards = [0.0] * len(ids)
        dones = [0] * len(ids)
        position = 1
        for turn, reward in enumerate(self.rewards):
            for j in range(6):  # 5 letters and </a>
                action[position + j] = 1
            rewards[position + 5] = reward
            if self.done and turn == len(self.guesses) - 1:
                dones[position + 5] = 1
            position += 12  # 6 action tokens, 5 colours, </s>
        return {"input_ids": ids, "action_mask": action, "rewards": rewards, "dones": dones}

    def text(self) -> str:
        return "".join(self.tokens())


def word_index() -> dict[str, int]:
    return _word_index(_IN_PLAY)


@functools.lru_cache(maxsize=None)
def _word_index(n: Optional[int]) -> dict[str, int]:
    return {w: i for i, w in enumerate(_subset(n))}


def new_game(answer: str) -> Game:
    return Game(answer, candidates=np.arange(len(load_words())))


def play(answers: Sequence[str], guess_fn: Callable[[list[Game]], list[str]]) -> list[Game]:
    """Play one game per answer, all at once: each round, `guess_fn` gets the unfinished games and
    returns one guess each (batched, so a model decodes every game's guess in one call)."""
    games = [new_game(a) for a in answers]
    for _ in range(MAX_GUESSES):
        active = [g for g in games if not g.done]
        if not active:
            break
        for game, guess in zip(active, guess_fn(active), strict=True):
            game.step(guess)
    return games


def play_shared(answers: Sequence[str], guess_fn: Callable[[list[Game], list[int]], list[str]]) -> list[Game]:
    """`play`, each rank (torchrun) playing its contiguous share of the answers; every rank gets all the games back.
    `guess_fn` also gets each unfinished game's position among all the answers (e.g. its sampling seed)."""
    from common.utils import all_gather_objects, rank_share

    mine = rank_share(len(answers))
    index: dict[int, int] = {}  # game -> its position among all the answers

    def guess(active: list[Game]) -> list[str]:
        if not index:  # the first turn: every game is still active, in order
            index.update({id(g): mine.start + i for i, g in enumerate(active)})
        return guess_fn(active, [index[id(g)] for g in active])

    games = play(answers[mine.start : mine.stop], guess)
    return [g for part in all_gather_objects(games) for g in part]


def game_metrics(games: Sequence[Game]) -> dict[str, float]:
    """The eval/* metrics of a set of finished games. `mean_guesses` counts a lost game's 6 guesses;
    `nonword_rate` is the fraction of guesses that are not on the word list (legal, but wasted);
    `repeat_rate` the fraction that repeat an earlier guess of the same game (the `repeat` player's move)."""
    returns = np.array([g.ret for g in games])
    guesses = [w for g in games for w in g.guesses]
    index = word_index()
    return {
        "eval/return_mean": float(returns.mean()),
        "eval/return_std": float(returns.std()),
        "eval/win_rate": float(np.mean([g.solved for g in games])),
        "eval/mean_guesses": float(np.mean([len(g.guesses) for g in games])),
        "eval/nonword_rate": float(np.mean([w not in index for w in guesses])),
        "eval/repeat_rate": float(np.mean([w in g.guesses[:i] for g in games for i, w in enumerate(g.guesses)])),
    }


def eval_answers(n: int, seed: int = 20230101) -> list[str]:
    """The hidden words of the evaluation games: the word list in a fixed shuffled order, cycled, so
    every method and every evaluation plays the same games and 1,029 games cover each word once."""
    words = list(load_words())
    random.Random(seed).shuffle(words)
    return [words[i % len(words)] for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Scripted players: (game, rng) -> guess
# ----------------------------------------------------------------------------------------------
_EXPERT_CACHE: dict[tuple, int] = {}


def expert(game: Game, rng: random.Random) -> str:
    """Greedy, myopic information gain (like the original `OptimalPolicy`, which chooses among the remaining
    candidates only and opens from a curated list): the listed word whose colour pattern splits the remaining
    candidates into the highest-entropy partition; ties go to words that could still be the answer, then to
    the first in the list. Deterministic and cached by state."""
    words, candidates = load_words(), game.candidates
    key = (_IN_PLAY, candidates.tobytes())
    if key not in _EXPERT_CACHE:
        if len(candidates) <= 2:
            choice = int(candidates[0])
        else:
            # entropy of each guess's partition of the candidates: sort each row of patterns, cut it
            # into runs of equal patterns, and sum -p log p over the runs (fast for any number left)
            n, s = len(words), len(candidates)
            patterns = np.sort(pattern_matrix()[:, candidates], axis=1).ravel()
            starts = np.flatnonzero(np.r_[True, patterns[1:] != patterns[:-1]] | (np.arange(n * s) % s == 0))
            p = np.diff(np.r_[starts, n * s]) / s
            entropy = np.bincount(starts // s, weights=-p * np.log2(p), minlength=n)
            entropy[candidates] += 1e-6  # prefer a word that can win outright
            choice = int(np.argmax(entropy))
        _EXPERT_CACHE[key] = choice
    return words[_EXPERT_CACHE[key]]


def random_consistent(game: Game, rng: random.Random) -> str:
    """A uniformly random word that could still be the answer."""
    return load_words()[int(game.candidates[rng.randrange(len(game.candidates))])]


def random_word(game: Game, rng: random.Random) -> str:
    """A uniformly random listed word."""
    words = load_words()
    return words[rng.randrange(len(words))]


def wrong(game: Game, rng: random.Random) -> str:
    """A word the feedback has already ruled out (the original `WrongPolicy`); random on the first turn."""
    words = load_words()
    if len(game.candidates) == len(words):
        return random_word(game, rng)
    ruled_out = np.setdiff1d(np.arange(len(words)), game.candidates, assume_unique=True)
    return words[int(ruled_out[rng.randrange(len(ruled_out))])]


def repeat(game: Game, rng: random.Random, first_n: int = 2) -> str:
    """Repeats one of its first `first_n` guesses (the original `RepeatPolicy(first_n=2)`): a wasted
    turn that reveals nothing. Random on the first turn."""
    if not game.guesses:
        return random_word(game, rng)
    return game.guesses[rng.randrange(min(first_n, len(game.guesses)))]


PLAYERS: dict[str, Callable[[Game, random.Random], str]] = {
    "expert": expert,
    "random_consistent": random_consistent,
    "random": random_word,
    "wrong": wrong,
    "repeat": repeat,
}


def parse_mixture(spec: str) -> dict[str, float]:
    """`"expert=0.5,repeat=0.5"` -> {"expert": 0.5, "repeat": 0.5}; a bare name has weight 1."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in PLAYERS:
            raise ValueError(f"unknown Wordle player {name!r} in {spec!r}; players: {', '.join(PLAYERS)}")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight!r} for player {name!r} in {spec!r}") from None
        if weights[name] < 0:
            raise ValueError(f"negative weight for player {name!r} in {spec!r}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"the weights in {spec!r} sum to zero")
    return weights


def mixture(spec: str) -> Callable[[Game, random.Random], str]:
    """A player that picks one of the named players at random every turn, by weight."""
    weights = parse_mixture(spec)
    names, probs = list(weights), list(weights.values())

    def player(game: Game, rng: random.Random) -> str:
        return PLAYERS[rng.choices(names, probs)[0]](game, rng)

    return player


# ----------------------------------------------------------------------------------------------
# Offline datasets
# ----------------------------------------------------------------------------------------------
def _copy(game: Game) -> Game:
    return Game(game.answer, list(game.guesses), list(game.colours), game.candidates)


def _finish(game: Game, player, rng: random.Random) -> Game:
    while not game.done:
        game.step(player(game, rng))
    return game


def offline_games(spec: str, n_games: int, seed: int) -> list[Game]:
    """`n_games` finished games whose hidden words are uniform over the list, reproducible from `seed`.

    - `"expert=0.5,repeat=0.5"` (any players and weights): every turn of every game is played by one
      of the players, drawn by weight (the original's 50/50 `noisy_wordle_iterable`): per move.
    - `"game:expert=0.5,repeat=0.5"`: one player drawn by weight plays the whole game: per game, so every
      bad move sits in a bad game and keeping the best games (%BC) removes them all.
    - `"branch"` / `"branch:<player>"`: expert games and, from every state of each, a branch where
      `<player>` (default `wrong`) makes one move and the expert finishes the game
      (`generate_data_branch.py` with `n_suboptimal: 1`); `n_games` counts all games, branches included.
    """
    rng = random.Random(seed)
    words = load_words()
    games: list[Game] = []
    if spec.startswith("branch"):
        bad_name = spec.partition(":")[2] or "wrong"
        if spec.partition(":")[0] != "branch" or bad_name not in PLAYERS:
            raise ValueError(f"bad Wordle dataset {spec!r}: `branch:<player>` with a player in {', '.join(PLAYERS)}")
        bad = PLAYERS[bad_name]
        while len(games) < n_games:
            game = new_game(words[rng.randrange(len(words))])
            branches = []
            while not game.done:
                branch = _copy(game)
                branch.step(bad(branch, rng))
                branches.append(_finish(branch, expert, rng))
                game.step(expert(game, rng))
            games += [game] + branches
        return games[:n_games]
    if spec.startswith("game:"):
        weights = parse_mixture(spec[len("game:") :])
        names, probs = list(weights), list(weights.values())
        for _ in range(n_games):
            game = new_game(words[rng.randrange(len(words))])
            games.append(_finish(game, PLAYERS[rng.choices(names, probs)[0]], rng))
        return games
    player = mixture(spec)
    return [_finish(new_game(words[rng.randrange(len(words))]), player, rng) for _ in range(n_games)]


# ----------------------------------------------------------------------------------------------
# The character-level model: tokenizer and a fresh tiny GPT-2
# ----------------------------------------------------------------------------------------------
def char_tokenizer():
    """One token per character of the transcript, `<...>` tags whole; saves with `save_pretrained`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<[^<>]*>|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<a>", eos_token="</eod>", pad_token="<pad>", unk_token="<unk>"
    )


def char_policy(seed: int, n_layer: int = 2, n_embd: int = 128, n_head: int = 4, device="cpu"):
    """A randomly initialised GPT-2 over the character vocabulary, wrapped as a `Policy`. Like the
    original's `gpt2_plain` it is trained from scratch: the BC term of the offline method is its
    pretraining. Seeded on its own, so the caller's RNG stream is untouched."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers import logging as hf_logging

    from common.models import Policy

    config = GPT2Config(
        vocab_size=len(VOCAB),
        n_positions=1 + 12 * MAX_GUESSES + 1,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=BOA,
        eos_token_id=EOD,
        pad_token_id=PAD,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    tokenizer = char_tokenizer()
    tokenizer.padding_side = "left"
    hf_logging.disable_progress_bar()  # as load_policy: no progress bars in every run's output
    return Policy(model, tokenizer).to(device)


class GuessGrammar:
    """A transformers logits processor for generating one guess after a context of `context_len`
    tokens: only letters for the first 5 new tokens, then only `</a>`. Every decoded guess is then
    well formed (a non-word is still possible, and legal)."""

    def __init__(self, context_len: int):
        self.context_len = context_len

    def __call__(self, input_ids, scores):
        import torch

        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        allowed[list(LETTER_IDS) if input_ids.shape[1] - self.context_len < 5 else [EOA]] = True
        return scores.masked_fill(~allowed, float("-inf"))


class NoRepeat:
    """An oracle for diagnosis, after `GuessGrammar`: forbids the 5th letter that would complete one of the
    row's earlier guesses (`earlier[i]` for row i), so a guess is never repeated. Decoding `pi_beta` with it is
    the best a policy that can only veto moves of `pi_beta` could do about repeats (docs/ilql.md)."""

    def __init__(self, context_len: int, earlier: Sequence[Sequence[str]]):
        self.context_len, self.earlier = context_len, earlier

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.context_len != 4:  # only the last letter decides a repeat
            return scores
        scores = scores.clone()
        for row, (ids, guesses) in enumerate(zip(input_ids[:, self.context_len :].tolist(), self.earlier, strict=True)):
            prefix = "".join(VOCAB[i] for i in ids)
            for guess in guesses:
                if guess[:4] == prefix:
                    scores[row, TOKEN_ID[guess[4]]] = float("-inf")
        return scores


def play_eval_games(n: int, generate: Callable, seed: int, device, no_repeat: bool = False) -> list[Game]:
    """The first `n` evaluation games played by a model, each rank its share (`play_shared`). Every turn the
    unfinished games' transcripts, all the same length, are one batch, and `generate(context, mask, 6, 0, rules,
    seeds)` returns the next guess's tokens (5 letters and `</a>`) and mask, as `Policy.generate` does, under the
    `rules` (`GuessGrammar`, then `NoRepeat` if `no_repeat`), each game sampling from its own seed (stream 1 of
    `seed`, the game's position among the `n`)."""
    import torch

    from common.utils import episode_seeds

    def guesses(games: list[Game], indices: list[int]) -> list[str]:
        context = torch.tensor([[TOKEN_ID[t] for t in g.tokens()] for g in games], device=device)
        rules = [GuessGrammar(context.shape[1])]
        rules += [NoRepeat(context.shape[1], [g.guesses for g in games])] if no_repeat else []
        seeds = episode_seeds(seed, 1, len(games[0].guesses), indices)
        ids, _ = generate(context, torch.ones_like(context), 6, 0, rules, seeds)
        return ["".join(VOCAB[i] for i in row[:5]) for row in ids.tolist()]

    return play_shared(eval_answers(n), guesses)


# ----------------------------------------------------------------------------------------------
# The offline data of the `wordle` task (common/tasks.py builds the Task from this module's pieces)
# ----------------------------------------------------------------------------------------------
DEFAULT_DATA = "expert=0.5,repeat=0.5"


@dataclass
class WordleArgs:
    """The Wordle task's flags (ilql.py's Args inherits them): the offline games, the words in play, and the size of
    the from-scratch character GPT-2 that `--model-name tiny-gpt2` gives on Wordle. Their allowed values are in
    common/utils.py `COMMON_LIMITS`."""

    wordle_data: str = DEFAULT_DATA
    """Wordle offline games: per move `name=weight,...`, per game `game:name=weight,...` or `branch[:player]`"""
    wordle_games: int = 4096
    """number of offline Wordle games"""
    wordle_vocab: int = 200
    """play on a fixed subset of this many words of the shipped list (0: all 1,029)"""
    wordle_layers: int = 2
    """layers of the from-scratch character GPT-2 that `--model-name tiny-gpt2` gives on Wordle"""
    wordle_width: int = 32
    """hidden size of that character GPT-2"""


def main(n_games: int = 1029, n_words: Optional[int] = None) -> None:
    """Mean return +- standard error of every scripted player over the evaluation games."""
    import time

    use_words(n_words)
    answers = eval_answers(n_games)
    print(f"| player | return | win rate | guesses | ({n_games} games, {len(load_words())} words)")
    for name, player in PLAYERS.items():
        start, rng = time.time(), random.Random(0)
        metrics = game_metrics(play(answers, lambda games, player=player, rng=rng: [player(g, rng) for g in games]))
        se = metrics["eval/return_std"] / np.sqrt(n_games)
        print(
            f"| {name} | {metrics['eval/return_mean']:+.3f} +- {se:.3f} | {metrics['eval/win_rate']:.3f} "
            f"| {metrics['eval/mean_guesses']:.2f} | {time.time() - start:.1f}s"
        )


if __name__ == "__main__":
    import sys

    main(*(int(a) for a in sys.argv[1:3]))  # python -m common.wordle [n_games] [n_words]
