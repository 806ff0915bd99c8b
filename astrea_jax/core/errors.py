"""Errors every layer raises."""


class ConfigError(ValueError):
  """A config value is wrong; the message names the field, the value and what was expected."""
