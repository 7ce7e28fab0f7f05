"""Exceptions that callers handle. Each message names the offending value or file."""


class ScaleInferError(Exception):
    """Base of every error scaleinfer raises on purpose; the CLI prints these on one line."""


class InvalidRequestError(ScaleInferError, ValueError):
    """A request or parameter that can never be served as given (bad sampling value, prompt too long)."""


class ModelLoadError(ScaleInferError):
    """A model path, file or architecture that cannot be loaded."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture has no implementation here."""


class RequestFailedError(ScaleInferError):
    """One request failed inside the engine (its output could not be processed); the others go on."""


class EngineDeadError(ScaleInferError):
    """The engine loop failed and can serve no more requests."""


class OffloadReadError(ScaleInferError):
    """Streamed weights could not be read back (a layer file vanished, shrank or failed on disk); the requests
    of the failed step fail with it, the engine goes on."""


class RankFailedError(EngineDeadError):
    """A rank of a multi-process run died, raised or hung in a collective; the run can go no further. The
    message names the rank and what happened."""
