"""common/wordle.py: the rules (colours, repeated letters, reward, termination), the token layout,
the character tokenizer, the scripted players (the expert beats random) and the offline datasets."""

import random
import time

import numpy as np
import pytest
import torch

from common import wordle
from common.tasks import make_task

B, Y, G = wordle.BLACK, wordle.YELLOW, wordle.GREEN


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def _full_word_list():
    wordle.use_words(None)  # the whole shipped list unless a test picks a subset
    yield
    wordle.use_words(None)


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "guess, answer, colours",
    [
        ("crane", "slate", (B, B, G, B, G)),
        ("slate", "slate", (G, G, G, G, G)),
        ("plate", "slate", (B, G, G, G, G)),
        # repeated letters, official rule: greens first, then yellows while unmatched copies remain
        ("speed", "abide", (B, B, Y, B, Y)),  # one 'e' in the answer: only the first 'e' is yellow
        ("eerie", "elder", (G, Y, Y, B, B)),  # the answer's second 'e' is matched once; the last 'e' is black
        ("level", "hello", (Y, G, B, B, Y)),  # two 'l's in the answer, both off-place: both yellow
        ("llama", "hello", (Y, Y, B, B, B)),
        ("array", "rarer", (Y, Y, G, B, B)),  # the green 'r' is matched first; the second 'a' finds no copy
        ("geese", "eerie", (B, G, Y, B, G)),  # greens consume copies before yellows
    ],
)
def test_feedback_hand_values(guess, answer, colours):
    assert wordle.feedback(guess, answer) == colours


def test_pattern_matrix_matches_feedback():
    words, patterns = wordle.load_words(), wordle.pattern_matrix()
    assert patterns.shape == (len(words), len(words))
    rng = random.Random(0)
    for _ in range(3000):
        g, a = rng.randrange(len(words)), rng.randrange(len(words))
        assert patterns[g, a] == wordle.pattern_id(wordle.feedback(words[g], words[a])), (words[g], words[a])
    assert np.all(np.diag(patterns) == wordle.SOLVED)


def test_word_list_is_clean():
    words = wordle.load_words()
    assert 800 <= len(words) <= 1100 and len(set(words)) == len(words)
    assert all(len(w) == 5 and w.isalpha() and w.islower() for w in words)
    assert open(wordle.WORDS_FILE).readline().startswith("#"), "the file starts with its provenance"


def test_reward_and_termination():
    game = wordle.new_game("slate")
    assert [game.step("crane"), game.step("plate"), game.step("slate")] == [-1.0, -1.0, 0.0]
    assert game.done and game.solved and game.ret == -2.0
    with pytest.raises(ValueError, match="over"):
        game.step("slate")
    lost = wordle.new_game("slate")
    for guess in ["crane", "zzzzz", "crane", "pious", "plate", "blast"]:  # a non-word and a repeat are legal
        assert not lost.done
        assert lost.step(guess) == -1.0
    assert lost.done and not lost.solved and lost.ret == -6.0 and len(lost.guesses) == wordle.MAX_GUESSES
    first_try = wordle.new_game("slate")
    first_try.step("slate")
    assert first_try.done and first_try.ret == 0.0
    for malformed in ["slat", "slates", "Slate", "sl8te"]:
        with pytest.raises(ValueError, match="5 lowercase letters"):
            wordle.new_game("slate").step(malformed)


def test_candidates_follow_the_feedback():
    words = wordle.load_words()
    game = wordle.new_game("slate")
    game.step("crane")
    game.step("zzzzz")  # a non-word is coloured against each candidate the slow way
    assert "slate" in [words[i] for i in game.candidates]
    for i in game.candidates:
        assert wordle.feedback("crane", words[i]) == game.colours[0]
    consistent = [w for w in words if wordle.feedback("crane", w) == game.colours[0] and "z" not in w]
    assert sorted(words[i] for i in game.candidates) == sorted(consistent)


