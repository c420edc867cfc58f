"""GRPO and PPO learner consumers."""
