"""The pure parts of the PPO trainer, each on its own: losses, KL control, masking, whitening, prompts."""

from __future__ import annotations

import math
import os

import pytest
import torch

from oatui.data.rules import Turn
from oatui.netutil import free_port
from oatui.train.ppo.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from oatui.train.ppo.losses import entropy_from_logits, gather_logprobs, masked_mean, policy_loss, value_loss
from oatui.train.ppo.rollout import PromptSchedule, left_pad, response_mask_at_eos
from oatui.train.ppo.stats import RunningMoments, global_mean_std, global_masked_whiten

# --------------------------------------------------------------------------------------------
# Losses


def test_masked_mean_ignores_masked_out_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    advantages = torch.tensor([[1.0, -2.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    out = policy_loss(logprobs, logprobs.clone(), advantages, mask, cliprange=0.2)
    assert out.loss.item() == pytest.approx(-(1.0 - 2.0) / 2)
    assert out.clipfrac.item() == 0.0
    assert out.approx_kl.item() == 0.0
    assert out.ratio_mean.item() == pytest.approx(1.0)


def test_policy_loss_clips_the_ratio_in_the_pessimistic_direction():
    cliprange = 0.2
    old = torch.zeros(1, 4)
    # ratios 2.0, 0.5, 1.1, 2.0 against advantages +1, -1, +1, -1
    new = torch.log(torch.tensor([[2.0, 0.5, 1.1, 2.0]]))
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    out = policy_loss(new, old, advantages, mask, cliprange)
    # token 0: A>0, r=2 -> clipped at 1.2: loss -1.2 (clipped taken)
    # token 1: A<0, r=0.5 -> clipped at 0.8: max(0.5, 0.8) = 0.8 (clipped taken)
    # token 2: inside the range: -1.1
    # token 3: A<0, r=2 -> unclipped 2.0 is larger: 2.0 (no clip: the pessimistic side is unbounded)
    expected = (-1.2 + 0.8 - 1.1 + 2.0) / 4
    assert out.loss.item() == pytest.approx(expected)
    assert out.clipfrac.item() == pytest.approx(2 / 4)
    log_ratio = new - old
    assert out.approx_kl.item() == pytest.approx(0.5 * (log_ratio**2).mean().item())


def test_policy_loss_gradient_vanishes_where_clipped():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[2.0, 1.0]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0]])
    policy_loss(new, old, advantages, torch.ones(1, 2), 0.2).loss.backward()
    assert new.grad[0, 0].item() == 0.0
    assert new.grad[0, 1].item() == pytest.approx(-0.5)


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_error():
    old_values = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1, -1.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1]])
    out = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # token 0: unclipped error 0, clipped (0.2) error 0.64 -> 0.64 (clipped)
    # token 1: 0.1 within range -> 0.81
    # token 2: unclipped error 1, clipped (-0.2) error 0.04 -> 1 (unclipped)
    assert out.loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 1.0) / 3)
    assert out.clipfrac.item() == pytest.approx(1 / 3)


def test_entropy_of_uniform_and_of_certain_distributions():
    uniform = torch.zeros(2, 3, 8)
    assert torch.allclose(entropy_from_logits(uniform), torch.full((2, 3), math.log(8)))
    certain = torch.full((1, 1, 5), -1e4)
    certain[..., 2] = 1e4
    assert entropy_from_logits(certain).item() == pytest.approx(0.0, abs=1e-6)


