"""Errors raised by the model build, with messages meant for the person running it."""


class ModelBuildError(RuntimeError):
    """The model could not be fetched, converted, quantized or verified."""


class ManifestError(ModelBuildError):
    """A manifest is missing, malformed, or does not match the files beside it."""
