"""Tests for the hub tasks (`imdb`, `jsonl`) in common/tasks.py, offline.

Everything a hub task downloads is replaced by a local copy built here: a tiny random DistilBERT
sequence classifier (labels NEGATIVE/POSITIVE) saved with `save_pretrained`, a tiny IMDB-like
`DatasetDict` saved with `save_to_disk`, and a tiny GPT-2 policy. The end-to-end runs are subprocesses
with HF_HUB_OFFLINE=1, so nothing can reach the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.tasks import HOLDOUT_FRACTION, Task, make_task, read_prompts_file

datasets = pytest.importorskip("datasets")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADJ = ["great", "awful", "boring", "lovely", "long", "dull", "fun", "weak", "touching", "odd"]
NOUNS = ["movie", "plot", "acting", "ending", "cast", "music", "script"]


def review(i: int) -> str:
    """An IMDB-like review of 6 to 80 words (some longer than the classifier's 64-token window)."""
    words = [f"review {i} :"]
    for j in range(2 + (i * 7) % 26):
        words.append(f"the {NOUNS[(i + j) % len(NOUNS)]} was {ADJ[(i * 3 + j) % len(ADJ)]} .")
    if i % 5 == 0:
        words.append("<br /><br />i would watch it again .")
    return " ".join(words)


TRAIN_TEXTS = [review(i) for i in range(40)]
TEST_TEXTS = [review(i) for i in range(100, 120)] + [TRAIN_TEXTS[3]]  # IMDB has duplicates across splits


def args(**kwargs) -> SimpleNamespace:
    fields = dict(dataset=None, prompts_file=None, reward_model=None, reward_label=None, reward_fn=None, cuda=False)
    return SimpleNamespace(**{**fields, **kwargs})


# ----------------------------------------------------------------------------------------------
# Local stand-ins for the hub: classifier, dataset, policy, reward module
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)

    # The reward model: a 1-layer DistilBERT with random weights and a word-piece tokenizer.
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(
        TRAIN_TEXTS,
        vocab_size=200,
        min_frequency=1,
        show_progress=False,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    )
    wordpiece.post_processor = TemplateProcessing(  # [CLS] text [SEP], as BERT tokenizers do
        single="[CLS] $A [SEP]", special_tokens=[(t, wordpiece.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    classifier = DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=len(tok),
            dim=32,
            n_layers=1,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
            initializer_range=0.5,
            id2label={0: "NEGATIVE", 1: "POSITIVE"},
            label2id={"NEGATIVE": 0, "POSITIVE": 1},
        )
    )
    with torch.no_grad():
        classifier.classifier.weight.mul_(0.2)  # with the wide init: probabilities spread, not saturated
    classifier.save_pretrained(root / "classifier")
    tok.save_pretrained(root / "classifier")

    # The dataset: train and test splits with IMDB's columns.
    data = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": TRAIN_TEXTS, "label": [i % 2 for i in range(len(TRAIN_TEXTS))]}
            ),
            "test": datasets.Dataset.from_dict({"text": TEST_TEXTS, "label": [i % 2 for i in range(len(TEST_TEXTS))]}),
        }
    )
    data.save_to_disk(str(root / "imdb"))

    # The policy: a 1-layer GPT-2 with a byte-level BPE tokenizer.
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        TRAIN_TEXTS, vocab_size=300, min_frequency=1, show_progress=False, special_tokens=["<|endoftext|>", "<pad>"]
    )
    gpt_tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    policy = GPT2LMHeadModel(
        GPT2Config(
            n_layer=1,
            n_embd=32,
            n_head=2,
            n_positions=256,
            vocab_size=len(gpt_tok),
            bos_token_id=gpt_tok.eos_token_id,
            eos_token_id=gpt_tok.eos_token_id,
            pad_token_id=gpt_tok.pad_token_id,
        )
    )
    policy.save_pretrained(root / "gpt2")
    gpt_tok.save_pretrained(root / "gpt2")

    # A reward module, importable once its directory is on sys.path / PYTHONPATH.
    (root / "code").mkdir()
    (root / "code" / "my_rewards.py").write_text(
        "def word_count(prompts, responses):\n"
        "    return [len(r.split()) / 10 for r in responses]\n\n"
        "def not_a_number(prompts, responses):\n"
        "    return [float('nan')] * len(responses)\n\n"
        "def strings(prompts, responses):\n"
        "    return ['high'] * len(responses)\n\n"
        "NOT_CALLABLE = 3\n"
    )

    # Prompts: one file with held-out lines marked, one without.
    marked = [{"prompt": f"question {i} :", **({"split": "eval"} if i % 4 == 0 else {})} for i in range(12)]
    (root / "marked.jsonl").write_text("\n".join(json.dumps(r) for r in marked) + "\n\n")
    (root / "plain.jsonl").write_text(
        "".join(json.dumps({"prompt": f"tell me about film {i}"}) + "\n" for i in range(30))
    )
    return root


