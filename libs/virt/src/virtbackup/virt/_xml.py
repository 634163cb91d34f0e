"""Parsing and printing the XML documents libvirt exchanges with us.

The documents come from libvirtd (a trusted peer: it runs as root on the hypervisor) or are
built here, so the standard library parser is used without defusedxml.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET


def parse(text: str) -> ET.Element:
    """Parse one XML document from libvirt."""
    return ET.fromstring(text)  # noqa: S314 - trusted input, see module docstring


def dump(element: ET.Element) -> str:
    """Serialize ``element`` (unicode, no XML declaration)."""
    return ET.tostring(element, encoding="unicode")


def int_or_none(value: str | None) -> int | None:
    """``int(value)`` or ``None`` for an absent or non-numeric attribute."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None
