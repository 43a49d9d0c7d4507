"""reward_lm.py and its task common/inclusive.py: the environment's true values, the LM's three roles, the
conditioned policy, the agents' query distributions, the epistemic heads (their loss, anchor, prior calibration and
posterior spread), the online step's objective by hand, the CLI, and a learning test (Thompson sampling escapes the
trap greedy stays in). Each unit test's docstring names the change to reward_lm.py (or common/inclusive.py) that
makes it fail."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reward_lm as R
from common import inclusive

from helpers import TORCHRUN_2, args_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the files that read reward_lm.py's flags as `args.<flag>`: the script, its task, the shared run plumbing
READERS = (("reward_lm.py",), ("common", "inclusive.py"), ("common", "utils.py"))


def make_env(seed=0, **kw):
    return inclusive.InclusivePopulationEnv.from_args(seed, R.Args(**kw))


def make_model(seed=0, **kw):
    args = R.Args(**kw)
    torch.manual_seed(seed)
    lm, tokenizer, ids = inclusive.build_lm(args)
    heads = R.EpistemicHeads(
        args.ensemble_size,
        args.n_prompts * args.n_answer_tokens**2,
        args.prior_scale,
        torch.Generator().manual_seed(seed),
    )
    return R.RewardLM(lm, ids, heads), tokenizer, args


# ----------------------------------------------------------------------------------------------
# The didactic environment
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_environment_true_values(seed):
    env = make_env(seed)
    assert env.R == 64 and env.G == 3
    for x in range(env.P):
        fav0, fav1, fav2, inc = env.special[x]
        # deployed mix (0.6, 0.25, 0.15): 0.6*0.9 + 0.4*0.1 = 0.58; inc 0.6*0.5 + 0.4*0.95 = 0.68
        assert env.theta[x, fav0] == pytest.approx(0.58)
        assert env.theta[x, fav1] == pytest.approx(0.6 * 0.1 + 0.25 * 0.9 + 0.15 * 0.1)
        assert env.theta[x, fav2] == pytest.approx(0.6 * 0.1 + 0.25 * 0.1 + 0.15 * 0.9)
        assert env.theta[x, inc] == pytest.approx(0.68)
        assert env.best[x] == inc
        uses_word = [r for r in range(env.R) if env.K - 1 in divmod(r, env.K) and r != inc]
        others = [r for r in range(env.R) if r not in env.special[x] and r not in uses_word]
        assert env.theta[x, others].max() <= 0.35
        # minorities like the inclusive word anywhere (0.5-0.8), but only inc beats fav_0
        assert np.all(env.approval[1:, x, uses_word] >= 0.5) and np.all(env.approval[0, x, uses_word] <= 0.35)
        assert 0.6 * 0.05 + 0.4 * 0.5 <= env.theta[x, uses_word].min() and env.theta[x, uses_word].max() <= 0.53
        # the trap: under the historical (majority-only) raters the ranking of fav_0 and inc is reversed
        assert env.theta_historical[x, fav0] == pytest.approx(0.9)
        assert env.theta_historical[x, inc] == pytest.approx(0.5)
        # specials use disjoint tokens; inc ends with the inclusive word, which no other logged response uses
        tokens = [t for r in env.special[x] for t in divmod(int(r), env.K)]
        assert len(set(tokens)) == 8 and inc % env.K == env.K - 1
        assert env.pi0[x, uses_word].sum() == 0
        assert env.pi0[x].sum() == pytest.approx(1.0) and env.pi0[x, inc] == pytest.approx(0.005)
        assert env.pi0[x, fav0] == pytest.approx(0.40)
    assert env.opt_value == pytest.approx(0.68)


def test_feedback_and_corpus_frequencies():
    env = make_env(3)
    rng = np.random.default_rng(0)
    x = np.zeros(40000, dtype=int)
    fav0, inc = env.special[0, 0], env.special[0, 3]
    assert env.feedback(x, np.full(40000, fav0), rng).mean() == pytest.approx(0.58, abs=0.01)
    assert env.feedback(x, np.full(40000, inc), rng).mean() == pytest.approx(0.68, abs=0.01)
    cx, cr, cf = env.pretrain_corpus(40000, rng)
    on_fav0 = cr == env.special[cx, 0]
    assert on_fav0.mean() == pytest.approx(0.40, abs=0.01)
    assert cf[on_fav0].mean() == pytest.approx(0.9, abs=0.015)  # historical raters: majority only
    assert (cr == env.special[cx, 3]).mean() == pytest.approx(0.005, abs=0.0015)


# ----------------------------------------------------------------------------------------------
# One LM: policy, transition, reward
# ----------------------------------------------------------------------------------------------
def test_policy_sums_to_one_and_matches_token_chain():
    model, tokenizer, args = make_model()
    log_pi, ell0, ell_z = model.table(4, 64)
    assert torch.allclose(log_pi.exp().sum(1), torch.ones(4), atol=1e-5)
    assert ell_z.shape == (args.ensemble_size, 4, 64)
    # the same numbers straight from the HF model on the tokenized text "<bos> q2 a3 a5"
    ids = tokenizer("<bos> q2 a3 a5", return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 4)
    logits = model.lm(input_ids=ids).logits[0]
    answers = [tokenizer.convert_tokens_to_ids(f"a{k}") for k in range(8)]
    expected = logits[1, answers].log_softmax(-1)[3] + logits[2, answers].log_softmax(-1)[5]
    plus, minus = tokenizer.convert_tokens_to_ids("<+>"), tokenizer.convert_tokens_to_ids("<->")
    assert log_pi[2, 3 * 8 + 5].item() == pytest.approx(expected.item(), abs=1e-5)
    assert ell0[2, 3 * 8 + 5].item() == pytest.approx((logits[3, plus] - logits[3, minus]).item(), abs=1e-5)


def test_conditioned_policy_formula():
    torch.manual_seed(0)
    log_pi = torch.log_softmax(torch.randn(3, 6), -1)
    p = torch.rand(3, 6)
    by_hand = log_pi.exp() * p / (log_pi.exp() * p).sum(-1, keepdim=True)
    assert torch.allclose(R.conditioned_policy(log_pi, p, 1.0), by_hand, atol=1e-6)
    sq = log_pi.exp() * p**2
    assert torch.allclose(R.conditioned_policy(log_pi, p, 2.0), sq / sq.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(R.conditioned_policy(log_pi, p, 0.0), log_pi.exp(), atol=1e-6)
    greedy = R.conditioned_policy(log_pi, p, math.inf)
    assert torch.equal(greedy.argmax(-1), p.argmax(-1)) and torch.all(greedy.sum(-1) == 1)


def test_fit_error_by_hand():
    """|p_mean - k / n| / sqrt(p_mean (1 - p_mean) / n) over cells with >= 50 labels: cell (0, 0) is
    |0.5 - 0.6| / sqrt(0.25 / 100) = 2, cell (1, 0) |0.9 - 0.8| / sqrt(0.09 / 50) = 0.1 / 0.0424 = 2.357;
    (0, 1) has 49 labels and (1, 1) none. Fails if cells with exactly 50 labels were left out (mean 2.0), if the
    standard error came from the label mean instead (2.041 for cell (0, 0)), or if unlabelled cells counted."""
    p_mean = torch.tensor([[0.5, 0.2], [0.9, 0.5]])
    n, k = torch.tensor([[100.0, 49.0], [50.0, 0.0]]), torch.tensor([[60.0, 10.0], [40.0, 0.0]])
    mean, worst = inclusive.fit_error(p_mean, n, k)
    assert worst == pytest.approx(0.1 / math.sqrt(0.09 / 50), rel=1e-6) and worst == pytest.approx(2.357023, rel=1e-6)
    assert mean == pytest.approx((2.0 + worst) / 2, rel=1e-6)
    assert all(math.isnan(v) for v in inclusive.fit_error(p_mean, torch.full((2, 2), 49.0), k))  # no cell has enough


def test_queries_to_target():
    n = np.array([0, 16, 32, 48, 64])
    assert inclusive.queries_to_target(n, np.array([0.5, 0.7, 0.6, 0.7, 0.7]), 0.65) == 48  # must stay above
    assert inclusive.queries_to_target(n, np.array([0.7, 0.7, 0.7, 0.7, 0.7]), 0.65) == 0
    assert inclusive.queries_to_target(n, np.array([0.7, 0.7, 0.7, 0.7, 0.6]), 0.65) == math.inf


def test_agents_select_differently():
    gen = torch.Generator().manual_seed(0)
    ell_z = torch.randn(10, 4, 64)
    log_pi_ref = torch.log_softmax(torch.randn(4, 64), -1)
    x = torch.tensor([0, 1, 2, 3] * 8)
    greedy = [R.select_queries("greedy", ell_z, log_pi_ref, x, gen, 0.05) for _ in range(3)]
    assert all(torch.equal(g, greedy[0]) for g in greedy)
    assert torch.equal(greedy[0], torch.sigmoid(ell_z).mean(0)[x].argmax(-1))
    ts = R.select_queries("ts", ell_z, log_pi_ref, x, gen, 0.05)
    assert not torch.equal(ts, greedy[0])  # different heads pick different responses for the same prompt
    per_head = ell_z.argmax(-1)  # [heads, prompts]
    assert all(ts[i] in per_head[:, x[i]] for i in range(len(x)))
    info = R.select_queries("infomax", ell_z, log_pi_ref, x, gen, 0.05)
    assert torch.equal(info, torch.sigmoid(ell_z).var(0)[x].argmax(-1))
    with pytest.raises(ValueError):
        R.select_queries("nope", ell_z, log_pi_ref, x, gen, 0.05)


def test_passive_and_boltzmann_sample_their_distributions():
    """passive draws from pi_ref(.|x), boltzmann from softmax(p_mean(.|x) / T), each for its own prompt x.
    Fails if passive drew uniformly or from another prompt's row, or if boltzmann ignored T (its row would be
    softmax(p_mean), almost flat) or sampled on the logits instead of the approvals."""
    gen, n = torch.Generator().manual_seed(0), 20000
    p = torch.tensor([[0.1, 0.3, 0.5, 0.7, 0.9, 0.5], [0.9, 0.7, 0.5, 0.3, 0.1, 0.2]])
    ell_z = torch.logit(p).expand(4, -1, -1)  # every head says p: p_mean = p
    log_pi_ref = torch.log_softmax(
        torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]]), -1
    )
    x = torch.tensor([0, 1] * n)
    temperature = 0.2
    expected = {
        "passive": log_pi_ref.exp(),
        # by hand: exp(p / 0.2) = exp(0.5), exp(1.5), ... normalised per prompt
        "boltzmann": torch.exp(p / temperature) / torch.exp(p / temperature).sum(-1, keepdim=True),
    }
    for agent, probs in expected.items():
        y = R.select_queries(agent, ell_z, log_pi_ref, x, gen, temperature)
        for prompt in (0, 1):
            freq = torch.bincount(y[x == prompt], minlength=6).float() / n
            # a share's standard error is at most 0.5 / sqrt(20000) = 0.0035: 0.015 is over 4 of them
            assert torch.allclose(freq, probs[prompt], atol=0.015), (agent, prompt, freq, probs[prompt])


def test_cell_counts_by_hand():
    """The buffer as counts per (prompt, response) cell, and per head with its bootstrap weights. Fails if a cell
    index were r * P + x, or the heads' weights were ignored."""
    x, r = torch.tensor([0, 0, 1, 0]), torch.tensor([2, 2, 0, 1])
    f, w = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [0.0, 0.0]])
    n, k, n_z, k_z = R.cell_counts(x, r, f, w, n_cells=6, R=3)  # P = 2 prompts, R = 3 responses
    assert n.tolist() == [0, 1, 2, 1, 0, 0] and k.tolist() == [0, 1, 1, 1, 0, 0]
    assert n_z.tolist() == [[0, 0, 2, 2, 0, 0], [0, 0, 2, 2, 0, 0]]
    assert k_z.tolist() == [[0, 0, 2, 2, 0, 0], [0, 0, 0, 2, 0, 0]]


