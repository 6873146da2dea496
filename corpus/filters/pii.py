"""PII and secret detection, with a per-kind policy: redact the span, drop the document, or keep it.

Detectors (kind: what fires, what must not):
- email: local@domain.tld. Not the documentation domains of RFC 2606 / RFC 6761 (example.com/.net/.org
  and their subdomains, the .example, .test, .invalid, .localhost TLDs): `user@example.com` in a
  docstring is an example, not a person.
- phone: `phonenumbers.is_valid_number` on candidates that start with "+" (any region), or that are
  formatted national numbers of `phone_region` (default US) with at least two separators ("(415)
  555-2671", "415-555-2671"). Unformatted digit runs (ids, Unix times), dates, versions and 4-part
  dotted numbers are never phone numbers here.
- ip_address: IPv4 and IPv6 validated by `ipaddress`, reported only when `is_global`: private,
  loopback, link-local and documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
  2001:db8::/32) identify no one. An IPv4 whose four parts are all single digits ("1.2.3.4") is taken
  for a version number; IPv6 needs at least three non-empty groups (so "1::2" slices do not fire).
- credit_card: 13-19 digits, contiguous or in 4-digit groups (Amex 4-6-5), Luhn-valid, with a known
  issuer prefix and length (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay; not Maestro).
- private_key: a PEM "-----BEGIN ... PRIVATE KEY-----" block with its END line and >= 64 base64
  characters of body (a docstring naming the header alone does not fire).
- aws_access_key: AKIA/ASIA + 16 [A-Z0-9]; aws_secret_key: 40 base64 characters assigned to a name
  containing "aws" and "secret"/"private". AWS's documented examples (containing "EXAMPLE") do not fire.
- github_token: ghp_/gho_/ghu_/ghs_/ghr_ + 36 alphanumerics, github_pat_ + 82; slack_token: xox?-
  tokens and hooks.slack.com webhook URLs. Placeholders (low entropy, "xxxx") do not fire.
- generic_secret: a quoted value (or an unquoted one after an UPPER_CASE env-style name) of >= 16
  characters assigned to a name ending in api_key / secret / token / password / pwd / <prefix>_key
  (prefixes: api, secret, access, private, auth, client, signing, encryption, app, master, session),
  with both letters and digits and Shannon entropy >= `secret_min_entropy` bits per character
  (default 3.5: random base62 of 20+ characters scores ~4.2, a hex sha256 3.7, "password123456789"
  4.0, so a weak but real password still fires).
  `cache_key = "<hex digest>"` does not fire (cache_ is not a secret prefix), nor do placeholders.

Speed: Python regexes cost 20-70 ns per byte per pattern, so no pattern scans the whole text. Each
detector first finds anchors with C-speed `bytes.find` on a one-byte-per-character view of the text
(digits mapped to "0", hex to "h", lower-cased): "@", "+0", "0000", "0.0", "::", "h:h", "-----BEGIN ",
"AKIA", "aws", "key", "token", ... and runs its regex only in small windows around them. Measured on
the default corpus: ~48 MB/s per core, 14x the detectors' regexes run over whole texts (before any
validation), with no quadratic case on long runs of digits, "@", ":" or "key=".

Detections carry kind, start, end (offsets in the normalized text, before redaction) and action;
never the matched value. Overlaps keep the more specific kind (secrets before PII).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import phonenumbers

from corpus.config import FilterConfig

PII_KINDS = FilterConfig.PII_KINDS
SECRET_KINDS = FilterConfig.SECRET_KINDS
KINDS = (*SECRET_KINDS, "credit_card", "email", "ip_address", "phone")  # priority order on overlap
assert set(KINDS) == set(PII_KINDS) | set(SECRET_KINDS), f"KINDS {KINDS} out of sync with FilterConfig"
PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip_address": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    **dict.fromkeys(SECRET_KINDS, "<SECRET>"),
}
DEFAULT_POLICY: dict[str, str] = {**dict.fromkeys(PII_KINDS, "redact"), **dict.fromkeys(SECRET_KINDS, "drop")}
DOCUMENTATION_DOMAINS = ("example.com", "example.net", "example.org")
DOCUMENTATION_TLDS = ("example", "test", "invalid", "localhost")
PLACEHOLDER_WORDS = (
    "example", "xxxx", "your", "changeme", "placeholder", "dummy", "sample", "redacted", "fake", "test",
    "<", ">", "${", "{{", "****", "....",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Detection:
    kind: str
    start: int
    end: int
    action: str

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "start": self.start, "end": self.end, "action": self.action}


def resolve_policy(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """DEFAULT_POLICY <- group entries ("pii", "secrets") <- per-kind entries."""
    policy = dict(DEFAULT_POLICY)
    overrides = dict(overrides or {})
    for key, action in overrides.items():
        if action not in FilterConfig.PII_ACTIONS:
            raise ValueError(
                f"pii policy: {key}: action must be one of {list(FilterConfig.PII_ACTIONS)}, got {action!r}"
            )
        if key not in (*KINDS, *FilterConfig.PII_GROUPS):
            raise ValueError(f"pii policy: unknown kind {key!r}; known: {[*FilterConfig.PII_GROUPS, *KINDS]}")
    for group, kinds in (("pii", PII_KINDS), ("secrets", SECRET_KINDS)):
        if group in overrides:
            policy.update(dict.fromkeys(kinds, overrides[group]))
    policy.update({k: v for k, v in overrides.items() if k in KINDS})
    return policy


def shannon_entropy(value: str) -> float:
    """Bits per character of the value's own character distribution."""
    n = len(value)
    if not n:
        return 0.0
    return -sum(k / n * math.log2(k / n) for k in Counter(value).values())


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _issuer_known(digits: str) -> bool:
    n = len(digits)
    two, four = int(digits[:2]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return n == 16  # Mastercard
    if two in (34, 37):
        return n == 15  # Amex
    if four == 6011 or 644 <= int(digits[:3]) <= 649 or two == 65:
        return 16 <= n <= 19  # Discover
    if 3528 <= four <= 3589:
        return 16 <= n <= 19  # JCB
    if 300 <= int(digits[:3]) <= 305 or two in (36, 38, 39):
        return n in (14, 16)  # Diners Club
    if two == 62:
        return 16 <= n <= 19  # UnionPay
    # Maestro (50, 56-69, 12-19 digits) is left out: its prefixes and lengths are so broad that ~5% of
    # random Luhn-valid digit runs (hash values in tests) would pass.
    return False


_DIGIT_MAP = bytes(ord("0") if 48 <= c <= 57 else c for c in range(256))
_HEX_MAP = bytes(ord("h") if chr(c) in "0123456789abcdefABCDEF" else c for c in range(256))

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24})(?![\w-]|\.[A-Za-z0-9])"
)
_PHONE = re.compile(
    r"(?<![\w+.-])(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{1,4}\)[ .-]?)?[0-9]{1,12}(?:[ .-][0-9]{1,6}){0,5}(?![\w]|[.-][0-9])"
)
_DATE_LIKE = re.compile(r"[0-9]{4}[./-][0-9]{1,2}[./-][0-9]{1,2}|[0-9]{1,2}[./-][0-9]{1,2}[./-][0-9]{4}")
_US_DOTTED = re.compile(r"[0-9]{3}\.[0-9]{3}\.[0-9]{4}")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.[0-9])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:]|\.[0-9])")
_CARD = re.compile(
    r"(?<![0-9-])(?:[0-9]{13,19}|[0-9]{4}([ -])[0-9]{4}\1[0-9]{4}\1[0-9]{1,7}|[0-9]{4}([ -])[0-9]{6}\2[0-9]{4,5})"
    r"(?![0-9]|[ -][0-9])"
)
_PEM_BEGIN = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ ){0,3})PRIVATE KEY( BLOCK)?-----")
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/]")
_AWS_ACCESS = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])")
_AWS_SECRET = re.compile(
    r"aws[\w.-]{0,40}?(?:secret|private)[\w.-]{0,30}[\"'\]]?\s*(?::=|=>|=|:)\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])",
    re.IGNORECASE,
)
_GITHUB = re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_([A-Za-z0-9]{36})|github_pat_([A-Za-z0-9_]{82}))(?![A-Za-z0-9_])")
_SLACK = re.compile(
    r"(?<![A-Za-z0-9])(?:xox[abposr]-([0-9A-Za-z]{2,}(?:-[0-9A-Za-z]{2,}){1,4})"
    r"|https://hooks\.slack\.com/services/(T[A-Z0-9]{6,12}/B[A-Z0-9]{6,12}/[A-Za-z0-9]{20,32}))(?![A-Za-z0-9])"
)
_GENERIC = re.compile(
    r"(?<![A-Za-z0-9_.-])(?P<name>[A-Za-z0-9_.-]{0,40}?"
    r"(?:(?:api|secret|access|private|auth|client|signing|encryption|app|master|session)[_.-]?key"
    r"|apikey|secret|token|passw(?:or)?d|pwd))"
    r"[\"'\]]?[ \t]*(?P<op>:=|=>|=|:)[ \t]*(?P<q>[\"'`]?)(?P<v>[A-Za-z0-9_\-+/=.~!@#$%^&*]{16,256})(?P=q)"
    r"(?![A-Za-z0-9_\-+/=.~])",
    re.IGNORECASE,
)


