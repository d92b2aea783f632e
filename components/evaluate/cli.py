"""`m1 eval` and `m1 bench` (placeholder until the evaluation work lands)."""


def register(sub) -> None:
    pass