@pytest.fixture
def reward_module(hub, monkeypatch):
    monkeypatch.syspath_prepend(str(hub / "code"))
    return "my_rewards"


def hand_probability(model_dir, texts, label=1, window=64) -> np.ndarray:
    """softmax(logits)[label] of each text, one unpadded row at a time: [CLS] + the text's last tokens
    + [SEP], `window` tokens at most (left truncation)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            body = tok(text, add_special_tokens=False)["input_ids"][-(window - 2) :]
            ids = [tok.cls_token_id, *body, tok.sep_token_id]
            out.append(torch.softmax(model(input_ids=torch.tensor([ids])).logits, -1)[0, label].item())
    return np.array(out)


def grue_prompt(text: str) -> str:
    words = text.split(" ")
    return " ".join(words[: int(len(words) * 0.5)])


# ----------------------------------------------------------------------------------------------
# imdb
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imdb(hub):
    return make_task("imdb", args(dataset=str(hub / "imdb"), reward_model=str(hub / "classifier")))


def test_imdb_prompts_are_grue_prefixes(imdb):
    # datasets' shuffle(seed=42) is numpy's default_rng(42) permutation: RL4LMs' order.
    order = np.random.default_rng(42).permutation(len(TRAIN_TEXTS))
    cut = int(len(TRAIN_TEXTS) * 0.8)
    test_order = np.random.default_rng(42).permutation(len(TEST_TEXTS))
    expected_eval = [grue_prompt(TEST_TEXTS[i]) for i in test_order]
    assert imdb.eval_prompts == expected_eval
    assert imdb.extra["val_prompts"] == [grue_prompt(TRAIN_TEXTS[i]) for i in order[cut:]]
    duplicate = grue_prompt(TRAIN_TEXTS[3])
    expected_train = [grue_prompt(TRAIN_TEXTS[i]) for i in order[:cut]]
    assert duplicate in expected_train  # the review in both splits is dropped from training
    assert imdb.train_prompts == [p for p in expected_train if p != duplicate]
    assert not set(imdb.train_prompts) & set(imdb.eval_prompts)
    for prompt, text in zip(expected_eval, [TEST_TEXTS[i] for i in test_order], strict=True):
        assert text.startswith(prompt) and len(prompt.split(" ")) == len(text.split(" ")) // 2
    assert (imdb.max_prompt_tokens, imdb.max_new_tokens, imdb.min_new_tokens) == (64, 48, 48)
    assert imdb.corpus is None and imdb.offline_data is None


def test_imdb_reward_is_positive_probability_of_prompt_and_continuation(imdb, hub):
    prompts = imdb.eval_prompts[:6]
    responses = [" the ending was great .", " awful .", "", " fun fun fun", " the cast was dull . " * 20, " odd"]
    scores = imdb.score(prompts, responses)
    expected = hand_probability(hub / "classifier", [p + r for p, r in zip(prompts, responses, strict=True)])
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert scores.dtype == np.float64 and np.all((scores > 0) & (scores < 1))
    assert np.ptp(scores) > 0.01  # the scores depend on the text
    response_only = hand_probability(hub / "classifier", responses)
    assert not np.allclose(scores, response_only, atol=1e-4)  # the prompt is part of the input
    # Many texts: batched (32 per forward) and scored in order.
    many = imdb.score(imdb.train_prompts[:31] * 2, [" great ."] * 62)
    np.testing.assert_allclose(many, np.tile(many[:31], 2), atol=1e-5)


def test_imdb_from_a_local_data_directory(hub, tmp_path):
    for split, texts in (("train", TRAIN_TEXTS), ("test", TEST_TEXTS)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t, "label": 0}) + "\n" for t in texts)
    task = make_task("imdb", args(dataset=str(tmp_path), reward_model=str(hub / "classifier")))
    saved = make_task("imdb", args(dataset=str(hub / "imdb"), reward_fn=f"{hub / 'code' / 'my_rewards.py'}:word_count"))
    assert task.train_prompts == saved.train_prompts and task.eval_prompts == saved.eval_prompts


def test_imdb_without_datasets(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ValueError, match=r"task imdb needs the datasets package: pip install datasets==\d"):
        make_task("imdb", args(dataset=str(hub / "imdb"), reward_model=str(hub / "classifier")))


# ----------------------------------------------------------------------------------------------
# jsonl
# ----------------------------------------------------------------------------------------------
def test_jsonl_splits(hub):
    train, held_out, _ = read_prompts_file(str(hub / "marked.jsonl"))
    assert held_out == [f"question {i} :" for i in range(0, 12, 4)]
    assert train == [f"question {i} :" for i in range(12) if i % 4]
    train, held_out, _ = read_prompts_file(str(hub / "plain.jsonl"))
    assert len(held_out) == round(HOLDOUT_FRACTION * 30) and len(train) == 27
    assert not set(train) & set(held_out) and set(train) | set(held_out) == {
        f"tell me about film {i}" for i in range(30)
    }
    assert read_prompts_file(str(hub / "plain.jsonl"))[:2] == (train, held_out)  # seeded: the same every time


def test_jsonl_with_reward_model(hub):
    task = make_task(
        "jsonl",
        args(prompts_file=str(hub / "marked.jsonl"), reward_model=str(hub / "classifier"), reward_label="POSITIVE"),
    )
    assert task.name == "jsonl" and len(task.eval_prompts) == 3
    responses = [" the plot was lovely .", " boring", " the music was weak ."]
    scores = task.score(task.eval_prompts, responses)
    texts = [p + r for p, r in zip(task.eval_prompts, responses, strict=True)]
    np.testing.assert_allclose(scores, hand_probability(hub / "classifier", texts), atol=1e-5)
    for label, index in (("negative", 0), ("0", 0), ("1", 1)):  # by name (any case) or by index
        other = make_task(
            "jsonl",
            args(prompts_file=str(hub / "marked.jsonl"), reward_model=str(hub / "classifier"), reward_label=label),
        )
        np.testing.assert_allclose(
            other.score(task.eval_prompts, responses),
            hand_probability(hub / "classifier", texts, label=index),
            atol=1e-5,
        )


def test_jsonl_with_reward_fn(hub, reward_module):
    task = make_task("jsonl", args(prompts_file=str(hub / "plain.jsonl"), reward_fn=f"{reward_module}:word_count"))
    np.testing.assert_array_equal(task.score(["a", "b"], [" one two", ""]), [0.2, 0.0])
    by_file = make_task(
        "jsonl", args(prompts_file=str(hub / "plain.jsonl"), reward_fn=f"{hub / 'code' / 'my_rewards.py'}:word_count")
    )
    np.testing.assert_array_equal(by_file.score(["a"], [" x y z"]), [0.3])


# ----------------------------------------------------------------------------------------------
# Errors: one clear line each, before any training
# ----------------------------------------------------------------------------------------------
def error_cases(hub):
    prompts, model = str(hub / "marked.jsonl"), str(hub / "classifier")
    (hub / "empty.jsonl").write_text("\n")
    (hub / "broken.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    (hub / "one.jsonl").write_text('{"prompt": "a"}\n')
    return [
        ("nope", {}, ValueError, "unknown task 'nope'; known tasks: imdb, jsonl, sentiment, sentiment_grammar, wordle"),
        (
            "jsonl",
            dict(prompts_file=prompts, reward_model=model, reward_fn="my_rewards:word_count"),
            ValueError,
            "not both",
        ),
        ("jsonl", dict(prompts_file=prompts), ValueError, "task jsonl needs a reward"),
        ("jsonl", dict(reward_model=model), ValueError, "needs --prompts-file"),
        ("jsonl", dict(prompts_file=prompts, reward_fn="my_rewards"), ValueError, "expected module:function"),
        (
            "jsonl",
            dict(prompts_file=prompts, reward_fn="no_such_module:f"),
            ValueError,
            "cannot import 'no_such_module'",
        ),
        ("jsonl", dict(prompts_file=prompts, reward_fn="my_rewards:missing"), ValueError, "has no function 'missing'"),
        ("jsonl", dict(prompts_file=prompts, reward_fn="my_rewards:NOT_CALLABLE"), ValueError, "has no function"),
        (
            "jsonl",
            dict(prompts_file=prompts, reward_fn="nowhere.py:f"),
            FileNotFoundError,
            "'nowhere.py' does not exist",
        ),
        (
            "jsonl",
            dict(prompts_file=prompts, reward_model=model, reward_label="NEUTRAL"),
            ValueError,
            "--reward-label 'NEUTRAL' is not a label of reward model",
        ),
        ("jsonl", dict(prompts_file=prompts, reward_model=model, reward_label="2"), ValueError, "POSITIVE"),
        (
            "jsonl",
            dict(prompts_file=prompts, reward_fn="my_rewards:word_count", reward_label="1"),
            ValueError,
            "does not apply to --reward-fn",
        ),
        ("jsonl", dict(prompts_file=prompts, reward_model="./no/such/dir"), FileNotFoundError, "does not exist"),
        (
            "jsonl",
            dict(prompts_file=str(hub / "missing.jsonl"), reward_fn="my_rewards:word_count"),
            FileNotFoundError,
            "prompts file",
        ),
        (
            "jsonl",
            dict(prompts_file=str(hub / "empty.jsonl"), reward_fn="my_rewards:word_count"),
            ValueError,
            "has no prompts",
        ),
        (
            "jsonl",
            dict(prompts_file=str(hub / "broken.jsonl"), reward_fn="my_rewards:word_count"),
            ValueError,
            'broken.jsonl:2: expected an object with a string "prompt" field',
        ),
        (
            "jsonl",
            dict(prompts_file=str(hub / "one.jsonl"), reward_fn="my_rewards:word_count"),
            ValueError,
            "at least 2 distinct prompts",
        ),
        (
            "jsonl",
            dict(prompts_file=prompts, reward_fn="my_rewards:not_a_number"),
            ValueError,
            "the reward function returned [nan, nan]; expected 2 finite floats",
        ),
        ("jsonl", dict(prompts_file=prompts, reward_fn="my_rewards:strings"), ValueError, "expected 2 finite floats"),
        (
            "jsonl",
            dict(prompts_file=prompts, reward_fn="my_rewards:word_count", dataset="x"),
            ValueError,
            "--dataset does not apply to task 'jsonl'",
        ),
        (
            "imdb",
            dict(dataset="./no/such/data", reward_model=model),
            FileNotFoundError,
            "dataset path './no/such/data'",
        ),
        (
            "imdb",
            dict(dataset=str(hub / "imdb"), reward_model=model, prompts_file=prompts),
            ValueError,
            "--prompts-file does not apply to task 'imdb'",
        ),
        ("sentiment", dict(reward_model=model), ValueError, "--reward-model only apply to the hub tasks"),
        (
            "imdb",
            dict(dataset=str(hub / "imdb"), reward_model=model, model_name="tiny-gpt2"),
            ValueError,
            "task 'imdb' has no built-in model; pass --model-name",
        ),
    ]


def test_errors(hub, reward_module):
    for name, flags, error, message in error_cases(hub):
        with pytest.raises(error) as caught:
            make_task(name, args(**flags))
        assert message in str(caught.value), (name, flags, str(caught.value))
        assert "\n" not in str(caught.value)


def test_score_catches_non_finite_rewards_after_the_start():
    calls = []

    def flaky(prompts, responses):
        calls.append(1)
        return [1.0] * len(responses) if len(calls) == 1 else [float("inf")] * len(responses)

    task = Task(
        name="jsonl", train_prompts=["a"], eval_prompts=["b"], reward_fn=flaky, max_prompt_tokens=8, max_new_tokens=8
    )
    np.testing.assert_array_equal(task.score(["a"], ["r"]), [1.0])
    with pytest.raises(ValueError, match="expected 1 finite floats"):
        task.score(["a"], ["r"])


# ----------------------------------------------------------------------------------------------
# End to end: the scripts, offline, in subprocesses (run together: they share 2 cores)
# ----------------------------------------------------------------------------------------------
def test_scripts_run_hub_tasks_offline(hub, tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(hub / "code"), os.environ.get("PYTHONPATH", "")]),
    }
    tiny = [
        "--total-updates",
        "1",
        "--rollout-batch-size",
        "4",
        "--minibatch-size",
        "4",
        "--ppo-epochs",
        "1",
        "--eval-episodes",
        "4",
        "--eval-every",
        "1",
        "--no-save-model",
        "--no-cuda",
    ]
    runs = {
        "jsonl": [
            "ppo.py",
            "--task",
            "jsonl",
            "--prompts-file",
            str(hub / "plain.jsonl"),
            "--reward-fn",
            "my_rewards:word_count",
            "--model-name",
            str(hub / "gpt2"),
            *tiny,
            "--output-dir",
            str(tmp_path / "a"),
        ],
        "imdb": [
            "ppo.py",
            "--task",
            "imdb",
            "--dataset",
            str(hub / "imdb"),
            "--reward-model",
            str(hub / "classifier"),
            "--model-name",
            str(hub / "gpt2"),
            *tiny,
            "--output-dir",
            str(tmp_path / "b"),
        ],
        "error": [
            "ppo.py",
            "--task",
            "jsonl",
            "--prompts-file",
            str(hub / "plain.jsonl"),
            "--reward-fn",
            "my_rewards:not_a_number",
            "--model-name",
            str(hub / "gpt2"),
            "--output-dir",
            str(tmp_path / "c"),
        ],
        "no datasets": [
            "-c",
            "import sys; from common.tasks import make_task; make_task('wordle'); "
            "assert 'datasets' not in sys.modules, 'embedded tasks imported datasets'",
        ],
    }
    procs = {
        k: subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for k, argv in runs.items()
    }
    results = {k: (p.wait(timeout=300), *p.communicate()) for k, p in procs.items()}
    for name in ("jsonl", "imdb", "no datasets"):
        code, out, err = results[name]
        assert code == 0, f"{name}:\n{out[-2000:]}\n{err[-3000:]}"
    for name, folder in (("jsonl", "a"), ("imdb", "b")):
        (run_dir,) = os.listdir(tmp_path / folder)
        assert run_dir.startswith(f"{name}__ppo__1__")
        with open(tmp_path / folder / run_dir / "summary.json") as f:
            summary = json.load(f)
        assert np.isfinite(summary["final"]["eval/return_mean"])
        if name == "imdb":
            assert 0 < summary["final"]["eval/return_mean"] < 1
    code, out, err = results["error"]
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: task 'jsonl': the reward function returned")
    assert not os.path.exists(tmp_path / "c")  # failed before the run directory existed


def test_nlpo_runs_imdb_offline(hub, tmp_path):
    """nlpo.py on the GRUE IMDB task from local copies, as ppo.py above: 48-token responses with EOS forbidden
    throughout (the task's minimum length), the masking policy on a real GPT-2 tokenizer's vocabulary."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    argv = [
        "nlpo.py",
        "--task",
        "imdb",
        "--dataset",
        str(hub / "imdb"),
        "--reward-model",
        str(hub / "classifier"),
        "--model-name",
        str(hub / "gpt2"),
        "--total-updates",
        "1",
        "--rollout-batch-size",
        "4",
        "--minibatch-size",
        "4",
        "--ppo-epochs",
        "1",
        "--eval-episodes",
        "4",
        "--eval-every",
        "1",
        "--no-save-model",
        "--no-cuda",
        "--output-dir",
        str(tmp_path),
    ]
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    (run_dir,) = os.listdir(tmp_path)
    assert run_dir.startswith("imdb__nlpo__1__")
    with open(tmp_path / run_dir / "summary.json") as f:
        summary = json.load(f)
    assert 0 < summary["final"]["eval/return_mean"] < 1 and summary["min_tokens_to_keep"] >= 1