def test_gather_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 11)
    tokens = torch.randint(0, 11, (2, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(gather_logprobs(logits, tokens), expected)


# --------------------------------------------------------------------------------------------
# KL controller


def test_fixed_kl_controller_never_moves():
    controller = make_kl_controller(False, 0.1, 6.0, 10000)
    assert isinstance(controller, FixedKLController) and not isinstance(controller, AdaptiveKLController)
    assert controller.update(100.0, 64) == 0.1


def test_adaptive_kl_controller_follows_ziegler():
    controller = make_kl_controller(True, 0.1, target=6.0, horizon=1000)
    # KL at 9 -> error clipped to +0.2 -> β·(1 + 0.2·n/horizon)
    assert controller.update(9.0, 50) == pytest.approx(0.1 * (1 + 0.2 * 50 / 1000))
    # KL at 5.4 -> error -0.1
    before = controller.value
    assert controller.update(5.4, 100) == pytest.approx(before * (1 - 0.1 * 100 / 1000))
    # KL at 0 -> error clipped to -0.2
    before = controller.value
    assert controller.update(0.0, 10) == pytest.approx(before * (1 - 0.2 * 10 / 1000))
    state = controller.state_dict()
    restored = AdaptiveKLController(0.5, 6.0, 1000)
    restored.load_state_dict(state)
    assert restored.value == controller.value


def test_adaptive_kl_controller_rejects_a_zero_target():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 100)


# --------------------------------------------------------------------------------------------
# Masking at EOS and padding


def test_response_mask_covers_up_to_and_including_the_first_eos():
    eos = 0
    responses = torch.tensor([
        [5, 6, 0, 7, 0],   # EOS at 2: the tokens after it (even another EOS) are not the response
        [0, 3, 3, 3, 3],   # EOS first: a response of one token
        [4, 4, 4, 4, 4],   # no EOS: everything
        [9, 9, 9, 9, 0],   # EOS last
    ])
    mask, has_eos = response_mask_at_eos(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False, True]
    # A contiguous prefix in every row, as the advantage kernel requires.
    assert bool((mask[:, 1:] <= mask[:, :-1]).all())


def test_left_pad_puts_tokens_at_the_right_end():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_make_rollout_cuts_masks_and_decodes(tiny_tokenizer):
    from oatui.train.ppo.rollout import make_rollout

    tok = tiny_tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    hello = tok("hello", add_special_tokens=False)["input_ids"]
    prompt_ids, prompt_mask = left_pad([[5, 6, 7], [8]], pad)
    generated = torch.cat([prompt_ids, torch.tensor([
        hello + [eos, 11, 12, eos],
        hello + [11, 12, 13, 14],
    ])], dim=1)
    contexts = [(Turn("prompter", "a"),), (Turn("prompter", "b"),)]
    rollout = make_rollout(contexts, prompt_ids, prompt_mask, generated, tok)
    n = len(hello)
    assert rollout.response_mask[0].tolist()[: n + 2] == [1] * (n + 1) + [0]
    assert rollout.response_mask[1].sum().item() == n + 4
    assert rollout.has_eos.tolist() == [True, False]
    assert rollout.response_ids[0, n + 1:].tolist() == [pad] * (rollout.response_ids.shape[1] - n - 1)
    assert rollout.response_texts[0] == "hello"
    assert rollout.attention_mask.shape == rollout.input_ids.shape


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from oatui.models.loading import load_tokenizer
    from oatui.models.tiny import TINY_SHAPE, train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(TINY_SHAPE["vocab_size"]).save_pretrained(folder)
    return load_tokenizer(str(folder))


# --------------------------------------------------------------------------------------------
# Prompt schedule


def test_prompt_schedule_is_deterministic_and_splits_ranks():
    prompts = [(Turn("prompter", f"p{i}"),) for i in range(10)]
    ranks = [PromptSchedule(prompts, seed=3, batch_size=3, rank=r, world_size=2) for r in range(2)]
    step1 = [p[0].text for r in ranks for p in r.batch(1)]
    assert len(set(step1)) == 6  # no prompt answered twice in a step
    again = PromptSchedule(prompts, seed=3, batch_size=3, rank=0, world_size=2)
    assert [p[0].text for p in again.batch(4)] == [p[0].text for p in ranks[0].batch(4)]
    assert ranks[0].position_after(2) == 12
    # Each pass over the set sees every prompt once.
    single = PromptSchedule(prompts, seed=3, batch_size=5)
    assert sorted(p[0].text for s in (1, 2) for p in single.batch(s)) == sorted(p[0].text for p in prompts)


# --------------------------------------------------------------------------------------------
# Whitening over ranks


def _whiten_kernel(advantages, mask):
    from oatui_kernels import masked_whiten

    return masked_whiten(advantages, mask)


def test_global_whitening_equals_the_kernels_on_one_process():
    torch.manual_seed(1)
    advantages = torch.randn(4, 7) * 3 + 2
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2, [1] + [0] * 6])
    ours = global_masked_whiten(advantages, mask)
    assert torch.allclose(ours, _whiten_kernel(advantages, mask), atol=1e-5)
    assert bool((ours[mask == 0] == 0).all())
    one_token = torch.zeros_like(mask)
    one_token[0, 0] = 1
    with pytest.raises(ValueError):
        global_masked_whiten(advantages, one_token)


