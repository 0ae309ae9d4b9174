"""Open-Assistant's K-wise RM loss: the maths by hand, the collator, the config keys."""

from __future__ import annotations

import math

import pytest
import torch

from oatui.config import load_stage_config
from oatui.errors import UserError
from oatui.train.rm_kwise import GroupCollator, group_metric_counts, group_pairs, kwise_loss


def nll(margin: float) -> float:
    """−log σ(margin)."""
    return math.log1p(math.exp(-margin))


def test_a_group_of_three_with_a_tie_by_hand() -> None:
    # Ranks 0, 1, 1: pairs (0, 1) and (0, 2); the two replies of rank 1 form none.
    better, worse, group = group_pairs([[0, 1, 1]])
    assert (better, worse, group) == ([0, 0], [1, 2], [0, 0])
    rewards = torch.tensor([2.0, 0.5, -1.0])
    beta = 0.001
    by_hand = (nll(2.0 - 0.5) + beta * 0.5 * (2.0**2 + 0.5**2) + nll(2.0 - -1.0) + beta * 0.5 * (2.0**2 + 1.0**2)) / 2
    loss = kwise_loss(rewards, torch.tensor(better), torch.tensor(worse), torch.tensor(group), 1, beta)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # -log σ(1.5) = 0.20141, -log σ(3) = 0.04859; L2 terms 0.0005·4.25 and 0.0005·5; the mean of the two pairs:
    assert by_hand == pytest.approx(0.127313, abs=1e-6)


def test_groups_weigh_the_same_whatever_their_size() -> None:
    # A group of 3 (3 pairs) and a group of 2 (1 pair): the mean of the two groups' means, not of the 4 pairs.
    ranks = [[0, 1, 2], [0, 1]]
    better, worse, group = (torch.tensor(x) for x in group_pairs(ranks))
    rewards = torch.tensor([1.0, 0.0, -1.0, 0.0, 3.0], requires_grad=True)
    loss = kwise_loss(rewards, better, worse, group, 2, score_l2_reg=0.0)
    first = (nll(1.0) + nll(2.0) + nll(1.0)) / 3
    second = nll(-3.0)
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)
    loss.backward()
    assert rewards.grad is not None and rewards.grad.abs().sum() > 0
    # All ties: no pair, a zero loss that still has a graph.
    empty = torch.tensor([], dtype=torch.long)
    zero = kwise_loss(torch.tensor([1.0, 2.0], requires_grad=True), empty, empty, empty, 1)
    assert zero.item() == 0.0 and zero.requires_grad


def test_each_reply_is_in_the_batch_once_and_the_metrics_count_pairs_and_groups() -> None:
    collate = GroupCollator(pad_token_id=0)
    batch = collate([
        {"reply_ids": [[5, 6, 7], [8]], "reply_ranks": [0, 1]},
        {"reply_ids": [[9, 9], [4, 4, 4, 4], [3]], "reply_ranks": [0, 1, 2]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [9, 9, 0, 0], [4, 4, 4, 4], [3, 0, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 2, 4, 1]
    assert batch["group_sizes"].tolist() == [2, 3]
    assert list(zip(batch["pair_better"].tolist(), batch["pair_worse"].tolist())) == [(0, 1), (2, 3), (2, 4), (3, 4)]
    # Group 1 ordered right; group 2's best scores highest but its 2nd and 3rd are swapped.
    counts = group_metric_counts(torch.tensor([1.0, 0.0, 2.0, -1.0, 0.0]), batch)
    assert counts == {"pairs_correct": 3, "pairs": 4, "top1_correct": 2, "groups": 2}


def test_rm_loss_keys() -> None:
    config = load_stage_config("rm", ["defaults_rm"], ["rm_loss=kwise"])
    assert (config.rm_loss, config.max_replies, config.score_l2_reg) == ("kwise", 5, 0.001)
    assert load_stage_config("rm", ["defaults_rm", "tiny_rm"]).score_l2_reg == 0.05
    assert load_stage_config("rm", ["defaults_rm"]).rm_loss == "pairwise"
    assert load_stage_config("rm", ["defaults_rm", "tiny_rm"]).rm_loss == "kwise"
    with pytest.raises(UserError, match="^rm_loss: expected one of 'pairwise', 'kwise'"):
        load_stage_config("rm", ["defaults_rm"], ["rm_loss=listwise"])
    with pytest.raises(UserError, match="^max_replies: "):
        load_stage_config("rm", ["defaults_rm"], ["max_replies=1"])
    with pytest.raises(UserError, match="^rm_loss: max_pairs_per_group is for rm_loss: pairwise"):
        load_stage_config("rm", ["defaults_rm"], ["max_pairs_per_group=2", "rm_loss=kwise"])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_pairwise_loss_ranks_held_out_groups_too(trained, workspace) -> None:  # noqa: ANN001
    """tiny_rm trains with the K-wise loss (the shared workspace's RM, checked in test_stages); the
    pairwise loss, `--set rm_loss=pairwise`, from the same SFT model, in a workspace of its own so
    that the shared one's newest RM stays tiny_rm's."""
    import yaml

    from helpers import read_metrics, run_oatui
    from oatui.stages.rundir import RunDir
    from oatui.stages.runs import wait_for_end

    result = run_oatui("train", "rm", "--configs", "defaults_rm", "tiny_rm", "--set", "rm_loss=pairwise",
                       "--set", f"model_name={trained.sft_model}", "--detach", workspace=workspace, check=True)
    run = workspace / "runs" / result.stdout.strip().splitlines()[-1]
    info = wait_for_end(RunDir(run), timeout=1400)
    assert info.state == "succeeded", (run / "stdout.log").read_text(errors="replace")[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["rm_loss"] == "pairwise"
    metrics = read_metrics(run)
    data = next(m for m in metrics if "data/train_pairs" in m)
    assert data["data/train_pairs"] > 1000 and "data/train_groups" not in data
    accuracy = [m["rm/accuracy"] for m in metrics if "rm/accuracy" in m]
    # Chance is 0.5; the held-out pairs include near misses that differ in the topic alone, which
    # the tiny reward model gets right about four times in five.
    assert accuracy and accuracy[-1] >= 0.7, accuracy
    assert not any("rm/top1_accuracy" in m for m in metrics)
    assert (run / "final" / "config.json").exists()
