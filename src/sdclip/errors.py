"""The errors sdclip raises on purpose: each names what is wrong and, where it helps, the fix."""


class SdclipError(Exception):
    """Something sdclip cannot do (the CLI exits with 1)."""


class BadInput(SdclipError, ValueError):
    """The input is wrong: a file, a prompt, an option (the CLI exits with 2)."""
