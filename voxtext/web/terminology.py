"""Codes of serialized Slicer terminology entries (``~SCT^...^...~...``), for labels and DICOM SEG."""

from __future__ import annotations


def _code(part: str) -> tuple[str, str, str]:
    """``SCT^64033007^Kidney`` -> (scheme, value, meaning); blanks when absent."""
    fields = (part.split("^") + ["", "", ""])[:3]
    return fields[0], fields[1], fields[2]


def parse_entry(entry: str) -> dict[str, tuple[str, str, str]]:
    """A serialized Slicer terminology entry's codes: category, type, modifier, region, region_modifier."""
    parts = (entry or "").split("~") + [""] * 7
    return {"category": _code(parts[1]), "type": _code(parts[2]), "modifier": _code(parts[3]),
            "region": _code(parts[5]), "region_modifier": _code(parts[6])}


def type_meaning(segment) -> str:
    """Code meaning of the segment's terminology type (and modifier), e.g. 'Kidney, Left'; '' when uncoded."""
    codes = parse_entry(segment.GetTerminology() or "")
    meaning, modifier = codes["type"][2], codes["modifier"][2]
    text = meaning + (f", {modifier}" if modifier and meaning else "")
    if codes["region"][2] and text:
        text += f" in {codes['region'][2]}"
    return text
