"""Open-Assistant's K-wise reward-model loss (its ``RMLoss``) on trl's RewardTrainer.

A batch is a list of ranked groups. :class:`GroupCollator` flattens their replies (best first) into
one padded batch, so each reply is encoded once, and lists every (better, worse) pair of a group by
the replies' positions (replies of equal rank form no pair). :func:`kwise_loss` takes the mean over
a group's pairs of −log σ(r_better − r_worse) + β·½(r_better² + r_worse²), then the mean over groups,
so that every group weighs the same whatever its size. :class:`KwiseRewardTrainer` is trl's
RewardTrainer with that collator and loss (the Trainer's loop, checkpoints, evaluation and logging
unchanged), and reports pair accuracy (``accuracy``, as the pairwise trainer does) and top-1
accuracy (``top1_accuracy``: a best-ranked reply scores highest in its group) over whole groups.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F
from trl import RewardTrainer

#: Counts behind the group metrics, summed over the batches of one logging interval.
_COUNTS = ("pairs_correct", "pairs", "top1_correct", "groups")


def group_pairs(ranks: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """``(better, worse, group)`` for every pair of replies of different rank, as positions in the
    flattened replies of all groups, and the pair's group index."""
    better: list[int] = []
    worse: list[int] = []
    group_of_pair: list[int] = []
    start = 0
    for index, group_ranks in enumerate(ranks):
        for i, j in combinations(range(len(group_ranks)), 2):
            if group_ranks[i] != group_ranks[j]:
                b, w = (i, j) if group_ranks[i] < group_ranks[j] else (j, i)
                better.append(start + b)
                worse.append(start + w)
                group_of_pair.append(index)
        start += len(group_ranks)
    return better, worse, group_of_pair


def kwise_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    pair_group: torch.Tensor,
    num_groups: int,
    score_l2_reg: float = 0.001,
) -> torch.Tensor:
    """Open-Assistant's RMLoss: per group, the mean over its pairs of
    −log σ(r_b − r_w) + score_l2_reg·½(r_b² + r_w²); then the mean over the groups that have a pair."""
    if better.numel() == 0:
        return rewards.sum() * 0.0
    reward_better, reward_worse = rewards[better], rewards[worse]
    per_pair = -F.logsigmoid(reward_better - reward_worse) + score_l2_reg * 0.5 * (reward_better**2 + reward_worse**2)
    sums = per_pair.new_zeros(num_groups).index_add(0, pair_group, per_pair)
    counts = per_pair.new_zeros(num_groups).index_add(0, pair_group, torch.ones_like(per_pair))
    has_pairs = counts > 0
    return (sums[has_pairs] / counts[has_pairs]).mean()


@dataclass
class GroupCollator:
    """Ranked groups (``reply_ids``, ``reply_ranks``) to one right-padded batch of all their replies,
    with ``group_sizes`` and the pairs (``pair_better``, ``pair_worse``, ``pair_group``)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        replies = [list(ids) for example in examples for ids in example["reply_ids"]]
        ranks = [list(example["reply_ranks"]) for example in examples]
        longest = max(len(ids) for ids in replies)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(replies), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(replies), longest), dtype=torch.long)
        for row, ids in enumerate(replies):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        better, worse, pair_group = group_pairs(ranks)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "reply_ranks": torch.tensor([rank for group in ranks for rank in group], dtype=torch.long),
            "group_sizes": torch.tensor([len(group) for group in ranks], dtype=torch.long),
            "pair_better": torch.tensor(better, dtype=torch.long),
            "pair_worse": torch.tensor(worse, dtype=torch.long),
            "pair_group": torch.tensor(pair_group, dtype=torch.long),
        }


def group_metric_counts(rewards: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Correctly ordered pairs, pairs, groups whose best-ranked reply scores highest, groups (with a pair)."""
    rewards = rewards.detach().float().cpu()
    better, worse = batch["pair_better"].cpu(), batch["pair_worse"].cpu()
    counts = {"pairs_correct": int((rewards[better] > rewards[worse]).sum()), "pairs": int(better.numel()),
              "top1_correct": 0, "groups": 0}
    ranks = batch["reply_ranks"].cpu()
    start = 0
    for size in batch["group_sizes"].cpu().tolist():
        scores, group_ranks = rewards[start:start + size], ranks[start:start + size]
        start += size
        if int(group_ranks.min()) == int(group_ranks.max()):
            continue
        counts["groups"] += 1
        best = group_ranks == group_ranks.min()
        # The best reply must score above every worse-ranked one (ties between equal-best replies are fine).
        counts["top1_correct"] += int(scores[best].max() > scores[~best].max())
    return counts


class KwiseRewardTrainer(RewardTrainer):
    """trl's RewardTrainer on ranked groups with Open-Assistant's K-wise loss (see the module)."""

    score_l2_reg: float = 0.001

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and tokenizer is not None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            kwargs["data_collator"] = GroupCollator(pad_token_id=pad)
        self._group_counts: dict[str, dict[str, int]] = {"train": defaultdict(int), "eval": defaultdict(int)}
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: ANN001, ANN201
        return dataset  # already tokenized per group (oatui.data.datasets.tokenize_rm_groups)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["reply_ids", "reply_ranks"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits.squeeze(-1)
        loss = kwise_loss(rewards, inputs["pair_better"], inputs["pair_worse"], inputs["pair_group"],
                          int(inputs["group_sizes"].numel()), self.score_l2_reg)

        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            all_rewards = self.accelerator.gather(rewards.detach())
            self._metrics[mode]["min_reward"].append(all_rewards.min().item())
            self._metrics[mode]["mean_reward"].append(all_rewards.mean().item())
            self._metrics[mode]["max_reward"].append(all_rewards.max().item())
            # Every rank gathers, pairs or not (a gather skipped on one rank would hang the others).
            differences = rewards[inputs["pair_better"]] - rewards[inputs["pair_worse"]]
            margin = differences.mean() if differences.numel() else rewards.new_zeros(())
            self._metrics[mode]["margin"].append(self.accelerator.gather(margin.detach()).mean().item())
            local = group_metric_counts(rewards, inputs)
            summed = self.accelerator.gather(torch.tensor([local[key] for key in _COUNTS], device=rewards.device))
            for key, value in zip(_COUNTS, summed.view(-1, len(_COUNTS)).sum(0).tolist()):
                self._group_counts[mode][key] += int(value)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        counts = self._group_counts[mode]
        # Exact ratios over the interval's pairs and groups, not a mean of per-batch ratios.
        if counts["pairs"]:
            self._metrics[mode]["accuracy"] = [counts["pairs_correct"] / counts["pairs"]]
        if counts["groups"]:
            self._metrics[mode]["top1_accuracy"] = [counts["top1_correct"] / counts["groups"]]
        counts.clear()
        super().log(logs, start_time)


def kwise_trainer_class(score_l2_reg: float) -> type[KwiseRewardTrainer]:
    """A :class:`KwiseRewardTrainer` with the config's ``score_l2_reg``."""
    return type("KwiseRewardTrainer", (KwiseRewardTrainer,), {"score_l2_reg": score_l2_reg})
