"""PII and secret detectors, look-alikes, policy, and precision on a labelled set (corpus.filters.pii)."""

from __future__ import annotations

import dataclasses

import pytest

from corpus.config import FilterConfig
from corpus.filters import QualityFilter
from corpus.filters.pii import (
    DEFAULT_POLICY,
    Detection,
    PiiScanner,
    luhn_valid,
    redact,
    resolve_policy,
    shannon_entropy,
)

PEM_BODY = "\n".join(
    [
        "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgVcB5Z2Qm7p1Y8kq3",
        "Hq7yWv0dUu0rC4XGmQ4nL2dXhQGhRANCAAR1mQ0cKj8wOq8v6o3fTt2b0Vr7Wm5J",
        "Zp2oQk1dYgLr4Hq9sTn5Xc3Vb6Mf8Kp0Lr2Qw4Es6Tz8Ua1Yb3Cd5Ef7Gh9Ij0Kl",
    ]
)
PEM = f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\n-----END PRIVATE KEY-----"
GITHUB = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
SLACK = "xoxb-2048217931-1739183204185-Q8hT3kLm9ZpW2xV7cR4nB6yJ"
AWS_ID = "AKIAZ7Q2MOCKK3Y4B5N6"
AWS_SECRET = "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"

# (text, [(kind, exact substring that must be the detected span)])
POSITIVES: list[tuple[str, list[tuple[str, str]]]] = [
    ("Contact jane.doe@acme-corp.com for details.", [("email", "jane.doe@acme-corp.com")]),
    ("Reply to <j_smith+news@mail.co.uk>, thanks", [("email", "j_smith+news@mail.co.uk")]),
    ("Call +44 20 7946 0958 tomorrow.", [("phone", "+44 20 7946 0958")]),
    ("Office: (415) 555-2671.", [("phone", "(415) 555-2671")]),
    ("tel:+31641044153", [("phone", "+31641044153")]),
    ("Server at 93.184.216.34 responded", [("ip_address", "93.184.216.34")]),
    ("resolver 2606:4700:4700::1111 is up", [("ip_address", "2606:4700:4700::1111")]),
    ("card 4111 1111 1111 1111 exp 12/30", [("credit_card", "4111 1111 1111 1111")]),
    ("Amex 3782 822463 10005 on file", [("credit_card", "3782 822463 10005")]),
    ("mc=5555555555554444;", [("credit_card", "5555555555554444")]),
    (f"key file:\n{PEM}\n", [("private_key", PEM)]),
    (f"aws_access_key_id = {AWS_ID}", [("aws_access_key", AWS_ID)]),
    (f'AWS_SECRET_ACCESS_KEY="{AWS_SECRET}"', [("aws_secret_key", AWS_SECRET)]),
    (f"export GH_TOKEN={GITHUB}", [("github_token", GITHUB)]),
    (f"slack = '{SLACK}'", [("slack_token", SLACK)]),
    ('api_key = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"', [("generic_secret", "sk_live_4eC39HqLyjWDarjtT1zdp7dc")]),
    ("{'password': 'Tr0ub4dor&3xY9!qZ'}", [("generic_secret", "Tr0ub4dor&3xY9!qZ")]),
    ("DATABASE_PASSWORD=h7Kp2mQ9xR4vT8wZ\n", [("generic_secret", "h7Kp2mQ9xR4vT8wZ")]),
    (
        "Mail ops@corp.io or call +1-201-555-0123 from 8.8.4.40",
        [("email", "ops@corp.io"), ("phone", "+1-201-555-0123"), ("ip_address", "8.8.4.40")],
    ),
]

# Look-alikes: none of these may fire.
NEGATIVES = [
    "Luhn-invalid 4111 1111 1111 1112 is not a card",
    "order 1234567890123456 shipped",
    "hash values [-678966196, 573763426263223372, -8204893]",
    "sha256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'",
    "cache_key = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'",
    "fixed in commit da39a3ee5e6b4b0d3255bfef95601890afd80709 last week",
    '"""Example:\n\n    >>> send(to="user@example.com", cc="ops@mail.example.org")\n"""',
    "admin@localhost and bob@host.test and eve@foo.invalid",
    "requires version 1.2.3.4 or python 3.11.7; pi is 3.14159",
    "private 192.168.1.10, 10.0.0.1, loopback 127.0.0.1, docs 203.0.113.5 and 2001:db8::1",
    "x[1::2] and std::vector<int> at 12:30:45",
    "from 1999-2003 to 2023-01-15, at Unix time 1700000000",
    "ISBN 978-3-16-148410-0 and +3.5 points",
    "AWS docs: AKIAIOSFODNN7EXAMPLE / aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "token = 'ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'",
    'api_key = "YOUR_API_KEY_HERE_1234567"',
    'token = os.environ["GITHUB_TOKEN"]',
    "secret = settings.SECRET_KEY_FROM_ENVIRONMENT1",
    "password = 'correct horse battery staple'",
    f"-----BEGIN PUBLIC KEY-----\n{PEM_BODY}\n-----END PUBLIC KEY-----",
    "The file must start with -----BEGIN RSA PRIVATE KEY----- and end with its END line.",
    "@property\ndef area(self):\n    return a @ b",
    "phone 020 7946 0958 is national without a + (default region US)",
    "see mac 00:1a:2b:3c:4d:5e and uuid 123e4567-e89b-12d3-a456-426614174000",
]


def spans(text: str, scanner: PiiScanner | None = None) -> list[tuple[str, str]]:
    return [(d.kind, text[d.start : d.end]) for d in (scanner or PiiScanner()).scan(text)]


