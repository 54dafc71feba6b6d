"""Errors the user can act on. Each message names the problem and the fix; the CLI prints it as one line."""


class AntidoteError(Exception):
    """Base class: a problem with the user's input, files or environment (not a bug in this package)."""


class ModelLoadError(AntidoteError):
    """The model name, path or hub id could not be loaded."""


class BundledModelMissing(ModelLoadError):
    """A bundled model's data packages are not installed."""


class UnsupportedArchitecture(AntidoteError):
    """The decoder blocks of the model could not be located."""


class PromptFileError(AntidoteError):
    """A prompt file is missing, empty or malformed."""


class ArtifactError(AntidoteError):
    """An antidote file is missing, corrupted, truncated or of an unknown version."""


class ArtifactMismatch(ArtifactError):
    """An antidote was fitted on a different model."""


class InvalidParameter(AntidoteError, ValueError):
    """A parameter such as alpha, k or layer_top_p is out of range."""


class ContextLengthError(InvalidParameter):
    """A prompt (plus the tokens to generate) is longer than the model's context."""


class RequestLogError(InvalidParameter):
    """A request log given to `antidote logs` is missing, empty or holds no complete entry."""
