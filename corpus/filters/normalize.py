"""Text normalization before the quality rules: line breaks, control characters, mojibake, NFC.

Steps, each recorded by a short code in `Normalized.changes` when it changed the text:
- `line_breaks`: CRLF, lone CR (and, in non-ASCII text, U+2028, U+2029, U+0085) become "\\n".
- `terminal_escapes_removed`: ANSI escape sequences (ESC [ ... m) are removed (ftfy).
- `control_chars_removed`: C0 controls other than \\t \\n \\f \\r, and DEL, are removed; in non-ASCII text
  also ftfy's list (deprecated format characters, U+FFF9-U+FFFC, a stray BOM U+FEFF). Form feed is kept
  because Python sources and GNU licenses use it as a page break. The count of removed C0/DEL
  characters plus U+FFFD replacement characters is `Normalized.bad_chars`: the quality rules drop a
  document whose share of them exceeds `max_control_fraction` (`binary_content`), so a binary file
  decoded as text is dropped, while a stray NUL in a long document is removed and the document kept.
- `mojibake_fixed`, `c1_controls_fixed`, `surrogates_fixed`: ftfy's encoding repair, applied line by
  line (as `ftfy.fix_text` does) to non-ASCII lines only, and only when `ftfy.badness.is_bad` flags the
  document; the settings keep normal text unchanged: no HTML unescaping (code contains "&amp;"
  legitimately), no quote or ellipsis uncurling, no ligature or width folding (NFKC-like changes).
- `nfc`: Unicode NFC, skipped when `unicodedata.is_normalized` says the text already is.

Trade-off: pure-ASCII text (most code, much English) takes a fast path of a few C-level passes
because mojibake and NFC cannot occur in it. Other text is checked first by `_may_need_ftfy` (a few
C-level scans of its UTF-8 bytes that find every text ftfy's badness test could flag, and some more);
only then do its non-ASCII lines go through ftfy. Prose with curly quotes and dashes, most non-ASCII
text, skips ftfy altogether: on the benchmark's prose 78 -> 22 us per document, identical output on
the default corpus and on 20,000 random strings of mojibake-prone characters. ftfy.fix_text with its
defaults runs at 3.8 MB/s per core here and changes 74 of the 2,071 documents (uncurling quotes and
the like); this changes 12.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import ftfy
from ftfy import badness, fixes

# Bytes removed from ASCII text: C0 controls except \t (09) \n (0A) \f (0C) \r (0D), and DEL (7F).
_C0 = bytes([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F])
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Non-ASCII characters ftfy.fixes.remove_control_chars deletes (deprecated format characters, BOM,
# interlinear annotation marks); searched first because its str.translate costs ~75 ns per character.
_FTFY_CONTROLS = re.compile("[\u206a-\u206f\ufeff\ufff9-\ufffc]")
_FIX_CONFIG = ftfy.TextFixerConfig(
    unescape_html=False,
    remove_terminal_escapes=False,  # done on the whole text first
    fix_encoding=True,
    restore_byte_a0=True,
    replace_lossy_sequences=True,
    decode_inconsistent_utf8=True,
    fix_c1_controls=True,
    fix_latin_ligatures=False,
    fix_character_width=False,
    uncurl_quotes=False,
    fix_line_breaks=False,  # done on the whole text first
    fix_surrogates=True,
    remove_control_chars=False,  # done on the whole text first
    normalization=None,  # NFC once for the whole text, after the per-line repair
    explain=True,
)
# ftfy explanation steps -> our change codes.
_STEP_CODES = {
    "fix_c1_controls": "c1_controls_fixed",
    "fix_surrogates": "surrogates_fixed",
}
CHANGE_CODES = {
    "line_breaks": "CRLF, CR and Unicode line separators became \\n",
    "terminal_escapes_removed": "ANSI terminal escape sequences were removed",
    "control_chars_removed": "control characters (not \\t \\n \\f \\r) were removed",
    "mojibake_fixed": "text decoded with the wrong codec (mojibake) was repaired by ftfy",
    "c1_controls_fixed": "C1 control characters were read as Windows-1252",
    "surrogates_fixed": "UTF-16 surrogate pairs were joined, lone surrogates became U+FFFD (valid UTF-8 out)",
    "nfc": "Unicode NFC normalization changed the text",
}


@dataclass(frozen=True, slots=True)
class Normalized:
    text: str
    changes: list[str] = field(default_factory=list)
    bad_chars: int = 0  # removed C0/DEL controls + U+FFFD in the input


def _line_breaks(text: str, ascii_only: bool) -> tuple[str, bool]:
    changed = False
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        changed = True
    if not ascii_only and ("\u2028" in text or "\u2029" in text or "\x85" in text):
        text = text.replace("\u2028", "\n").replace("\u2029", "\n").replace("\x85", "\n")
        changed = True
    return text, changed


def _fix_lines(text: str) -> tuple[str, list[str]]:
    """ftfy's control-character removal and encoding repair on the non-ASCII lines of `text`."""
    codes: list[str] = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.isascii():  # O(1) in CPython: nothing below can apply to an ASCII line
            continue
        fixed = line
        if _FTFY_CONTROLS.search(fixed):
            fixed = fixes.remove_control_chars(fixed)
            if "control_chars_removed" not in codes:
                codes.append("control_chars_removed")
        try:
            fixed.encode("utf-8")
            suspicious = badness.is_bad(fixed)
        except UnicodeEncodeError:  # lone or paired surrogates
            suspicious = True
        if suspicious:
            repaired, steps = ftfy.fix_and_explain(fixed, _FIX_CONFIG)
            if repaired != fixed:
                fixed = repaired
                for step in steps or ():
                    code = _STEP_CODES.get(step.parameter, "mojibake_fixed")
                    if code not in codes:
                        codes.append(code)
        lines[i] = fixed
    return "\n".join(lines), codes


