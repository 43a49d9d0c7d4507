"""The CUDA path's numerics, checked on CPU: every loss keeps its outputs on its inputs' device, the bf16
autocast path (`--bf16`, the default on CUDA) runs the same code on CPU with fp32 logits, log-probs and
values, a PPO and an NLPO update under it keep the first-update invariants, and models load in fp32."""

import datetime
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import alol
import ilql
import nlpo
import ppo
import reward_lm
from common import utils
from common.models import FP32OutputLayer, ValueHead, load_policy
from common.tasks import make_task

from helpers import scalars

META = torch.device("meta")


def tensors_in(out):
    """Every tensor in a (nested) tuple / list / dict output."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from tensors_in(v)
    elif isinstance(out, (tuple, list)):
        for v in out:
            yield from tensors_in(v)


def meta_inputs(b=2, t=5, v=7):
    return {
        "bt": torch.randn(b, t, device=META),
        "btv": torch.randn(b, t, v, device=META),
        "b": torch.randn(b, device=META),
        "tokens": torch.zeros(b, t, dtype=torch.long, device=META),
    }


def loss_calls():
    """(name, call) for every loss-side function of the five scripts, fed `meta` tensors: a tensor the function
    makes on the CPU itself (a hard-coded device) meets a meta one and raises, or comes out on the CPU."""
    x = meta_inputs()
    bt, btv, b, tokens = x["bt"], x["btv"], x["b"], x["tokens"]
    calls = {
        "ppo.shaped_rewards": lambda: ppo.shaped_rewards(b, bt, bt, bt, 0.1),
        "ppo.compute_gae": lambda: ppo.compute_gae(bt, bt, bt, 1.0, 0.95),
        "ppo.ppo_policy_loss": lambda: ppo.ppo_policy_loss(bt, bt, bt, bt, 0.2),
        "ppo.ppo_value_loss(clip 0.2)": lambda: ppo.ppo_value_loss(bt, bt, bt, bt, 0.2),
        "ppo.ppo_value_loss(no clip)": lambda: ppo.ppo_value_loss(bt, bt, bt, bt, None),
        "nlpo.top_p_keep_mask": lambda: nlpo.top_p_keep_mask(btv, 0.9, 2),
        "nlpo.ppo_policy_loss": lambda: nlpo.ppo_policy_loss(bt, bt, bt, bt, 0.2),  # the masked ratio's loss
        "nlpo.shaped_rewards": lambda: nlpo.shaped_rewards(b, bt, bt, bt, 0.1),
        "nlpo.compute_gae": lambda: nlpo.compute_gae(bt, bt, bt, 1.0, 0.95),
        "nlpo.ppo_value_loss(no clip)": lambda: nlpo.ppo_value_loss(bt, bt, bt, bt, None),
        "ilql.bootstrap_values": lambda: ilql.bootstrap_values(bt, bt, bt),
        "ilql.q_loss": lambda: ilql.q_loss([bt, bt], bt, bt, bt, 0.99),
        "ilql.expectile_loss": lambda: ilql.expectile_loss(bt, bt, bt, 0.7),
        "ilql.cql_loss": lambda: ilql.cql_loss([btv, btv], tokens, bt),
        "ilql.bc_loss": lambda: ilql.bc_loss(btv, tokens, bt, bt),
        "ilql.perturbed_logits": lambda: ilql.perturbed_logits(btv, btv, bt, 16.0, 3, 0.0),
        "reward_lm.conditioned_policy": lambda: reward_lm.conditioned_policy(bt, bt.sigmoid(), 1.0),
        "reward_lm.conditioned_policy(inf)": lambda: reward_lm.conditioned_policy(bt, bt.sigmoid(), float("inf")),
        "reward_lm.cell_counts": lambda: reward_lm.cell_counts(tokens[0], tokens[0], bt[0], bt.T, 5, 1),
        "reward_lm.feedback_loss": lambda: reward_lm.feedback_loss(b, b, b, b, 0.67),
        "reward_lm.fit_head_offsets": lambda: reward_lm.fit_head_offsets(bt[0], bt, bt, bt, 0.67, bt, 2),
    }
    for algorithm in alol.ALGORITHMS:
        calls[f"alol.sequence_loss({algorithm})"] = lambda algorithm=algorithm: alol.sequence_loss(
            algorithm, bt, bt, bt, b, b
        )
    return list(calls.items())


@pytest.mark.parametrize("name,call", loss_calls(), ids=[n for n, _ in loss_calls()])
def test_every_loss_keeps_its_outputs_on_the_inputs_device(name, call):
    """ppo_value_loss without a value clip returned a CPU `clipfrac` that `torch.stack` of the statistics
    could not join with CUDA tensors; on `meta` inputs any such tensor shows up as a non-meta output."""
    outputs = list(tensors_in(call()))
    assert outputs, name
    assert all(t.device == META for t in outputs), [(t.device, t.shape) for t in outputs]


def test_output_layer_and_value_head_stay_fp32_under_bf16_autocast():
    task = make_task("sentiment")
    policy = load_policy("tiny-gpt2", task)
    assert isinstance(policy.model.get_output_embeddings(), FP32OutputLayer)
    ids, mask = policy.encode_prompts(task.train_prompts[:4], task.max_prompt_tokens, "cpu")
    head = ValueHead(policy.hidden_size)
    with torch.no_grad():
        fp32_logits, _ = policy(ids, mask, ids.shape[1] - 3)
        with utils.bf16_autocast(torch.device("cpu"), "on"):
            logits, hidden = policy(ids, mask, ids.shape[1] - 3)
            values = head(hidden)
            logprobs, _ = ppo.forward_logprobs(policy, ids, mask, ids.shape[1] - 3, 1.0)
    assert logits.dtype == values.dtype == logprobs.dtype == torch.float32
    # the transformer did run in bf16 (its last layer norm hands over fp32, as on CUDA): the logits moved a little
    assert 0 < (logits - fp32_logits).abs().max() < 0.5
    # and not rounded to bf16's 8-bit mantissa, as a plain output layer under autocast returns them
    with utils.bf16_autocast(torch.device("cpu"), "on"):
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    assert not torch.equal(logits, logits.to(torch.bfloat16).float())
    # the class swap keeps the parameters and the state dict, and a copy keeps the class
    assert set(policy.model.state_dict()) == set(AutoModelForCausalLM.from_config(policy.model.config).state_dict())


def test_rewards_are_scored_outside_autocast():
    seen = []

    def reward_fn(prompts, responses):
        seen.append((torch.is_autocast_enabled("cpu"), torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype))
        return [0.0] * len(responses)

    task = make_task("sentiment")
    task.reward_fn = reward_fn
    with utils.bf16_autocast(torch.device("cpu"), "on"):
        task.score(["a"], ["b"])
    assert seen == [(False, torch.float32)]


def test_a_model_saved_in_bf16_loads_and_trains_in_fp32(tmp_path):
    policy = load_policy("tiny-gpt2", make_task("sentiment"))
    policy.model.to(torch.bfloat16).save_pretrained(tmp_path)
    policy.tokenizer.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16  # transformers' default
    loaded = load_policy(str(tmp_path), None)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_autocast_follows_the_device_and_the_flag(monkeypatch):
    made = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype, enabled: made.append((device_type, enabled)))
    for device, flag in (("cpu", "auto"), ("cpu", "on"), ("cuda", "auto"), ("cuda", "off")):
        utils.bf16_autocast(torch.device(device), flag)
    assert made == [("cpu", False), ("cpu", True), ("cuda", True), ("cuda", False)]  # default: on with CUDA only


def test_cuda_rng_state_is_this_ranks_device_only(monkeypatch):
    """Saving every visible GPU's state made a resume with fewer visible GPUs fail."""
    saved = torch.tensor([7], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: saved)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every device's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restored every device's state"))
    states = utils.rng_states()
    assert states["cuda_device"] is saved and "cuda" not in states
    utils.restore_rng_states(states)
    assert restored == [saved]


