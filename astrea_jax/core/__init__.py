"""The lowest layer: what every other layer shares (config field dataclasses, dtypes, errors, logical axis names,
the stage table, atomic files, multi-host helpers). It imports nothing from the rest of the package."""
