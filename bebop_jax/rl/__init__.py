"""RL post-training: environments and their sandbox, the actor, the learner and the asynchronous loop."""