def _may_need_ftfy(text: str) -> bool:
    """False only when `_fix_lines` would return the text unchanged; a few C-speed scans of the UTF-8 bytes.

    Every alternative of ftfy's BADNESS_RE needs two adjacent non-ASCII characters, or one of C1
    controls, Œ/œ, Ã/Â (its character classes hold no ASCII character). In UTF-8 two adjacent
    non-ASCII characters are a continuation byte (10xxxxxx) followed by a lead byte (11xxxxxx). So a text
    without these, without surrogates and without ftfy's control characters has no line that `is_bad`
    flags or that `remove_control_chars` changes. Typical prose (curly quotes, dashes between ASCII
    letters) passes in ~5 us instead of ~1.5 us per non-ASCII line through ftfy's regex.
    """
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # lone or paired surrogates
        return True
    # Only the non-ASCII characters, each whole (a lead byte keeps its continuation bytes): a marker
    # found here is that character in the text.
    high = raw.translate(None, _ASCII_BYTES)
    if any(marker in high for marker in _SUSPECT_BYTES):
        return True
    pos = high.find(b"\xc2")  # C1 controls U+0080-U+009F are C2 80-9F
    while pos >= 0:
        if high[pos + 1] <= 0x9F:
            return True
        pos = high.find(b"\xc2", pos + 2)
    return b"cL" in raw.translate(_BYTE_CLASS)


def normalize(text: str) -> Normalized:
    """Normalize one document (see the module docstring for the steps and their codes)."""
    changes: list[str] = []
    ascii_only = text.isascii()
    text, changed = _line_breaks(text, ascii_only)
    if changed:
        changes.append("line_breaks")
    raw = text.encode("utf-8", "surrogatepass")
    # C0 controls are single bytes in UTF-8 and never occur inside a multi-byte sequence, so deleting
    # them from the bytes counts them exactly, at C speed.
    n_controls = len(raw) - len(raw.translate(None, _C0))
    bad_chars = n_controls + (0 if ascii_only else text.count("\ufffd"))
    if n_controls:
        if "\x1b" in text:
            stripped = _ANSI.sub("", text)
            if stripped != text:
                changes.append("terminal_escapes_removed")
                text = stripped
        if ascii_only:
            text = text.encode("ascii").translate(None, _C0).decode("ascii")
        else:
            text = text.translate(_C0_TABLE)
        changes.append("control_chars_removed")
    if not ascii_only:
        if _may_need_ftfy(text):
            text, codes = _fix_lines(text)
            changes.extend(c for c in codes if c not in changes)
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
            changes.append("nfc")
    return Normalized(text=text, changes=changes, bad_chars=bad_chars)


_C0_TABLE = dict.fromkeys(_C0)
# UTF-8 of Œ œ Ã Â, and of the blocks holding ftfy's control characters (U+2040-U+207F: U+206A-U+206F;
# U+FEFF; U+FFC0-U+FFFF: U+FFF9-U+FFFC): a superset, any of them sends the text through `_fix_lines`.
# ASCII -> "a", UTF-8 continuation byte -> "c", lead byte -> "L": "cL" = two adjacent non-ASCII characters.
_ASCII_BYTES = bytes(range(0x80))
_BYTE_CLASS = b"a" * 0x80 + b"c" * 0x40 + b"L" * 0x40
_SUSPECT_BYTES = ("Œ".encode(), "œ".encode(), "Ã".encode(), "Â".encode(), b"\xe2\x81", b"\xef\xbb\xbf", b"\xef\xbf")
