"""PLACEHOLDER: replaced by the cupy backend work."""

NAME = "cupy"


def unavailable_reason():
    return "the cupy backend is not built yet"


def serve_reason(x):
    return unavailable_reason()
