"""The router stage (group `router`): rollout.prompts -> rollout.routed, by the cost model over the index."""
