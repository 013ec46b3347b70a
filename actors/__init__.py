"""The data plane: actors and mailboxes, channels with credit-based flow control, tasks."""
