"""Verbs for a later issue; registers nothing yet."""


def register(subparsers, parents) -> None:
    pass