_GH_PREFIX = re.compile(rb"gh[pousr]_")
_GENERIC_KEYWORDS = (b"key", b"secret", b"token", b"password", b"passwd", b"pwd")
_NAME_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
_LOCAL_CHARS = _NAME_CHARS + b"%+"
_ALNUM = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _anchors(view: bytes, needles: tuple[bytes, ...], step: int = 1) -> list[int]:
    """Sorted positions of the needles; with step = len(needle), a long run yields one anchor per step."""
    out: list[int] = []
    for needle in needles:
        pos = view.find(needle)
        while pos >= 0:
            out.append(pos)
            pos = view.find(needle, pos + step)
    out.sort()
    return out


def _name_start(view: bytes, pos: int, chars: bytes, limit: int) -> int:
    """Walk left from pos over bytes in `chars`, at most `limit` of them."""
    start = pos
    while start > 0 and pos - start < limit and view[start - 1] in chars:
        start -= 1
    return start


def _windows(anchors: list[int], back: int, ahead: int, n: int) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for pos in anchors:
        lo, hi = max(0, pos - back), min(n, pos + ahead)
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _search(pattern: re.Pattern[str], text: str, windows: list[tuple[int, int]], margin: int) -> Iterator[re.Match]:
    """Matches that start inside a window; the search runs `margin` chars past it so a match is never cut."""
    n = len(text)
    for lo, hi in windows:
        end = min(n, hi + margin)
        for m in pattern.finditer(text, lo, end):
            if m.start() >= hi:
                break
            if m.end() == end < n:
                continue  # may continue past the search end: a truncated candidate
            yield m


