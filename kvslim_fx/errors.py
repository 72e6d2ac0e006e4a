"""The one exception type users catch: every bad input is reported as a :class:`KVSlimError`."""

from __future__ import annotations


class KVSlimError(ValueError):
    """Bad input or unsupported model; the message names the problem and the fix."""
