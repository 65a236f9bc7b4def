"""Running a load: corpus, schedules, shards, the runner, merging, capacity, the naive baseline."""
