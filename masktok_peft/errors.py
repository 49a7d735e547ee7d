"""The package's error and warning classes."""


class MaskTokError(ValueError):
    """Invalid masktok settings or input; the message names the value and the fix."""


class MaskTokWarning(UserWarning):
    """A masktok setting that works but is probably not what the caller meant."""
