"""``SettingError``: a value of a setting that cannot work, whose message names the settings it is about.

The library names a setting by its Python name (``TrainConfig.batch_tokens``, the recipe's ``max_seq_len``); a
command line names it by its flag (``--batch-tokens``). The message is kept as a template with the settings in
braces, ``"raise {batch_tokens} to at least {max_seq_len}"``, so that each layer renders it in its own words:
``str(error)`` with the Python names, :meth:`SettingError.render` with any other (the CLI: its flags). The
library never writes a flag.
"""
from __future__ import annotations

import re
from typing import Callable

_SETTING = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


class SettingError(ValueError):
    """A setting whose value cannot work. ``template`` names settings as ``{name}`` (every other brace is
    literal text); :attr:`settings` lists them, in order."""

    def __init__(self, template: str):
        self.template = template
        self.settings = tuple(dict.fromkeys(_SETTING.findall(template)))
        super().__init__(self.render(lambda name: name))

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with every ``{setting}`` replaced by ``name_of(setting)``."""
        return _SETTING.sub(lambda match: name_of(match.group(1)), self.template)