WHITEN_ON_RANK = """
import sys, torch, torch.distributed as dist
from oatui.train.ppo.stats import RunningMoments, global_mean_std, global_masked_whiten
rank = int(sys.argv[1])
data = torch.load(sys.argv[2])
dist.init_process_group("gloo")
advantages, mask, scores = data["advantages"], data["mask"], data["scores"]
rows = slice(rank * 2, rank * 2 + 2)
whitened = global_masked_whiten(advantages[rows], mask[rows])
moments = RunningMoments()
moments.update(scores[rank * 3:rank * 3 + 3])
moments.update(scores[6 + rank * 2:6 + rank * 2 + 2])
batch = global_mean_std(scores[rank * 3:rank * 3 + 3])
torch.save({"whitened": whitened, "moments": moments.state_dict(), "batch": batch}, sys.argv[3])
dist.destroy_process_group()
"""


def test_global_whitening_over_two_ranks_equals_one_process_with_the_whole_batch(tmp_path):
    import subprocess
    import sys

    torch.manual_seed(2)
    advantages = torch.randn(4, 6) * 2 - 1
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    scores = torch.randn(10)
    torch.save({"advantages": advantages, "mask": mask, "scores": scores}, tmp_path / "in.pt")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    processes = [
        subprocess.Popen([sys.executable, "-c", WHITEN_ON_RANK, str(rank), str(tmp_path / "in.pt"), str(tmp_path / f"{rank}.pt")],
                         env=dict(env, RANK=str(rank)))
        for rank in (0, 1)
    ]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    together = torch.cat([results[0]["whitened"], results[1]["whitened"]])
    assert torch.allclose(together, _whiten_kernel(advantages, mask), atol=1e-5)
    # Running moments and batch statistics see every rank's values.
    whole = RunningMoments()
    whole.update(scores[:6])
    whole.update(scores[6:])
    for result in results:
        state = result["moments"]
        assert state["count"] == 10
        assert state["mean"] == pytest.approx(scores.double().mean().item())
        assert state["var"] == pytest.approx(scores.double().var().item())
        assert state == pytest.approx(whole.state_dict())
        mean, std, count = result["batch"]
        assert count == 6 and mean == pytest.approx(scores[:6].double().mean().item())
        assert std == pytest.approx(scores[:6].double().std().item())


# --------------------------------------------------------------------------------------------
# One PPO update on a toy model


def _toy_batch():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from oatui.train.ppo.models import ActorCritic, ValueHead, disable_dropout
    from oatui.train.ppo.rollout import Rollout

    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = ActorCritic(GPTNeoXForCausalLM(config), ValueHead(32))
    disable_dropout(model)
    prompt_ids, prompt_mask = left_pad([[5, 6, 7], [8, 9], [10, 11, 12], [13]], pad_id=1)
    response_ids = torch.randint(2, 64, (4, 5))
    response_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0], [1] * 2 + [0] * 3])
    contexts = [(Turn("prompter", str(i)),) for i in range(4)]
    rollout = Rollout(contexts, prompt_ids, prompt_mask, response_ids, response_mask, torch.ones(4, dtype=torch.bool),
                      ["a", "b", "c", "d"])
    return model, rollout


