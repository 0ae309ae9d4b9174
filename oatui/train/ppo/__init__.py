"""oatui's own PPO trainer on accelerate (trl 1.x has no PPOTrainer): the RL stage's insides.

``trainer`` holds the loop; the maths it calls lives in small modules tested on their own:
``losses`` (clipped policy and value losses, entropy), ``kl_control`` (fixed / adaptive KL
coefficient), ``stats`` (whitening and moments over all ranks), ``rollout`` (prompts, generation,
the response mask), ``models`` (policy + value head), ``scoring`` (reward and reference, in-process
or on Triton), ``checkpoint`` (resumable state), ``build`` (setting it all up).
"""