class PiiScanner:
    """Find PII and secrets in a normalized text and apply the policy."""

    def __init__(
        self,
        policy: Mapping[str, str] | None = None,
        phone_region: str | None = "US",
        secret_min_entropy: float = 3.5,
    ) -> None:
        self.policy = resolve_policy(policy)
        self.phone_region = phone_region
        self.secret_min_entropy = secret_min_entropy

    def scan(self, text: str) -> list[Detection]:
        """All detections, non-overlapping, sorted by start."""
        if not text:
            return []
        view = text.encode("ascii", "replace")  # one byte per character: byte offsets = char offsets
        found: list[tuple[str, int, int]] = []
        found += self._private_keys(text)
        lowered = view.lower()
        found += self._aws(text, view, lowered)
        found += self._tokens(text, view)
        found += self._generic(text, view, lowered)
        digits = view.translate(_DIGIT_MAP)
        quads = _anchors(digits, (b"0000",), 4)  # every card and every formatted national phone has 4 digits in a row
        found += self._cards(text, quads)
        found += self._emails(text, view)
        found += self._ips(text, view, digits)
        found += self._phones(text, digits, quads)
        return self._resolve(found)

    def apply(self, text: str) -> tuple[str, list[Detection], str | None]:
        """(text with redact and drop spans replaced, detections, drop reason or None)."""
        detections = self.scan(text)
        reason = None
        if any(d.action == "drop" and d.kind in SECRET_KINDS for d in detections):
            reason = "contains_secret"
        elif any(d.action == "drop" for d in detections):
            reason = "contains_pii"
        # Drop spans are replaced too: a dropped document's text may be shown for review, never its secret.
        return redact(text, detections), detections, reason

    def _resolve(self, found: list[tuple[str, int, int]]) -> list[Detection]:
        rank = {kind: i for i, kind in enumerate(KINDS)}
        kept: list[tuple[str, int, int]] = []
        for kind, start, end in sorted(found, key=lambda f: (rank[f[0]], f[1])):
            if all(end <= s or start >= e for _, s, e in kept):
                kept.append((kind, start, end))
        kept.sort(key=lambda f: f[1])
        return [Detection(kind, start, end, self.policy[kind]) for kind, start, end in kept]

    # --- secrets -------------------------------------------------------------------------------

    def _private_keys(self, text: str) -> list[tuple[str, int, int]]:
        out = []
        pos = text.find("-----BEGIN ")
        while pos >= 0:
            m = _PEM_BEGIN.match(text, pos)
            nxt = pos + 11
            if m:
                label = f"-----END {m.group(1)}PRIVATE KEY{m.group(2) or ''}-----"
                end = text.find(label, m.end(), m.end() + 65536)
                if end >= 0 and len(_BASE64_CHARS.findall(text, m.end(), end)) >= 64:
                    out.append(("private_key", pos, end + len(label)))
                    nxt = end + len(label)
            pos = text.find("-----BEGIN ", nxt)
        return out

    def _aws(self, text: str, view: bytes, lowered: bytes) -> list[tuple[str, int, int]]:
        out = []
        for pos in _anchors(view, (b"AKIA", b"ASIA")):
            m = _AWS_ACCESS.match(text, pos)
            if m and "EXAMPLE" not in m.group():
                out.append(("aws_access_key", m.start(), m.end()))
        for m in _search(_AWS_SECRET, text, _windows(_anchors(lowered, (b"aws",)), 0, 80, len(text)), 60):
            value = m.group(1)
            if "EXAMPLE" not in value and shannon_entropy(value) >= self.secret_min_entropy:
                out.append(("aws_secret_key", m.start(1), m.end(1)))
        return out

    def _tokens(self, text: str, view: bytes) -> list[tuple[str, int, int]]:
        out = []
        # one C-level scan (the regex engine searches its literal prefix "gh"), rather than five scans for
        # ghp_ gho_ ghu_ ghs_ ghr_ or a Python check of every "gh" ("right", "though")
        anchors = [m.start() for m in _GH_PREFIX.finditer(view)]
        for pos in anchors + _anchors(view, (b"github_pat_",)):
            m = _GITHUB.match(text, pos)
            if m and shannon_entropy(m.group(1) or m.group(2)) >= 3.0:
                out.append(("github_token", m.start(), m.end()))
        for pos in _anchors(view, (b"xox", b"https://hooks.slack.com/services/")):
            m = _SLACK.match(text, pos)
            if m and shannon_entropy(m.group(1) or m.group(2)) >= 3.0:
                out.append(("slack_token", m.start(), m.end()))
        return out

    def _generic(self, text: str, view: bytes, lowered: bytes) -> list[tuple[str, int, int]]:
        out = []
        n = len(view)
        starts = set()
        for keyword in _GENERIC_KEYWORDS:
            pos = lowered.find(keyword)
            while pos >= 0:
                # Cheap gate before any regex: the name must end here and an assignment must follow.
                j = pos + len(keyword)
                if j < n and lowered[j] in b"\"']":
                    j += 1
                while j < n and lowered[j] in b" \t":
                    j += 1
                if j < n and lowered[j] in b":=":
                    starts.add(_name_start(lowered, pos, _NAME_CHARS, 40))
                pos = lowered.find(keyword, pos + 1)
        for start in sorted(starts):
            m = _GENERIC.match(text, start)
            if m is None:
                continue
            value, name = m.group("v"), m.group("name")
            if not m.group("q") and not (name.isupper() and m.group("op") == "=" and "." not in value):
                continue  # unquoted only in UPPER_CASE=value (env files); `key = obj.attr` is code
            if not (any(c.isdigit() for c in value) and any(c.isalpha() for c in value)):
                continue
            lowered_value = value.lower()
            if any(word in lowered_value for word in PLACEHOLDER_WORDS):
                continue
            if shannon_entropy(value) >= self.secret_min_entropy:
                out.append(("generic_secret", m.start("v"), m.end("v")))
        return out

    # --- PII -----------------------------------------------------------------------------------

    def _cards(self, text: str, quads: list[int]) -> list[tuple[str, int, int]]:
        out = []
        for m in _search(_CARD, text, _windows(quads, 20, 24, len(text)), 24):
            number = m.group().replace(" ", "").replace("-", "")
            if len(set(number)) > 1 and luhn_valid(number) and _issuer_known(number):
                out.append(("credit_card", m.start(), m.end()))
        return out

    def _emails(self, text: str, view: bytes) -> list[tuple[str, int, int]]:
        out = []
        end = -1
        for pos in _anchors(view, (b"@",)):
            if pos <= end or pos == 0 or view[pos - 1] not in _LOCAL_CHARS or view[pos + 1 : pos + 2] not in _ALNUM:
                continue  # "@decorator", "a @ b", or inside the previous match
            m = _EMAIL.match(text, _name_start(view, pos, _LOCAL_CHARS, 64))
            if m is None:
                continue
            end = m.end()
            domain = m.group(1).lower()
            tld = domain.rsplit(".", 1)[-1]
            if tld in DOCUMENTATION_TLDS or any(domain == d or domain.endswith("." + d) for d in DOCUMENTATION_DOMAINS):
                continue
            out.append(("email", m.start(), m.end()))
        return out

    def _ips(self, text: str, view: bytes, digits: bytes) -> list[tuple[str, int, int]]:
        out = []
        # An IPv4 address has three dots within 15 characters of its first "digit.digit".
        anchors = [p for p in _anchors(digits, (b"0.0",), 3) if digits.count(b".", max(0, p - 12), p + 14) >= 3]
        for m in _search(_IPV4, text, _windows(anchors, 12, 12, len(text)), 16):
            value = m.group()
            if all(len(part) == 1 for part in value.split(".")):
                continue  # 1.2.3.4 is far more often a version than a host
            if ipaddress.IPv4Address(value).is_global:
                out.append(("ip_address", m.start(), m.end()))
        hexed = view.translate(_HEX_MAP)
        anchors = [p for p in _anchors(hexed, (b"::", b"h:h"), 2) if view.count(b":", max(0, p - 40), p + 40) >= 2]
        for m in _search(_IPV6, text, _windows(anchors, 40, 40, len(text)), 40):
            value = m.group()
            if sum(1 for group in value.split(":") if group) < 3:
                continue
            try:
                address = ipaddress.IPv6Address(value)
            except ValueError:
                continue
            if address.is_global:
                out.append(("ip_address", m.start(), m.end()))
        return out

    def _phones(self, text: str, digits: bytes, quads: list[int]) -> list[tuple[str, int, int]]:
        out = []
        anchors = _anchors(digits, (b"+0",))
        if self.phone_region is not None:
            anchors = sorted(anchors + quads)
        for m in _search(_PHONE, text, _windows(anchors, 24, 24, len(text)), 24):
            value = m.group()
            n_digits = sum(c.isdigit() for c in value)
            if not 7 <= n_digits <= 15 or _DATE_LIKE.search(value):
                continue
            if "." in value and not (_US_DOTTED.fullmatch(value) or (value[0] == "+" and value.count(".") >= 2)):
                continue  # "+3.5" or "10.11.12": decimals, versions, addresses
            if value.startswith("+"):
                region = None
            else:
                separators = sum(value.count(c) for c in " -.(")
                if self.phone_region is None or separators < 2:
                    continue
                region = self.phone_region
            try:
                number = phonenumbers.parse(value, region)
            except phonenumbers.NumberParseException:
                continue
            if phonenumbers.is_valid_number(number):
                out.append(("phone", m.start(), m.end()))
        return out


def redact(text: str, detections: list[Detection]) -> str:
    """Replace the spans whose action is redact or drop with their placeholder."""
    parts: list[str] = []
    last = 0
    for d in detections:
        if d.action == "keep":
            continue
        parts.append(text[last : d.start])
        parts.append(PLACEHOLDERS[d.kind])
        last = d.end
    if not parts:
        return text
    parts.append(text[last:])
    return "".join(parts)