@pytest.mark.parametrize(("text", "expected"), POSITIVES)
def test_positives(text: str, expected: list[tuple[str, str]]) -> None:
    assert spans(text) == expected


@pytest.mark.parametrize("text", NEGATIVES)
def test_look_alikes_do_not_fire(text: str) -> None:
    assert spans(text) == []


def test_precision_and_recall_on_the_labelled_set() -> None:
    scanner = PiiScanner()
    true_positive = false_positive = expected_total = 0
    for text, expected in [*POSITIVES, *((t, []) for t in NEGATIVES)]:
        found = spans(text, scanner)
        expected_total += len(expected)
        true_positive += sum(1 for f in found if f in expected)
        false_positive += sum(1 for f in found if f not in expected)
    assert (true_positive, false_positive, expected_total) == (21, 0, 21)
    precision = true_positive / (true_positive + false_positive)
    recall = true_positive / expected_total
    assert (precision, recall) == (1.0, 1.0)


def test_offsets_refer_to_the_normalized_text_and_hold_no_value() -> None:
    raw = "caf\u00c3\u00a9 owner: ann@corp.io\r\n"  # mojibake and CRLF change the text before the scan
    decision = QualityFilter("code").apply(raw + "x = 1\n" * 5)
    (detection,) = decision.detections
    normalized = "café owner: ann@corp.io\n" + "x = 1\n" * 5
    assert normalized[detection.start : detection.end] == "ann@corp.io"
    assert decision.text == normalized.replace("ann@corp.io", "<EMAIL>")
    assert [f.name for f in dataclasses.fields(Detection)] == ["kind", "start", "end", "action"]
    assert detection.to_dict() == {"kind": "email", "start": 12, "end": 23, "action": "redact"}


def test_default_policy_redacts_pii_and_drops_secrets() -> None:
    assert DEFAULT_POLICY["email"] == "redact" and DEFAULT_POLICY["private_key"] == "drop"
    text, detections, reason = PiiScanner().apply("ip 93.184.216.34, card 4111-1111-1111-1111, +1-201-555-0123")
    assert text == "ip <IP_ADDRESS>, card <CREDIT_CARD>, <PHONE>"
    assert reason is None and [d.action for d in detections] == ["redact"] * 3
    text, detections, reason = PiiScanner().apply(f"mail a@corp.io token {GITHUB}")
    assert reason == "contains_secret"
    assert text == "mail <EMAIL> token <SECRET>"  # the secret never survives, even in a dropped document
    assert [(d.kind, d.action) for d in detections] == [("email", "redact"), ("github_token", "drop")]


def test_policy_overrides() -> None:
    text = f"mail a@corp.io token {GITHUB}"
    redacted, _, reason = PiiScanner({"secrets": "redact"}).apply(text)
    assert (redacted, reason) == ("mail <EMAIL> token <SECRET>", None)
    kept, detections, reason = PiiScanner({"email": "keep", "secrets": "keep"}).apply(text)
    assert (kept, reason) == (text, None)
    assert [d.action for d in detections] == ["keep", "keep"]
    _, _, reason = PiiScanner({"pii": "drop", "secrets": "keep"}).apply(text)
    assert reason == "contains_pii"
    assert resolve_policy({"pii": "keep", "phone": "drop"})["phone"] == "drop"  # a kind wins over its group
    with pytest.raises(ValueError, match=r"pii policy: email: action must be one of"):
        resolve_policy({"email": "erase"})
    with pytest.raises(ValueError, match=r"pii policy: unknown kind 'ssn'"):
        resolve_policy({"ssn": "drop"})


def test_quality_filter_applies_the_policy() -> None:
    body = "def handler(event):\n    return event\n" * 3
    secret_doc = body + f'AWS_SECRET_ACCESS_KEY = "{AWS_SECRET}"\n'
    decision = QualityFilter("code").apply(secret_doc)
    assert (decision.kept, decision.reason, decision.quality) == (False, "contains_secret", 0.0)
    assert AWS_SECRET not in decision.text
    relaxed = QualityFilter("code", FilterConfig(pii={"secrets": "redact"})).apply(secret_doc)
    assert relaxed.kept and relaxed.text.endswith('AWS_SECRET_ACCESS_KEY = "<SECRET>"\n')
    override = QualityFilter("code", pii_policy={"aws_secret_key": "keep"}).apply(secret_doc)
    assert override.kept and override.text == secret_doc


def test_phone_region_none_needs_a_plus() -> None:
    scanner = PiiScanner(phone_region=None)
    assert spans("Office: (415) 555-2671.", scanner) == []
    assert spans("Call +44 20 7946 0958", scanner) == [("phone", "+44 20 7946 0958")]


def test_helpers() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert shannon_entropy("aaaa") == 0.0 and shannon_entropy("abcd") == 2.0
    assert redact("a b c", [Detection("email", 2, 3, "redact")]) == "a <EMAIL> c"
    assert redact("a b c", [Detection("email", 2, 3, "keep")]) == "a b c"


def test_overlaps_keep_the_more_specific_kind() -> None:
    text = f"aws_secret_access_key = '{AWS_SECRET}'"  # also a generic secret assignment
    assert spans(text) == [("aws_secret_key", AWS_SECRET)]


def test_long_inputs_scan_in_bounded_time() -> None:
    # Anchor windows keep every regex local: no quadratic backtracking on long runs.
    for text in ("a" * 200_000 + "@", "1" * 200_000, "key=" * 50_000, "::" * 100_000, "0.0." * 50_000):
        assert PiiScanner().scan(text) == []