# ----------------------------------------------------------------------------------------------
# The transcript and its layout, written out by hand (the original code's own example game)
# ----------------------------------------------------------------------------------------------
def test_layout_of_one_game_by_hand():
    game = wordle.new_game("slate")
    for guess in ["crane", "plate", "slate"]:
        game.step(guess)
    assert game.text() == (
        "<a>crane</a><b><b><g><b><g></s>plate</a><b><g><g><g><g></s>slate</a><g><g><g><g><g></s></eod>"
    )
    layout = game.layout()
    assert len(layout["input_ids"]) == 38
    action_positions = [i for i, a in enumerate(layout["action_mask"]) if a]
    assert action_positions == [*range(1, 7), *range(13, 19), *range(25, 31)]  # letters and </a> of each turn
    assert [i for i, r in enumerate(layout["rewards"]) if r != 0] == [6, 18]  # the two non-solving </a>
    assert [layout["rewards"][i] for i in (6, 18, 30)] == [-1.0, -1.0, 0.0]
    assert [i for i, d in enumerate(layout["dones"]) if d] == [30]  # the solving </a>
    tokens = game.tokens()
    assert [tokens[i] for i in (6, 18, 30)] == ["</a>"] * 3 and tokens[12] == "</s>" and tokens[-1] == "</eod>"
    assert sum(layout["rewards"]) == game.ret == -2.0


def test_unfinished_game_context_ends_before_the_next_guess():
    game = wordle.new_game("slate")
    assert game.tokens() == ["<a>"]
    game.step("crane")
    assert game.tokens()[-1] == "</s>" and len(game.tokens()) == 13
    assert not any(game.layout()["dones"])


def test_char_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = wordle.char_tokenizer()
    text = "<a>crane</a><b><b><g><b><g></s>plate</a><y><g><g><g><g></s></eod>"
    ids = tok(text)["input_ids"]
    assert ids == [
        wordle.TOKEN_ID[t]
        for t in [
            "<a>",
            *"crane",
            "</a>",
            "<b>",
            "<b>",
            "<g>",
            "<b>",
            "<g>",
            "</s>",
            *"plate",
            "</a>",
            "<y>",
            "<g>",
            "<g>",
            "<g>",
            "<g>",
            "</s>",
            "</eod>",
        ]
    ]
    assert tok.decode(ids) == text and len(tok) == len(wordle.VOCAB) == 35
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids and loaded.pad_token_id == wordle.PAD and loaded.eos_token_id == wordle.EOD


def test_guess_grammar_allows_letters_then_end_of_guess():
    grammar = wordle.GuessGrammar(context_len=13)
    scores = torch.zeros(2, len(wordle.VOCAB))
    for generated in range(6):
        out = grammar(torch.zeros(2, 13 + generated, dtype=torch.long), scores)
        allowed = set(torch.nonzero(torch.isfinite(out[0])).flatten().tolist())
        assert allowed == (set(wordle.LETTER_IDS) if generated < 5 else {wordle.EOA})


# ----------------------------------------------------------------------------------------------
# Players and datasets
# ----------------------------------------------------------------------------------------------
def _play(player, n):
    rng = random.Random(0)
    return wordle.game_metrics(wordle.play(wordle.eval_answers(n), lambda games: [player(g, rng) for g in games]))


def test_expert_beats_random_players():
    n = 300
    expert, consistent, rand = _play(wordle.expert, n), _play(wordle.random_consistent, n), _play(wordle.random_word, n)

    def se(m):
        return m["eval/return_std"] / np.sqrt(n)

    # the expert wins every game in about 3.2 guesses; random guessing almost never wins
    assert expert["eval/win_rate"] == 1.0 and expert["eval/return_mean"] > -2.4
    assert expert["eval/return_mean"] > consistent["eval/return_mean"] + 4 * (se(expert) + se(consistent))
    assert consistent["eval/return_mean"] > rand["eval/return_mean"] + 2.5
    assert rand["eval/return_mean"] < -5.8 and expert["eval/nonword_rate"] == 0.0
    assert expert["eval/repeat_rate"] == 0.0 and _play(wordle.repeat, 50)["eval/repeat_rate"] > 0.5


