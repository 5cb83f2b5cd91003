"""Errors a user can cause. The command line prints their one-line message and exits 2."""


class UserError(Exception):
    """Bad input: config, data, checkpoint or arguments (exit code 2)."""

    exit_code = 2


class ConfigError(UserError):
    """An unknown key, a wrong type or an invalid value in a config."""


class DataError(UserError):
    """Missing, truncated, corrupt or hostile data files."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded into this run."""


class RunDirError(UserError):
    """A run directory that is in use, or would be overwritten."""


class EnvironmentFault(Exception):
    """A fault of the environment (disk full, dead peer): exit code 1, one line."""

    exit_code = 1
