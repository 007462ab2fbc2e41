"""User-facing errors. The CLI maps these to exit status 2 with one line on stderr."""


class MmjaxError(Exception):
    """Bad input from the user: a wrong path, shape, config key, token id ..."""


class ConfigError(MmjaxError, ValueError):
    """A config key or value that mmjax does not accept."""


class UnsupportedModelError(MmjaxError, ValueError):
    """An architecture or checkpoint layout mmjax cannot load."""


class InputError(MmjaxError, ValueError):
    """Inputs with the wrong shape, dtype or value range."""