def test_players_keep_their_definitions():
    words, rng = wordle.load_words(), random.Random(1)
    for answer in wordle.eval_answers(40):
        game = wordle.new_game(answer)
        game.step("crane")
        game.step(wordle.random_word(game, rng))
        consistent = set(words[i] for i in game.candidates)
        assert wordle.random_consistent(game, rng) in consistent
        if len(consistent) < len(words):
            assert wordle.wrong(game, rng) not in consistent
        assert wordle.repeat(game, rng) in game.guesses[:2]
        assert wordle.expert(game, rng) == wordle.expert(game, rng)  # deterministic
        if len(consistent) <= 2:
            assert wordle.expert(game, rng) in consistent


def test_offline_datasets_are_fast_reproducible_and_controllable():
    start = time.time()
    games = wordle.offline_games("expert=0.5,repeat=0.5", 2000, seed=3)
    assert time.time() - start < 30, "thousands of games generate in seconds"
    assert all(g.done for g in games) and len(games) == 2000
    again = wordle.offline_games("expert=0.5,repeat=0.5", 2000, seed=3)
    assert [g.text() for g in games] == [g.text() for g in again]

    def mean(gs):
        return np.mean([g.ret for g in gs])

    expert = wordle.offline_games("expert", 500, seed=3)
    worse = wordle.offline_games("expert=0.2,repeat=0.8", 500, seed=3)
    assert mean(expert) > mean(games) + 1.0 > mean(worse) + 1.5, "quality follows the mixture weights"
    # a repeat move re-plays one of the first two guesses
    assert any(g.guesses[k] in g.guesses[:2] for g in games for k in range(2, len(g.guesses)))
    assert len({g.answer for g in games}) > 800, "hidden words are uniform over the list"


def test_branch_dataset_branches_off_expert_games():
    games = wordle.offline_games("branch", 60, seed=0)
    rng = random.Random(0)
    main_games = [
        g for g in games if all(wordle.expert(_prefix(g, k), rng) == g.guesses[k] for k in range(len(g.guesses)))
    ]
    assert main_games, "some games are pure expert games"
    off_moves = []
    for game in games:  # every game is an expert game except for at most one move
        off = [k for k in range(len(game.guesses)) if wordle.expert(_prefix(game, k), rng) != game.guesses[k]]
        assert len(off) <= 1
        off_moves.append(len(off))
    # and the branches are really there: one per state of each expert game (a `wrong` move is never the expert's)
    assert sum(off_moves) == len(games) - len(main_games) > len(main_games)


def test_per_game_dataset_gives_each_game_one_player():
    games = wordle.offline_games("game:expert=0.5,repeat=0.5", 200, seed=0)
    rng = random.Random(0)
    is_expert = [all(wordle.expert(_prefix(g, k), rng) == g.guesses[k] for k in range(len(g.guesses))) for g in games]
    repeats = [any(w in g.guesses[:i] for i, w in enumerate(g.guesses)) for g in games]
    assert all(e != r for e, r in zip(is_expert, repeats, strict=True)), (
        "a game is all expert moves or a repeat player's game"
    )
    assert 70 < sum(is_expert) < 130 and all(g.solved for g, e in zip(games, is_expert, strict=True) if e)


def _prefix(game, k):
    prefix = wordle.new_game(game.answer)
    for guess in game.guesses[:k]:
        prefix.step(guess)
    return prefix


@pytest.mark.parametrize(
    "spec, message",
    [
        ("expert=0.5,oracle=0.5", "unknown Wordle player"),
        ("expert=x", "bad weight"),
        ("expert=0", "sum to zero"),
        ("branch:oracle", "bad Wordle dataset"),
    ],
)
def test_bad_dataset_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        wordle.offline_games(spec, 1, seed=0)


