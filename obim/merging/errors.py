"""The one exception type obim raises for bad input: its message is a single line naming the culprit."""


class ObimError(Exception):
    """Bad input (a file, tensor or option): shown to the user as a one-line error."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
