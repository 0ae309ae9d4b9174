"""The RL stage: PPO against the reward model with a KL penalty to the SFT model (``oatui.train.ppo``).

Run by ``oatui train rl`` as ``python -m oatui.train.rl --run-dir DIR`` (or under accelerate /
deepspeed); it reads everything else from the run directory.
"""

from __future__ import annotations

from oatui.train.common import StageContext, stage_main


def train_rl(context: StageContext) -> None:
    from oatui.train.ppo.trainer import run_ppo

    run_ppo(context)


def main(argv: list[str] | None = None) -> None:
    stage_main("rl", train_rl, argv)


if __name__ == "__main__":
    main()
