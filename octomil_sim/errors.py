"""The one error type that reaches people: a bad config value, said in one line."""


class ConfigError(ValueError):
    """A config value that cannot work: the message names the key, the value and what is allowed."""


class RunError(RuntimeError):
    """A run that cannot go on for a reason outside the config (e.g. client actors that never
    start), said in one line."""


def instantiate(node, **kwargs):
    """Hydra's ``instantiate``, letting a ``ConfigError`` raised inside a constructor through as
    itself (Hydra wraps it in a multi-line ``InstantiationException``)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def number_list(value) -> list[float] | None:
    """``value`` as a list of numbers: one number becomes ``[value]``, a sequence of numbers a list;
    None when it is neither (a bool, a string, a non-numeric item), for the caller's one-line error."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return [value]
    try:
        values = list(value)
    except TypeError:
        return None
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        return None
    return values
