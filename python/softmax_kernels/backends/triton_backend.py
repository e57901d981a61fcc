"""PLACEHOLDER: replaced by the triton backend work."""

NAME = "triton"


def unavailable_reason():
    return "the triton backend is not built yet"


def serve_reason(x):
    return unavailable_reason()
