"""Real components started for users who have none (and for tests): SoftHSM2 tokens, ..."""
