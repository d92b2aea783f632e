"""`m1 pipeline` and `m1 promote` (placeholder until the pipeline work lands)."""


def register(sub) -> None:
    pass