@pytest.mark.parametrize("old_logprob_shift, skipped", [(0.0, 0), (-5.0, 4)])
def test_ppo_update_learns_or_skips_a_minibatch_whose_ratio_explodes(old_logprob_shift: float, skipped: int):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from oatui.config import RLConfig
    from oatui.train.ppo.build import make_optimizer
    from oatui.train.ppo.models import rollout_logprobs_and_values
    from oatui.train.ppo.trainer import Batch, ppo_update

    config = RLConfig(rollout_batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3,
                      lr_scheduler_type="constant", ratio_threshold=10.0)
    model, rollout = _toy_batch()
    try:
        accelerator = Accelerator(cpu=True)
        optimizer, scheduler = make_optimizer(model, config)
        model, optimizer = accelerator.prepare(model, optimizer)
        logprobs, values = rollout_logprobs_and_values(model, rollout, 2, accelerator.device)
        before = [p.detach().clone() for p in model.parameters()]
        advantages = torch.where(rollout.response_mask.bool(), torch.randn(4, 5), 0.0)
        batch = Batch.from_rollout(rollout, logprobs + old_logprob_shift, values, advantages, values + 1.0)
        stats = ppo_update(accelerator, model, optimizer, scheduler, batch, config, step=1)
    finally:
        AcceleratorState._reset_state(True)
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert stats["ppo/skipped_minibatches"] == skipped
    assert moved == (skipped == 0)
    if skipped == 0:
        assert stats["ppo/ratio"] == pytest.approx(1.0, abs=0.05) and stats["ppo/value_loss"] > 0
    else:
        assert stats["ppo/ratio"] > config.ratio_threshold


def test_compute_advantages_returns_the_kernels_named_tuple():
    from oatui.config import RLConfig
    from oatui.train.ppo.trainer import compute_advantages
    from oatui_kernels import KLRewardGAE, fused_kl_reward_gae

    generator = torch.Generator().manual_seed(3)
    logprobs, ref_logprobs, values = (torch.randn(3, 5, generator=generator) for _ in range(3))
    scores = torch.randn(3, generator=generator)
    mask = (torch.arange(5) < torch.tensor([[5], [2], [4]])).float()
    for whiten in (False, True):
        config = RLConfig(whiten_advantages=whiten, gamma=0.9, lam=0.8, kl_estimator="k3")
        result = compute_advantages(logprobs, ref_logprobs, values, scores, mask, config, 0.1)
        expected = fused_kl_reward_gae(logprobs, ref_logprobs, values, scores, mask, kl_coef=0.1, gamma=0.9, lam=0.8,
                                       kl_estimator="k3", whiten=whiten, backend="torch")
        assert isinstance(result, KLRewardGAE) and result._fields == ("rewards", "advantages", "returns", "kl_sum")
        for name in KLRewardGAE._fields:
            torch.testing.assert_close(getattr(result, name), getattr(expected, name), rtol=1e-5, atol=1e-5)


def test_a_batch_gives_every_field_by_rows():
    from dataclasses import fields

    from oatui.train.ppo.trainer import Batch

    _, rollout = _toy_batch()
    tensors = [torch.full((4, 5), float(i)) for i in range(4)]
    batch = Batch.from_rollout(rollout, *tensors)
    rows = batch.rows(torch.tensor([2, 0]), torch.device("cpu"))
    assert len(batch) == 4 and list(rows) == [field.name for field in fields(Batch)]
    assert torch.equal(rows["input_ids"], rollout.input_ids[[2, 0]]) and torch.equal(rows["mask"], rollout.response_mask[[2, 0]])
    assert [float(rows[name][0, 0]) for name in ("old_logprobs", "old_values", "advantages", "returns")] == [0.0, 1.0, 2.0, 3.0]
