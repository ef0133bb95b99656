"""Errors caused by the user's input. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a config, a data file, a weights file, a run directory in the wrong state."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type, or an impossible value."""


class DataError(UserError):
    """A dataset is missing, truncated or malformed."""


class WeightsError(UserError):
    """Backbone weights could not be found, verified or loaded."""


class RunDirError(UserError):
    """The run directory is finished, unfinished or otherwise not usable as asked."""


class TrainingDiverged(RuntimeError):
    """A loss or the weights became NaN or infinite. Runs keep their last good checkpoint; a diverged
    pretraining is never cached. The CLI reports it in one line with exit code 1."""