def test_words_in_play_subset():
    wordle.use_words(40)
    words = wordle.load_words()
    assert len(words) == 40 and list(words) == sorted(words) and set(words) <= set(wordle.shipped_words())
    assert wordle.pattern_matrix().shape == (40, 40) and len(wordle.word_index()) == 40
    game = wordle.new_game(words[3])
    while not game.done:
        game.step(wordle.expert(game, random.Random(0)))
    assert game.solved and set(game.guesses) <= set(words)
    assert set(g.answer for g in wordle.offline_games("expert=0.5,repeat=0.5", 200, seed=0)) <= set(words)
    wordle.use_words(40)
    assert wordle.load_words() == words, "the subset is fixed"
    wordle.use_words(None)
    assert len(wordle.load_words()) == len(wordle.shipped_words())
    with pytest.raises(ValueError, match="cannot play on"):
        wordle.use_words(len(wordle.shipped_words()) + 1)


def test_eval_games_and_task_entry():
    words = wordle.load_words()
    answers = wordle.eval_answers(len(words))
    assert sorted(answers) == sorted(words) and answers == wordle.eval_answers(len(words))
    assert wordle.eval_answers(len(words) + 3)[-3:] == answers[:3]
    task = make_task("wordle")
    assert task.name == "wordle" and task.extra["multi_turn"] and task.max_new_tokens == 6
    data = task.offline_data(0, n=50)
    assert len(data) == 50 and {"text", "reward", "answer", "guesses"} <= set(data[0])
    with pytest.raises(ValueError, match="multi-turn"):
        task.score(["<a>"], ["crane"])


def test_no_repeat_oracle_forbids_only_the_letter_that_completes_an_earlier_guess():
    import torch

    context = torch.zeros(2, 3, dtype=torch.long)  # two games; what the context holds does not matter here
    typed = torch.tensor([[wordle.TOKEN_ID[c] for c in "cran"], [wordle.TOKEN_ID[c] for c in "slat"]])
    scores = torch.zeros(2, len(wordle.VOCAB))
    oracle = wordle.NoRepeat(3, [["crane", "cranx"], ["plate"]])
    out = oracle(torch.cat([context, typed], 1), scores)
    banned = [[wordle.VOCAB[i] for i in torch.nonzero(row == float("-inf")).flatten().tolist()] for row in out]
    assert banned == [["e", "x"], []]  # row 0 may not finish either earlier guess; "slat?" repeats nothing
    assert oracle(torch.cat([context, typed[:, :3]], 1), scores) is scores  # before the 5th letter: untouched


def test_play_eval_games_asks_the_model_for_one_guess_per_unfinished_game_each_turn():
    from common.utils import episode_seeds

    answers = wordle.eval_answers(3)
    calls = []

    def generate(context, mask, max_new, min_new, rules, seeds):  # a model that always guesses the first answer
        calls.append((context.shape, mask.sum().item(), max_new, min_new, [type(r).__name__ for r in rules], seeds))
        ids = torch.tensor([[wordle.TOKEN_ID[c] for c in answers[0]] + [wordle.EOA]] * len(context))
        return ids, torch.ones_like(ids)

    games = wordle.play_eval_games(3, generate, seed=7, device="cpu", no_repeat=True)
    assert [g.answer for g in games] == answers and games[0].guesses == [answers[0]]
    assert all(g.guesses == [answers[0]] * 6 for g in games[1:])
    assert calls[0] == ((3, 1), 3, 6, 0, ["GuessGrammar", "NoRepeat"], episode_seeds(7, 1, 0, [0, 1, 2]))
    assert calls[1][0] == (2, 13) and calls[1][-1] == episode_seeds(7, 1, 1, [1, 2]), "a game keeps its seed stream"
    assert len(calls) == 6 and wordle.play_eval_games(1, generate, 7, "cpu")[0].solved
    assert calls[-1][4] == ["GuessGrammar"]