def test_process_group_timeout_and_tf32(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(utils.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(utils.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    assert utils.init_distributed(False)[2].type == "cpu"
    assert utils.init_distributed(False, timeout=datetime.timedelta(hours=24))[2].type == "cpu"
    assert [kw["timeout"] for _, kw in calls] == [datetime.timedelta(minutes=30), datetime.timedelta(hours=24)]
    precision = torch.get_float32_matmul_precision()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert utils.pick_device(True).type == "cuda"
        assert torch.get_float32_matmul_precision() == "high"  # TF32 for fp32 matmuls on CUDA
    finally:
        torch.set_float32_matmul_precision(precision)


# LMRL_TEST_CUDA=1 runs these updates on the GPU instead (benchmarks/gpu_check.sh); CI runs them on the CPU.
BF16_BUDGET = dict(
    total_updates=1,
    rollout_batch_size=8,
    minibatch_size=8,
    eval_episodes=8,
    save_model=False,
    bf16="on",
    cuda=os.environ.get("LMRL_TEST_CUDA") == "1",
    clip_range_value=None,
)


@pytest.mark.parametrize("script", [ppo, nlpo], ids=["ppo", "nlpo"])
def test_one_update_under_cpu_bf16_keeps_the_first_update_invariants(script, tmp_path):
    """One update of one minibatch (a single gradient step) under bf16 autocast, without a value clip (the
    GRUE command's setting that crashed on CUDA): the scoring pass and the first minibatch pass see the same
    weights, so ratio 1, clipfrac 0, approx KL 0, KL to the reference 0; NLPO's generation-time masks equal
    the teacher-forced recompute (with bf16 output layers they differed at 1.7% of positions)."""
    summary = script.main(script.Args(output_dir=str(tmp_path), ppo_epochs=1, **BF16_BUDGET))
    logged = scalars(str(tmp_path))
    assert logged["losses/ratio"] == [1.0] and logged["losses/clipfrac"] == [0.0]
    assert logged["losses/approx_kl"] == [0.0] and logged["objective/kl"] == [0.0]
    assert logged["losses/value_clipfrac"] == [0.0]
    if script is nlpo:
        assert logged["charts/mask_mismatch"] == [0.0]
    assert summary["args"]["bf16"] == "on"
