"""GRPO: rollouts on the current policy, math-verified rewards, group-normalised advantages, clipped policy
gradient with an entropy bonus and no KL term by default (the M1 recipe)."""
