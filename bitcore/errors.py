"""Exception types.  Each names what was wrong; messages name the bad value and what was expected."""


class BitLabError(Exception):
    """Base class of every BitLab error."""


class ConfigError(BitLabError, ValueError):
    """A config field has a bad value or an unknown name."""


class PackingError(BitLabError, ValueError):
    """Packed data does not match its declared shape or format."""


class QuantizationError(BitLabError, ValueError):
    """A tensor cannot be quantized (NaN/Inf, wrong rank, ...)."""


class NoKernelError(BitLabError, RuntimeError):
    """No registered kernel serves a (config, device, shape); the message lists why each was rejected."""


class BackendUnavailableError(BitLabError, RuntimeError):
    """A backend was asked for but cannot run here; the message says why."""


class CheckpointError(BitLabError, ValueError):
    """A checkpoint is missing a tensor, has a mismatched one, or is corrupted."""
