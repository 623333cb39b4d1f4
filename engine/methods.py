"""The editing methods by name, in a module without torch so that the CLI can check them quickly."""

from __future__ import annotations

from typing import Literal

Method = Literal["metake", "alphaedit", "memit"]
METHODS: tuple[Method, ...] = ("metake", "alphaedit", "memit")
