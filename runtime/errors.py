"""One exception hierarchy for the whole package; the CLI maps it to exit codes.

Messages follow ``<what>: expected <expected>, got <actual>[; <fix>]``.
"""


class SparseFedError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code: int = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "exit_code" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must set its own exit_code")


class ShapeError(SparseFedError, ValueError):
    """An array has the wrong shape or size."""

    exit_code = 10


class DTypeError(SparseFedError, TypeError):
    """An array has the wrong dtype."""

    exit_code = 11


class ConfigError(SparseFedError, ValueError):
    """A setting or argument is invalid."""

    exit_code = 12


class DataError(SparseFedError, ValueError):
    """A dataset file is missing, truncated or not in the expected format."""

    exit_code = 13


class CheckpointError(SparseFedError, ValueError):
    """A checkpoint file is missing, corrupt, truncated or does not fit the model."""

    exit_code = 14


class CodecError(SparseFedError, ValueError):
    """A wire message is malformed."""

    exit_code = 15


class StateError(SparseFedError, RuntimeError):
    """An object was used in the wrong order (e.g. backward before forward)."""

    exit_code = 16


class TransportError(SparseFedError, ConnectionError):
    """A broker or network peer could not be reached or did not answer."""

    exit_code = 17
