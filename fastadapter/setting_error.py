"""Error messages that name settings: the library writes a setting's Python name (``TrainConfig.batch_tokens``,
the recipe's ``max_seq_len``, ``check_device``'s ``device``), a command line its flag (``--batch-tokens``).

A message is a :class:`SettingMessage`: a ``str.format`` template whose fields are either **data**, given as
keyword values (a path, a count, a row's text), or **settings**, every field not given a value. Each layer renders
the settings in its own words: ``str()`` with the Python names, :meth:`SettingMessage.render` with any other (the
CLI: its flags, :func:`fastadapter.cli.setting_flags`). Data never enters the template, so a row whose text holds
``{instruction}`` or a message that merely contains the word ``lr`` is never rewritten; only a declared field is.

* :class:`SettingError`: a setting whose value cannot work (a ``ValueError``), built from a template directly:
  ``SettingError("raise {batch_tokens} to at least {length}", length=600)``.
* :class:`NamesSettings`: a mixin for an error class of its own (``DataError``, ``RunFolderError``,
  ``CheckpointNotFound``...) whose message may name a setting: ``DataError.naming("{path}: ... set {on_bad_row}
  to 'skip'", path=path)``; the class is built as usual (``DataError(text)``) where it names none.

The library never writes a flag (``tests/cli/test_setting_error.py`` reads every string of the package).
"""
from __future__ import annotations

import re
import string
from typing import Any, Callable, Mapping, Optional

_SETTING_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def _identity(name: str) -> str:
    return name


class SettingMessage:
    """A message template naming settings (see the module's docstring).

    Args:
        template: a ``str.format`` template; literal braces are doubled (``{{`` and ``}}``).
        values: the data fields' values; a value that is itself a :class:`SettingMessage` is rendered in the same
            words as the message around it.

    Raises:
        ValueError: a positional field (``{}``, ``{0}``), or a setting field that is no setting name (a literal
            brace that was not doubled).
    """

    def __init__(self, template: str, values: Optional[Mapping[str, Any]] = None):
        self.template, self.values = template, dict(values or {})
        settings = []
        for _, field, _, _ in string.Formatter().parse(template):
            if field is None:
                continue
            name = re.split(r"[.\[]", field, maxsplit=1)[0]
            if not name or name.isdigit():
                raise ValueError(f"message template {template!r}: positional field {{{field}}}; name every field")
            if name not in self.values:
                if not _SETTING_NAME.fullmatch(name) or name != field:
                    raise ValueError(f"message template {template!r}: {{{field}}} is no setting name and no value "
                                     f"was given for it (double a literal brace)")
                settings.append(name)
        #: The settings the message names, in order of first appearance.
        self.settings: tuple[str, ...] = tuple(dict.fromkeys(settings))

    def render(self, name_of: Callable[[str], str] = _identity) -> str:
        """The message with every setting written as ``name_of(setting)`` (nested messages alike)."""
        values = {key: value.render(name_of) if isinstance(value, SettingMessage) else value
                  for key, value in self.values.items()}
        return self.template.format_map({**values, **{name: name_of(name) for name in self.settings}})

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"SettingMessage({self.template!r}, {self.values!r})"


class NamesSettings:
    """Mixin of an exception class whose message may name settings: :meth:`naming` builds one from a template,
    keeping the :class:`SettingMessage` as :attr:`setting_message` (None for one built from plain text)."""

    setting_message: Optional[SettingMessage] = None

    @classmethod
    def naming(cls, template: str, **values: Any):
        """An instance of ``cls`` whose message is ``template`` (see :class:`SettingMessage`) with ``values``."""
        message = SettingMessage(template, values)
        error = cls(str(message))
        error.setting_message = message
        return error

    @property
    def settings(self) -> tuple[str, ...]:
        """The settings the message names (empty when it names none)."""
        return self.setting_message.settings if self.setting_message is not None else ()

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with every setting written as ``name_of(setting)``."""
        return self.setting_message.render(name_of) if self.setting_message is not None else str(self)


class SettingError(NamesSettings, ValueError):
    """A setting whose value cannot work: ``SettingError(template, **values)`` (see :class:`SettingMessage`)."""

    def __init__(self, template: str, **values: Any):
        self.setting_message = SettingMessage(template, values)
        super().__init__(str(self.setting_message))

    @classmethod
    def naming(cls, template: str, **values: Any) -> "SettingError":
        return cls(template, **values)

    @property
    def template(self) -> str:
        return self.setting_message.template

    def __reduce__(self):
        # Pickled (a worker process's error) as its template and values, not as the rendered text.
        return (_rebuild, (type(self), self.setting_message.template, self.setting_message.values))


def _rebuild(cls, template: str, values: dict) -> SettingError:
    return cls(template, **values)
