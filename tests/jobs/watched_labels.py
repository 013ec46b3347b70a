"""The helper module of ``watched_counts.py``, which the ``--watch`` tests edit too."""


def label() -> str:
    return "old"
