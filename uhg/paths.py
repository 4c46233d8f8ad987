"""Names given by users that become file or folder names (run names, condition names, ...).

`check_name` accepts a single path component made of letters, digits, '_', '.', '-' that does
not start with a dot, so a name can never address a parent folder ('..'), an absolute path, a
subfolder or a hidden file, whatever the filesystem.
"""

from __future__ import annotations

import re

from uhg.errors import ConfigError, UhgError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_name(value: object, what: str, error: type[UhgError] = ConfigError, *, identifier: bool = False) -> str:
    """Return `value` if it is a safe folder name (a Python-style identifier when `identifier`),
    else raise `error` naming `what` and the rule. `what` says where the name came from, e.g.
    "condition name" or "--run-name"."""
    pattern, rule = ((_IDENTIFIER, "letters, digits and '_', not starting with a digit") if identifier else
                     (_NAME, "letters, digits, '_', '.', '-', not starting with '.'"))
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise error(f"{what} {value!r}: use {rule} (it names a folder and must stay inside its parent)")
    return value
