"""The plan layer: how a job's graph becomes the tasks, channels and writers of an attempt."""