def test_feedback_loss_is_the_buffer_mean_bce_plus_a_prior_per_response():
    """feedback_loss over cells = the mean BCE over the buffer's labels + sum_c (ell0_c - prior_c)^2 / (2 alpha^2)
    / N. By hand on 3 cells (one never queried), and equal to the per-label mean computed label by label. Fails if
    the counts weighted the wrong cells, the prior were dropped or not divided by N, or an unqueried cell got
    gradient from anything but its prior."""
    ell0 = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    prior = torch.tensor([0.0, -0.5, 1.0])
    n, k = torch.tensor([3.0, 1.0, 0.0]), torch.tensor([2.0, 0.0, 0.0])

    def bce(logit: float, label: int) -> float:  # BCE(l, 1) = log(1 + e^-l), BCE(l, 0) = log(1 + e^l)
        return math.log1p(math.exp(-logit if label else logit))

    labels = 2 * bce(0.5, 1) + bce(0.5, 0) + bce(-1.0, 0)  # cell 0: 2 approvals, 1 not; cell 1: one disapproval
    alpha = 0.5
    by_hand = (labels + (0.5**2 + 0.5**2 + 1.0**2) / (2 * alpha**2)) / 4
    loss = R.feedback_loss(ell0, prior, n, k, alpha)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    per_label = F.binary_cross_entropy_with_logits(ell0.detach()[[0, 0, 0, 1]], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert R.feedback_loss(ell0.detach(), ell0.detach(), n, k, alpha).item() == pytest.approx(per_label.item())
    loss.backward()
    assert ell0.grad[2].item() == pytest.approx((2.0 - 1.0) / alpha**2 / 4, rel=1e-6)  # the prior's pull alone


def test_fit_head_offsets_is_each_heads_map_by_hand():
    """fit_head_offsets = argmin_o n_z BCE(ell0 + prior_z + o, k_z / n_z) + o^2 / (2 alpha^2) per head and cell:
    checked against a brute-force grid; no labels leave the offset at 0 (the head keeps its prior sample);
    many labels take the head to the label mean whatever its prior. Fails if the prior's precision or the
    counts were dropped, or Newton stopped far from the minimum."""
    ell0 = torch.tensor([0.3, -0.4, 1.0])
    prior = torch.tensor([[0.5, -0.7, 0.2], [-0.5, 0.7, -0.2]])
    n_z, k_z = (
        torch.tensor([[4.0, 0.0, 2000.0], [2.0, 6.0, 2000.0]]),
        torch.tensor([[1.0, 0.0, 500.0], [2.0, 1.0, 500.0]]),
    )
    alpha = 0.67
    offsets = R.fit_head_offsets(ell0, prior, n_z, k_z, alpha, torch.zeros(2, 3))
    grid = torch.linspace(-6, 6, 120001)
    for z in range(2):
        for c in range(2):
            logit = ell0[c] + prior[z, c] + grid
            t = k_z[z, c] / n_z[z, c] if n_z[z, c] > 0 else 0.0
            objective = n_z[z, c] * F.binary_cross_entropy_with_logits(
                logit, torch.full_like(grid, float(t)), reduction="none"
            ) + grid**2 / (2 * alpha**2)
            assert offsets[z, c].item() == pytest.approx(grid[objective.argmin()].item(), abs=2e-4), (z, c)
    assert offsets[0, 1].item() == 0.0  # head 0 has no label on cell 1
    p = torch.sigmoid(ell0[2] + prior[:, 2] + offsets[:, 2])
    assert torch.allclose(p, torch.full((2,), 0.25), atol=0.005)  # 2000 labels: the prior no longer matters


def test_heads_prior_is_centred_with_std_alpha():
    """The heads' prior samples have mean exactly 0 over the heads on every response (the ensemble starts at the
    LM's belief) and std about alpha; offsets start at 0. Fails if the prior were not centred (10 random samples
    have a mean of std alpha / sqrt(10) per response: a bias of ~0.2 logits)."""
    heads = R.EpistemicHeads(10, 256, 0.67, torch.Generator().manual_seed(0))
    assert heads.prior.mean(0).abs().max().item() < 1e-6
    assert heads.prior.std(0).mean().item() == pytest.approx(0.67, rel=0.1)
    assert heads.offsets.abs().max().item() == 0.0


def test_fit_feedback_step_is_the_documented_objective():
    """One step of fit_feedback descends, by hand, feedback_loss over every cell + kappa * NLL of replayed historical
    sequences on x, a_i, a_j with their feedback token masked. With SGD at rate 1 every parameter moves by minus
    its gradient, so comparing the moves compares the gradients. Fails (checked) if the replay also trains the
    historical feedback token, the prior term is dropped, or only the queried cells enter the loss."""
    import copy

    model, _, args = make_model(replay_coef=0.5, max_fit_steps=1, replay_batch_size=3)
    P, Rn = 4, 64
    x, r = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([5, 17, 40, 63, 6, 9])
    f = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    n, k, _, _ = R.cell_counts(x, r, f, torch.ones(6, 1), P * Rn, Rn)
    with torch.no_grad():
        ell_prior = model.table(P, Rn)[1] + 0.3 * torch.randn(P, Rn, generator=torch.Generator().manual_seed(3))
    corpus = (torch.tensor([2, 3, 1, 0, 1]), torch.tensor([11, 22, 33, 44, 55]))
    replay = torch.randint(5, (3,), generator=torch.Generator().manual_seed(7))  # what fit_feedback will draw

    hand = copy.deepcopy(model)
    xc, rc = hand.cells(P, Rn)
    _, ell0, logits, ids = hand(torch.cat([xc, corpus[0][replay]]), torch.cat([rc, corpus[1][replay]]))
    C = P * Rn

    def bce(logit, target):
        return -(target * F.logsigmoid(logit) + (1 - target) * F.logsigmoid(-logit))

    labels = sum(bce(ell0[int(xi) * Rn + int(ri)], fi) for xi, ri, fi in zip(x, r, f, strict=True))
    prior = (ell0[:C] - ell_prior.flatten()).pow(2).sum() / (2 * args.prior_scale**2)
    replay_nll = -logits[C:, :3].log_softmax(-1).gather(-1, ids[C:, 1:, None]).mean()  # x, a_i, a_j: no f
    ((labels + prior) / 6 + 0.5 * replay_nll).backward()

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stats = R.fit_feedback(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        n,
        k,
        ell_prior,
        corpus,
        0.5,
        args,
        torch.Generator().manual_seed(7),
    )
    assert stats["fit_steps"] == 1
    moved = 0
    for (name, param), hand_param in zip(model.named_parameters(), hand.parameters(), strict=True):
        expected = -hand_param.grad if hand_param.grad is not None else torch.zeros_like(param)
        assert torch.allclose(param.detach() - before[name], expected, atol=1e-5), name
        moved += int(expected.abs().max() > 1e-3)
    assert moved > 10


def test_fit_follows_the_labels_and_unqueried_responses_keep_belief_and_spread():
    """Fit the LM (fit_feedback) and the heads (fit_head_offsets) on 4 cells with 48 labels each at approval 1/3:
    the LM's approval there reaches the labels' MAP (0.33 pulled a little toward the prior), the heads' spread
    shrinks there, and every other response keeps its prior spread exactly and its belief nearly (its prior pulls
    it back against what the shared network learns from the queried ones). Measured: the fit stops after 159 steps
    with the queried cells at 0.36-0.37, their spread 0.25-0.32 logits against a prior spread of 0.64 on average;
    unqueried beliefs move by 0.017 logits on average. Fails (checked) if the prior term is dropped from
    feedback_loss: the queried cells then reach 0.28-0.30 and the unqueried beliefs move by 0.98 logits."""
    model, _, args = make_model(replay_coef=0.0)
    P, Rn, M = 4, 64, args.ensemble_size
    cells = ([0, 1, 2, 3], [5, 17, 40, 63])
    x, r = torch.tensor(cells[0] * 48), torch.tensor(cells[1] * 48)
    f = (torch.arange(192) % 3 == 0).float()
    w = 2.0 * (torch.rand(192, M, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    n, k, n_z, k_z = R.cell_counts(x, r, f, w, P * Rn, Rn)
    with torch.no_grad():
        ell_prior = model.table(P, Rn)[1]
    spread_before = model.table(P, Rn)[2].std(0)
    optimizer = torch.optim.AdamW(model.lm.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)
    stats = R.fit_feedback(
        model, optimizer, n, k, ell_prior, (x[:1], r[:1]), 0.0, args, torch.Generator().manual_seed(1)
    )
    assert 3 < stats["fit_steps"] < args.max_fit_steps  # it stopped because the loss stopped falling
    with torch.no_grad():
        ell0 = model.table(P, Rn)[1]
        model.heads.offsets = R.fit_head_offsets(
            ell0.flatten(), model.heads.prior, n_z, k_z, args.prior_scale, model.heads.offsets
        )
    _, ell0, ell_z = model.table(P, Rn)
    queried = torch.zeros(P, Rn, dtype=torch.bool)
    queried[cells] = True
    assert torch.allclose(torch.sigmoid(ell0[queried]), torch.full((4,), 1 / 3), atol=0.04), torch.sigmoid(ell0)[cells]
    spread = ell_z.std(0)
    assert spread[queried].mean() < 0.5 * spread_before.mean(), (spread[queried], spread_before.mean())
    assert torch.allclose(spread[~queried], spread_before[~queried], atol=1e-5)
    assert (ell0 - ell_prior)[~queried].abs().mean() < 0.2


# ----------------------------------------------------------------------------------------------
# The script: --help, bad input, a tiny end-to-end run, a saved GPT-2 as --model-name
# ----------------------------------------------------------------------------------------------


def test_help_lists_the_flags_the_script_uses_each_documented():
    """--help shows exactly the flags that reward_lm.py, its task common/inclusive.py or common/utils.py (Run,
    validate_args) read as `args.<flag>`, each with a docstring; the other scripts' flags that mean nothing here are
    not in its Args (it inherits common/utils.py's RunArgs only) or, were one ever needed, hidden with
    tyro.conf.Suppress. Fails if a flag nobody reads is shown (a removed option left in Args), or a used one is hidden
    or undocumented."""
    import dataclasses
    import re
    import typing

    import tyro

    out = subprocess.run(
        [sys.executable, "reward_lm.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=True,
    ).stdout
    for name, documented in args_fields(os.path.join(ROOT, "reward_lm.py"), "Args"):
        assert documented, f"Args.{name} has no docstring (it is the --help text)"
    source = "".join(open(os.path.join(ROOT, *path)).read() for path in READERS)
    hints = typing.get_type_hints(R.Args, include_extras=True)
    shown = 0
    for field in dataclasses.fields(R.Args):
        hidden = tyro.conf.Suppress in getattr(hints[field.name], "__metadata__", ())
        in_help = re.search(rf"(?<![\w-])--{field.name.replace('_', '-')}(?![\w-])", out) is not None
        read = re.search(rf"args\.{field.name}\b", source) is not None
        assert in_help == (not hidden) == read, (field.name, in_help, hidden, read)
        shown += in_help
    assert shown >= 40


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"queries_per_round": 10}, "not divisible"),
        ({"task": "sentiment"}, "unknown task"),
        ({"agents": ("ts", "oracle")}, "unknown agent"),
        ({"model_name": "./no/such/dir"}, "does not exist"),
        ({"deployed_mix": (0.5, 0.6, 0.1)}, "distributions"),
        ({"num_seeds": 0}, "--num-seeds must be positive"),
    ],
)
def test_bad_input_fails_fast(kwargs, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        R.main(R.Args(output_dir=str(tmp_path), **kwargs))
    assert not os.listdir(tmp_path), "no run directory is created for bad input"


def test_bad_input_on_the_cli_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "reward_lm.py", "--output-dir", str(tmp_path), "--agents", "ts", "oracle"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "unknown agent" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_tiny_run_end_to_end_and_saved_model_reloads(tmp_path):
    tiny = [
        "--num-seeds",
        "1",
        "--queries",
        "32",
        "--queries-per-round",
        "16",
        "--max-fit-steps",
        "2",
        "--pretrain-size",
        "512",
        "--pretrain-epochs",
        "1",
        "--agents",
        "ts",
        "greedy",
        "passive",
        "boltzmann",
        "infomax",
    ]
    result = subprocess.run(
        [sys.executable, "reward_lm.py", *tiny, "--output-dir", str(tmp_path / "a")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "queries until the exploit policy stays >= 95%" in result.stdout
    assert "final value, beta=inf | beta=1" in result.stdout  # the LM's own policy beside the headline
    (run_name,) = os.listdir(tmp_path / "a")
    assert run_name.startswith("inclusive__reward_lm__101__")
    run_dir = tmp_path / "a" / run_name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["script"] == "reward_lm.py" and summary["seeds"] == [101]
    for key in (
        "eval/return_mean",
        "eval/regret",
        "eval/frac_optimal",
        "eval/std_best",
        "eval/value_beta1",
        "eval/fit_error",
        "eval/fit_error_max",
    ):
        assert key in summary["initial"] and key in summary["final"]
    assert math.isnan(summary["initial"]["eval/fit_error"])  # no labels yet; 32 queries give no cell 50 labels
    # the table's beta=1 column is the seed mean of the final eval/value_beta1 (one seed: the method's own)
    assert summary["agents"]["ts"]["final_value_beta1"] == pytest.approx(summary["final"]["eval/value_beta1"])
    assert summary["agents"]["ts"]["final_value"] == pytest.approx(summary["final"]["eval/return_mean"])
    assert set(summary["agents"]) == {"ts", "greedy", "passive", "boltzmann", "infomax"}
    rows = (run_dir / "curves.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 * 3  # header + 5 agents x (2 rounds + final evaluation)
    assert sorted(d for d in os.listdir(run_dir) if "__seed" in d) == sorted(f"{a}__seed101" for a in summary["agents"])
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert model.config.vocab_size == 17
    # the saved GPT-2 serves as --model-name (pretraining skipped: it already knows the task)
    again = subprocess.run(
        [
            sys.executable,
            "reward_lm.py",
            *tiny[:-5],
            "ts",
            "--pretrain-epochs",
            "0",
            "--model-name",
            str(run_dir / "model"),
            "--output-dir",
            str(tmp_path / "b"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    (name_b,) = os.listdir(tmp_path / "b")
    summary_b = json.loads((tmp_path / "b" / name_b / "summary.json").read_text())
    assert summary_b["args"]["model_name"] == str(run_dir / "model")


# ----------------------------------------------------------------------------------------------
# The exact-posterior control (benchmarks/reward_lm_tabular.py) that sets the query budget
# ----------------------------------------------------------------------------------------------
def test_tabular_control_priors_match_the_population_model():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import reward_lm_tabular as T

    # h = (4 + 1) / (8 + 2) = 1/2: both priors are mean 1/2, std 1/6 -> concentration 0.25 * 36 - 1 = 8
    for prior in ("centred", "population"):
        a, b = T.beta_prior(np.array([4.0]), np.array([8.0]), prior)
        assert a == pytest.approx([4.0]) and b == pytest.approx([4.0])
    # h = 9/10: population mean (0.9 + 0.5) / 2 = 0.7, variance (1/12 + 0.16) / 3 - 0.16 / 4 = 37/900,
    # concentration 0.21 * 900/37 - 1 = 152/37; centred: mean 0.9, variance 1/36

    def beta_var(a, b):
        return a * b / ((a + b) ** 2 * (a + b + 1))

    a, b = T.beta_prior(np.array([8.0]), np.array([8.0]), "population")
    assert a == pytest.approx([0.7 * 152 / 37]) and b == pytest.approx([0.3 * 152 / 37])
    a, b = T.beta_prior(np.array([8.0]), np.array([8.0]), "centred")
    assert a / (a + b) == pytest.approx([0.9]) and beta_var(a, b) == pytest.approx([1 / 36])
    # h = 1/100: 1/36 exceeds what a Beta with mean 0.01 allows, so the variance is capped at 0.99 * 0.01 * 0.99
    a, b = T.beta_prior(np.array([0.0]), np.array([98.0]), "centred")
    assert a / (a + b) == pytest.approx([0.01]) and beta_var(a, b) == pytest.approx([0.99 * 0.0099])
    with pytest.raises(ValueError):
        T.beta_prior(np.array([1.0]), np.array([2.0]), "flat")
    # one seed, a budget too small to move anything: greedy's exploit stays on fav_0 (0.58 < 95% of 0.68)
    assert T.simulate(1, "greedy", "centred", 64, 16, R.Args()) == math.inf


# ----------------------------------------------------------------------------------------------
# Learning: one paired run (same seeds, same pretrained LM) at the default budget, shared by the two tests below
# ----------------------------------------------------------------------------------------------
# Seeds 101-104: settings were chosen on seeds 21-31 and never on 101-120, whose 20-seed table is in
# docs/reward_lm.md. A seed's trajectory depends on float rounding, which differs between CPUs (AVX2, AVX-512, or
# ATEN_CPU_CAPABILITY=default for no vectorized kernels): on seeds 102-104 the two capabilities measured here gave
# different runs. So the tests assert rates and paired differences over the 4 seeds, with margins from both.
SEEDS = (101, 4)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("learning")
    # The default budget (4096 queries in rounds of 64) on seeds 101-104, ts and greedy only. Two torchrun
    # processes run the seeds two at a time (a simulation is one seed, so they log exactly what one process logs,
    # tests/test_scaling.py).
    agents = ("ts", "greedy")
    result = subprocess.run(
        [
            sys.executable,
            *TORCHRUN_2,
            "reward_lm.py",
            "--agents",
            *agents,
            "--seed",
            str(SEEDS[0]),
            "--num-seeds",
            str(SEEDS[1]),
            "--no-save-model",
            "--progress-every",
            "1000",
            "--output-dir",
            str(out),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    import csv

    (run_name,) = os.listdir(out)
    summary = json.loads((out / run_name / "summary.json").read_text())
    assert summary["seeds"] == list(range(SEEDS[0], SEEDS[0] + SEEDS[1]))
    rows = list(csv.DictReader(open(out / run_name / "curves.csv")))
    per_agent = {
        agent: {seed: [r for r in rows if r["agent"] == agent and int(r["seed"]) == seed] for seed in summary["seeds"]}
        for agent in agents
    }
    return summary, per_agent


def _queried_best(curve, per_round=R.Args.queries_per_round):
    return sum(float(r["objective/frac_queried_best"]) * per_round for r in curve if r["objective/frac_queried_best"])


def _last(curve, key, n=8):
    """Mean of `key` over the last n evaluations (the last 512 queries): the exploit argmax can flip between
    two responses whose beliefs are within noise of each other from one round to the next."""
    return float(np.mean([float(r[key]) for r in curve[-n:]]))


def test_one_lm_learns_todays_approval(short_run):
    """Reward learning is fine-tuning the LM's transition: on the historical majority's favourite fav_0
    (approved 90% of the time by the historical raters, 0.58 by today's), the LM's predicted approval must move
    from the historical value to today's, for both agents on every seed; and on the responses each agent
    deploys at the end, its predicted approval must match today's. Measured on seeds 101-104 with AVX2 and under
    ATEN_CPU_CAPABILITY=default, both agents: fav_0 starts at 0.88-0.89 and ends (mean over the last 512 queries)
    at 0.51-0.60; the deployed responses end 0.006-0.019 off. Without reward learning fav_0 would stay near its
    start, 0.3 above today's value."""
    summary, per_agent = short_run
    for agent, curves in per_agent.items():
        for seed, curve in curves.items():
            first, last = float(curve[0]["eval/favourite_approval"]), _last(curve, "eval/favourite_approval")
            assert first >= 0.58 + 0.15 and abs(last - 0.58) <= 0.1, (agent, seed, first, last)
            assert _last(curve, "eval/exploit_err") <= 0.05, (agent, seed)


def test_thompson_sampling_escapes_the_trap_greedy_mostly_stays_in(short_run):
    """The method's claim on a paired run (same seeds, same pretrained LM): Thompson sampling on the heads asks
    about the inclusive response (0.68) on every seed and moves the exploit policy to it on most prompts; greedy,
    with the same LM, mostly stays on fav_0 (0.58).

    Measured on seeds 101-104, with AVX2 and under ATEN_CPU_CAPABILITY=default: TS asked about inc 998-3603 times
    per seed; it reached 95% of the optimum on 3 of the 4 seeds with either capability (not the same 3); greedy on
    none; TS ended above greedy by 0.0625 on average with either (per seed +0.025 to +0.100); greedy's mean final
    value was 0.5925 with either. Over the 20 seeds 101-120 (AVX2) TS reached 95% on 16, greedy on 3, and TS
    ended above greedy by 0.059 +- 0.009 (per-seed std 0.04), and greedy's final value was 0.602 (std 0.027).
    The margins are the claim, not the measurement, sized so that a CPU whose runs all come out different still
    passes: TS reaches 95% on at least 2 of 4 seeds (at its rate of 16 in 20, fewer has a probability of 3%); TS
    ends above greedy by at least 0.02 on average (2 standard errors of a 4-seed mean below 0.059: about 2.5%);
    greedy's mean final value is at most 0.63 (2 standard errors above 0.602: about 2.5%). A run is deterministic
    on a given CPU, so these are chances per CPU, not per run. Replacing TS by greedy fails the first three."""
    summary, per_agent = short_run
    ts = per_agent["ts"]
    final = {
        agent: {seed: float(curve[-1]["eval/return_mean"]) for seed, curve in curves.items()}
        for agent, curves in per_agent.items()
    }
    reached = {
        agent: sum(v is not None for v in s["queries_to_target"].values()) for agent, s in summary["agents"].items()
    }
    # TS explores: it asks about inc, and keeps asking once it has found it, on every seed
    assert all(_queried_best(curve) >= 256 for curve in ts.values()), {s: _queried_best(c) for s, c in ts.items()}
    assert reached["ts"] >= 2, summary["agents"]["ts"]["queries_to_target"]
    diff = np.mean([final["ts"][s] - final["greedy"][s] for s in ts])
    assert diff >= 0.02, (final, summary["agents"])
    # the trap: greedy's exploit policy ends on fav_0 (0.58) on most prompts
    assert np.mean(list(final["greedy"].values())) <= 0.63, final["greedy"]
