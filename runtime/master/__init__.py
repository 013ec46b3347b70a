"""The job master: deployment and failover, the checkpoint coordinator, restart strategies, configuration."""
