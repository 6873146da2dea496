"""Quality rules, profiles, normalization, language ID and bad input (corpus.filters)."""

from __future__ import annotations

import dataclasses
import json
import sysconfig
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from shared_data import shared_text

from corpus.config import FilterConfig
from corpus.filters import (
    NORMALIZATION_CODES,
    PROFILE_DEFAULTS,
    REASON_CODES,
    Decision,
    Doc,
    QualityFilter,
    Thresholds,
    build_rules,
    normalize,
    resolve_thresholds,
)
from corpus.filters.language import LanguageIdentifier, sample
from corpus.filters.rules import RULE_REASONS, hash_words

PROSE = (
    "The river ran slowly through the valley, and the people of the town came down to watch the boats. "
    "They had waited all winter for the ice to break, and now that the water was moving again they "
    "wanted to see which of the old captains would be the first to leave the harbour with a full load "
    "of timber. Nobody expected the young woman from the mill to be standing at the wheel of the "
    "largest boat, but she had bought it in the autumn with the money her father left her."
)

MIT = """MIT License

Copyright (c) 2024 The Example Authors

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

GERMAN = (
    "Der Fluss floss langsam durch das Tal, und die Leute aus der Stadt kamen herunter, um die Boote zu "
    "sehen. Sie hatten den ganzen Winter darauf gewartet, dass das Eis bricht, und jetzt, da das Wasser "
    "sich wieder bewegte, wollten sie sehen, welcher der alten Kapitäne als erster mit einer vollen Ladung "
    "Holz den Hafen verlassen würde. Niemand hatte erwartet, dass die junge Frau aus der Mühle am Steuer "
    "des größten Bootes stehen würde."
)


ENGLISH_TAIL = (
    "think that the story ends there, but the town remembers the spring when the mill burned down and "
    "the whole valley was covered with smoke for three days, and nobody could see the hills."
)


def check(text: str, **thresholds: object) -> str | None:
    """Run only the rules of the given thresholds on text; the first failing reason."""
    doc = Doc(text)
    for rule in build_rules(Thresholds(**thresholds)):
        reason = rule.check(doc)
        if reason is not None:
            return reason
    return None


def features(text: str, **thresholds: object) -> dict[str, float]:
    doc = Doc(text)
    for rule in build_rules(Thresholds(**thresholds)):
        rule.check(doc)
    return doc.features


# --- each rule: one document that passes, one that fails, exact reason -----------------------------


def test_char_and_word_counts() -> None:
    assert check("abcdef", min_chars=5, max_chars=10) is None
    assert check("abcd", min_chars=5) == "too_short"
    assert check("a" * 11, max_chars=10) == "too_long"
    assert check("one two three", min_words=3, max_words=3) is None
    assert check("one two", min_words=3) == "too_short"
    assert check("one two three four", max_words=3) == "too_long"
    assert features("one  two\tthree\nfour", min_words=1)["n_words"] == 4


def test_control_chars_binary_content() -> None:
    doc = Doc("x" * 98, bad_chars=2, raw_chars=100)
    (rule,) = build_rules(Thresholds(max_control_fraction=0.01))
    assert rule.check(doc) == "binary_content"
    assert doc.features["control_fraction"] == 0.02
    assert rule.check(Doc("x" * 99, bad_chars=1, raw_chars=100)) is None


def test_line_length_rules() -> None:
    assert check("short\nlines\n", max_line_length=10) is None
    assert check("short\n" + "x" * 11, max_line_length=10) == "line_too_long"
    assert check("ab\ncd\nef", max_mean_line_length=2) is None
    assert check("abc\ncd", max_mean_line_length=2) == "mean_line_too_long"
    assert features("abc\ncd\n", max_mean_line_length=10)["mean_line_length"] == 2.5


def test_alnum_fraction() -> None:
    assert check("abc def", min_alnum_fraction=0.25) is None
    assert check("{}[]()<>;;a", min_alnum_fraction=0.25) == "low_alnum_fraction"
    assert features("ab;;", min_alnum_fraction=0.1)["alnum_fraction"] == 0.5
    assert features("é;", min_alnum_fraction=0.1)["alnum_fraction"] == 0.5  # non-ASCII letters count


def test_encoded_data() -> None:
    blob = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3ODk="
    assert check(f"data = '{blob}'\n" + "x = 1\n" * 30, max_encoded_data_fraction=0.5) is None
    assert check(f"data = '{blob}'\n", max_encoded_data_fraction=0.5) == "encoded_data"
    assert features(f"a {blob} b", max_encoded_data_fraction=1.0)["encoded_data_fraction"] == len(blob) / (
        len(blob) + 4
    )
    assert features("word " * 40, max_encoded_data_fraction=1.0)["encoded_data_fraction"] == 0.0


def test_mean_word_length() -> None:
    assert check("word " * 10, min_mean_word_length=3, max_mean_word_length=10) is None
    assert check("a b c d", min_mean_word_length=3) == "short_mean_word_length"
    assert check("incomprehensibilities " * 3, max_mean_word_length=10) == "long_mean_word_length"
    assert features("ab abcd", min_mean_word_length=1)["mean_word_length"] == 3.0


def test_symbol_ratio() -> None:
    assert check("one two three four five six seven eight nine #ten", max_symbol_word_ratio=0.1) is None
    assert check("#one #two three", max_symbol_word_ratio=0.1) == "too_many_symbols"
    assert check("wait... what… really", max_symbol_word_ratio=0.1) == "too_many_symbols"
    got = features("a b c d # e f g h i ...", max_symbol_word_ratio=1.0)
    assert (got["hash_word_ratio"], got["ellipsis_word_ratio"]) == (1 / 11, 1 / 11)


def test_ellipsis_and_bullet_lines() -> None:
    assert check("first line\nsecond line...\nthird\nfourth", max_ellipsis_line_fraction=0.3) is None
    assert check("it went on...\nand on…\nthe end", max_ellipsis_line_fraction=0.3) == "too_many_ellipsis_lines"
    assert check("- one\n- two\nplain text\n\n", max_bullet_line_fraction=0.9) is None
    assert check("- one\n* two\n  • three\n", max_bullet_line_fraction=0.9) == "too_many_bullet_lines"
    assert features("- a\n\n\nb\n", max_bullet_line_fraction=1.0)["bullet_line_fraction"] == 0.5  # blank lines skipped


def test_alpha_words() -> None:
    assert check("one two three four 5", min_alpha_word_fraction=0.8) is None
    assert check("one 2 3 4 five", min_alpha_word_fraction=0.8) == "too_few_alpha_words"
    assert features("x1 22 — café", min_alpha_word_fraction=0.1)["alpha_word_fraction"] == 0.5
    assert features("привет 123 мир", min_alpha_word_fraction=0.1)["alpha_word_fraction"] == 2 / 3


def test_stop_words() -> None:
    assert check("the cat and the dog", min_stop_words=2) is None
    assert check("The cat, the dog.", min_stop_words=2) is None  # case and trailing punctuation
    assert check("cat dog bird the", min_stop_words=2) == "too_few_stop_words"
    assert features("to be or not to be, that is", min_stop_words=1)["stop_words"] == 5
    doc = Doc("Hund Katze Vogel")
    doc.language = "de"  # another accepted language is not judged by the English list
    assert build_rules(Thresholds(min_stop_words=2))[0].check(doc) is None


def test_duplicate_lines_and_paragraphs() -> None:
    text = "alpha\nbeta\nalpha\ngamma\n"
    got = features(text, max_dup_line_fraction=1.0, max_dup_line_char_fraction=1.0)
    assert got["dup_line_fraction"] == 0.25
    assert got["dup_line_char_fraction"] == 5 / len(text)
    assert check(text, max_dup_line_fraction=0.3) is None
    assert check(text, max_dup_line_fraction=0.2) == "dup_line_fraction"
    assert check(text, max_dup_line_char_fraction=0.2) == "dup_line_char_fraction"
    paragraphs = "first para\nline two\n\nsecond\n\nfirst para\nline two\n  \nthird"
    got = features(paragraphs, max_dup_para_fraction=1.0, max_dup_para_char_fraction=1.0)
    assert got["dup_para_fraction"] == 0.25
    assert got["dup_para_char_fraction"] == len("first para\nline two") / len(paragraphs)
    assert check(paragraphs, max_dup_para_fraction=0.2) == "dup_para_fraction"
    assert check(paragraphs, max_dup_para_char_fraction=0.3) == "dup_para_char_fraction"


def _top_ngram_reference(words: list[str], n: int, n_chars: int) -> float:
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    top = max(grams.values())
    return max(sum(map(len, g)) for g, k in grams.items() if k == top) * top / n_chars


def _dup_ngram_reference(words: list[str], n: int, n_chars: int) -> float:
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if gram in seen:
            covered[i : i + n] = [True] * n
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / n_chars


def test_ngram_features_match_a_plain_python_reference() -> None:
    rng = np.random.default_rng(7)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "ünïcode", "x"]
    for trial in range(20):
        words = [vocab[i] for i in rng.integers(0, 4 if trial % 2 else len(vocab), size=int(rng.integers(10, 300)))]
        text = " ".join(words)
        got = features(
            text,
            max_top_ngram_char_fraction={2: 1.0, 3: 1.0, 4: 1.0},
            max_dup_ngram_char_fraction={5: 1.0, 6: 0.0, 7: 1.0, 8: 1.0, 9: 1.0, 10: 1.0},
        )
        for n in (2, 3, 4):
            assert got[f"top_{n}_gram_char_fraction"] == pytest.approx(_top_ngram_reference(words, n, len(text)))
        for n in (5, 6):  # a 0.0 limit at n = 6 stops there when 6-grams repeat
            if f"dup_{n}_gram_char_fraction" in got:
                assert got[f"dup_{n}_gram_char_fraction"] == pytest.approx(_dup_ngram_reference(words, n, len(text)))


def test_repetition_rules_reason_codes() -> None:
    looping = "buy cheap watches now " * 30
    assert check(looping, max_top_ngram_char_fraction={2: 0.2}) == "top_2_gram"
    assert check(looping, max_dup_ngram_char_fraction={5: 0.15, 6: 0.14}) == "duplicated_5_grams"
    assert check(PROSE, max_top_ngram_char_fraction={2: 0.2, 3: 0.18, 4: 0.16}) is None
    got = features(PROSE, max_dup_ngram_char_fraction={5: 0.15, 6: 0.14, 10: 0.10})
    # No 5-gram repeats in PROSE, so 6 and 10 (bounded by it) are not computed.
    assert got["dup_5_gram_char_fraction"] == 0.0
    assert "dup_6_gram_char_fraction" not in got and "dup_10_gram_char_fraction" not in got


def test_word_hashes_are_content_hashes() -> None:
    hashes, starts, ends = hash_words(b"ab  cd\tab\n")
    assert starts.tolist() == [0, 4, 7] and ends.tolist() == [2, 6, 9]
    assert hashes[0] == hashes[2] != hashes[1]
    assert hash_words(b"ab")[0][0] == hashes[0]  # independent of position
    long_doc, _, _ = hash_words(b"x " * 200_000 + b"ab")  # > 2**18 bytes: power tables built per call
    assert long_doc[-1] == hashes[0] and long_doc[0] == hash_words(b"x")[0][0]


# --- profiles on real text --------------------------------------------------------------------


def test_tinyshakespeare_passes_as_prose() -> None:
    lines = shared_text("data/tinyshakespeare.txt").split("\n")
    docs = ["\n".join(lines[i : i + 40]) for i in range(0, 8000, 40)]
    decisions = QualityFilter("prose").apply_batch(docs)
    reasons = Counter(d.reason for d in decisions)
    assert reasons[None] >= 190, reasons  # speaker names repeat: a few 40-line blocks hit dup_line_fraction
    assert set(reasons) <= {None, "dup_line_fraction", "dup_line_char_fraction", "dup_para_fraction"}
    kept = [d for d in decisions if d.kept]
    assert all(d.language == "en" and d.language_confidence > 0.9 for d in kept)
    assert all(0.0 < d.quality <= 1.0 for d in kept)


def test_stdlib_file_passes_code_profile() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "textwrap.py").read_text(encoding="utf-8")
    decision = QualityFilter("code").apply(text)
    assert decision.kept and decision.reason is None
    assert decision.language is None  # the code profile skips language identification
    assert set(decision.features) == {
        "n_chars",
        "control_fraction",
        "max_line_length",
        "mean_line_length",
        "alnum_fraction",
        "encoded_data_fraction",
    }
    minified = "var a=function(){return 1};" * 400
    assert QualityFilter("code").apply(minified).reason == "line_too_long"


def test_mit_license_passes_legal_not_prose_limits() -> None:
    decision = QualityFilter("legal").apply(MIT)
    assert decision.kept, decision.reason
    assert decision.language == "en"
    bundled = MIT + "\n\n" + MIT.replace("2024", "2025")  # a file bundling the same license twice
    assert QualityFilter("legal").apply(bundled).kept
    assert QualityFilter("prose").apply(bundled).reason == "dup_line_fraction"


def test_profile_defaults_and_custom_profiles() -> None:
    assert set(PROFILE_DEFAULTS) == {"prose", "code", "legal"}
    assert resolve_thresholds("prose").min_words == 50
    assert resolve_thresholds("code").min_stop_words is None
    assert resolve_thresholds("legal").max_dup_line_fraction == 0.6
    config = FilterConfig(min_words=30, profiles={"forum": {"min_words": 5, "max_dup_line_fraction": None}})
    forum = resolve_thresholds("forum", config)
    assert forum.min_words == 5  # per-profile wins over the top level
    assert forum.max_dup_line_fraction is None  # null disables
    assert forum.max_dup_para_fraction == PROFILE_DEFAULTS["prose"].max_dup_para_fraction
    assert resolve_thresholds("prose", config).min_words == 30
    assert resolve_thresholds("anything", None) == PROFILE_DEFAULTS["prose"]
    with pytest.raises(ValueError, match=r"min_words \(60\) must be <= max_words \(40\)"):
        resolve_thresholds("prose", FilterConfig(profiles={"prose": {"min_words": 60, "max_words": 40}}))


def test_filter_config_validation_names_field_and_value() -> None:
    cases = [
        ({"min_words": -1}, r"filters\.min_words must be an integer >= 0, got -1"),
        ({"max_dup_line_fraction": 1.5}, r"filters\.max_dup_line_fraction must be in \[0, 1\], got 1\.5"),
        ({"max_top_ngram_char_fraction": {7: 0.1}}, r"n must be in \[2, 4\], got 7"),
        (
            {"profiles": {"forum": {"min_wordz": 1}}},
            r"filters\.profiles\.forum: unknown threshold\(s\) \['min_wordz'\]",
        ),
        ({"pii": {"email": "shred"}}, r"filters\.pii\.email must be one of \['redact', 'drop', 'keep'\], got 'shred'"),
        ({"pii": {"passport": "drop"}}, r"filters\.pii: unknown kind 'passport'"),
        ({"lid_languages": ["english"]}, r"filters\.lid_languages must be ISO 639-1 codes"),
        ({"lid_fast_sample_chars": 10}, r"filters\.lid_fast_sample_chars must be an integer >= 50 or null, got 10"),
        ({"lid_decisive_confidence": 0.5}, r"filters\.lid_decisive_confidence must be in \(0\.5, 1\], got 0\.5"),
        ({"max_mean_word_length": 0}, r"filters\.max_mean_word_length must be > 0, got 0"),
        ({"min_stop_words": True}, r"filters\.min_stop_words must be a number, got True"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            FilterConfig(**kwargs)
    assert FilterConfig(max_top_ngram_char_fraction={"2": 0.3}).max_top_ngram_char_fraction == {2: 0.3}


def test_reason_codes_cover_every_rule() -> None:
    from corpus.filters.quality import LanguageRule
    from corpus.filters.rules import CharCount

    everything = Thresholds(**{**dataclasses.asdict(PROFILE_DEFAULTS["prose"]), **PROFILE_DEFAULTS["code"].to_dict()})
    rules = [*build_rules(everything), LanguageRule]
    emitted = {reason for rule in rules for reason in rule.reasons}
    assert emitted <= set(REASON_CODES)
    assert set(RULE_REASONS) <= set(REASON_CODES)
    assert {"empty_document", "wrong_language", "contains_secret", "contains_pii", "perplexity_too_high"} <= set(
        REASON_CODES
    )
    assert all(code.islower() and " " not in code for code in REASON_CODES)
    assert CharCount.reasons == ("too_short", "too_long")


# --- normalization ------------------------------------------------------------------------------


def test_normalization_records_what_changed() -> None:
    assert normalize("plain text").changes == []
    assert normalize("curly “quotes” … and ligature ﬁ stay").changes == []
    assert normalize("a\r\nb\rc").text == "a\nb\nc"
    mojibake = "The café’s menu".encode().decode("cp1252")
    fixed = normalize(mojibake)
    assert (fixed.text, fixed.changes) == ("The café’s menu", ["mojibake_fixed"])
    decomposed = normalize("cafe\u0301")
    assert (decomposed.text, decomposed.changes) == ("café", ["nfc"])
    controls = normalize("a\x00b\x07c\td\fe\x1b[31mred\x1b[0m")
    assert controls.text == "abc\td\fered"
    assert controls.changes == ["terminal_escapes_removed", "control_chars_removed"]
    assert controls.bad_chars == 4  # NUL, BEL and two ESC
    assert normalize("x\ufffdy").bad_chars == 1
    surrogates = normalize("pair \ud83d\ude00 lone \ud800 end")
    assert (surrogates.text, surrogates.changes) == ("pair 😀 lone \ufffd end", ["surrogates_fixed"])
    surrogates.text.encode("utf-8")  # what goes downstream is always valid UTF-8
    assert set(fixed.changes) | set(controls.changes) <= set(NORMALIZATION_CODES)


def test_ftfy_prefilter_never_skips_a_change() -> None:
    """normalize skips ftfy's per-line pass only where that pass would change nothing."""
    from corpus.filters.normalize import _fix_lines, _may_need_ftfy

    rng = np.random.default_rng(0)
    pool = list("ab .\n") + list("’“”—–…éüßÃÂŒœ©°±×²\x85\x9d\u206b\ufeff\ufffdВГРСβ€āЂ√≈‚Ä") + ["e\u0301"]
    texts = ["".join(rng.choice(pool, size=int(rng.integers(1, 40)))) for _ in range(5000)]
    texts += ["The café’s menu".encode().decode("cp1252"), "“Quoted” — text’s fine", "Â foo", "x\ud800y"]
    for text in texts:
        if not _may_need_ftfy(text):
            assert _fix_lines(text) == (text, []), repr(text)
    assert not _may_need_ftfy("“Quoted” — text’s fine, naïve café")
    assert _may_need_ftfy("The café’s menu".encode().decode("cp1252"))


def test_alpha_words_counts_unicode_letters() -> None:
    doc = Doc("über — “ 123 naïve Ωmega ½ ok")  # words: über, —, “, 123, naïve, Ωmega, ½, ok
    rule = next(r for r in build_rules(PROFILE_DEFAULTS["prose"]) if r.name == "alpha_words")
    rule.check(doc)
    assert doc.features["alpha_word_fraction"] == 5 / 8  # ½ is \w but not \d: a "letter" to [^\W\d_]


def test_repeated_ngram_positions_match_a_stable_sort() -> None:
    from corpus.filters.rules import _member, _repeats

    rng = np.random.default_rng(1)
    for size in (1, 2, 50, 3000):
        keys = rng.integers(0, 40, size).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        perm = np.argsort(keys, kind="stable")
        ordered = keys[perm]
        expected = np.sort(perm[1:][ordered[1:] == ordered[:-1]])
        assert np.array_equal(np.sort(_repeats(keys)), expected)
        values = np.unique(keys[: max(1, size // 3)])
        assert np.array_equal(_member(keys, values), np.isin(keys, values))
    assert _repeats(np.arange(10, dtype=np.uint64)).size == 0


# --- language ----------------------------------------------------------------------------------


def test_language_identification() -> None:
    english = QualityFilter("prose").apply(PROSE)
    assert english.kept and english.language == "en" and english.language_confidence > 0.99
    german = QualityFilter("prose").apply(GERMAN)
    assert (german.kept, german.reason, german.language) == (False, "wrong_language", "de")
    accepted = QualityFilter("prose", languages=["de", "en"]).apply(GERMAN)
    assert accepted.kept and accepted.language == "de"
    with pytest.raises(ValueError, match=r"languages: 'xx' is not an ISO 639-1 code that lingua supports"):
        QualityFilter("prose", languages=["xx"])
    identifier = LanguageIdentifier(["en"])
    assert "en" in identifier.candidates and len(identifier.candidates) == 20
    assert identifier.identify("12345 67890 !!!").language is None


def test_language_fast_look_and_escalation() -> None:
    """A decisive answer on the 200-character sample stands; an undecided one is read again on 400."""
    fast = LanguageIdentifier(["en"])
    full = LanguageIdentifier(["en"], fast_chars=None)
    assert (fast.fast_chars, full.fast_chars) == (200, None)
    assert fast.identify(PROSE).accepted >= 0.95 and full.identify(PROSE).accepted >= 0.95
    assert fast.identify(GERMAN).language == full.identify(GERMAN).language == "de"
    # Start and middle of the fast sample in German, the full sample's extra text in English: the fast
    # look is sure it is not English, and it stands.
    half = 100
    mixed = GERMAN[:half] + " " + PROSE[: 2 * half] + GERMAN[:half] + " " + PROSE
    guess = fast.identify(mixed)
    assert guess == fast.identify_batch([mixed])[0]
    # No letters in the fast sample says nothing: read again on the full one.
    digits_first = "1234 5678 " * 12 + PROSE
    assert fast.identify(digits_first) == full.identify(digits_first)
    # With the threshold at 1.0 a fast answer stands only when it is certain; every other one is the full one.
    never_sure = LanguageIdentifier(["en"], decisive=1.0)
    texts = [PROSE, GERMAN, mixed, digits_first, "short text", GERMAN[:150] + " " + PROSE]
    for text, got in zip(texts, never_sure.identify_batch(texts), strict=True):
        assert got == never_sure.identify(text)
        if got.accepted not in (0.0, 1.0):
            assert got == full.identify(text)
    assert fast.identify_batch(texts) == [fast.identify(t) for t in texts]
    with pytest.raises(ValueError, match=r"lid_decisive_confidence must be in \(0.5, 1\], got 0.4"):
        LanguageIdentifier(["en"], decisive=0.4)


def test_language_fast_look_leaves_out_non_ascii_languages_for_ascii_samples() -> None:
    identifier = LanguageIdentifier(["en"])
    polish = "Zażółć gęślą jaźń, powiedział stary rybak i wrócił do łodzi, bo wiatr się wzmagał. " * 6
    assert identifier.identify(polish).language == "pl"  # a non-ASCII sample: every candidate
    assert identifier.identify_batch([polish, PROSE])[0].language == "pl"
    assert "pl" in LanguageIdentifier(["pl"]).candidates


def test_language_fast_look_keeps_decisions_on_mixed_lengths() -> None:
    # Not 50/50 mixtures: there the verdict depends on which characters a sample holds, and a 200- and a
    # 400-character sample may disagree (both are then a guess; a mixed document is what escalation cannot fix).
    docs = [PROSE, GERMAN, PROSE * 3 + " " + GERMAN[:120], GERMAN * 3 + " " + PROSE[:120], PROSE[:180], GERMAN * 3]
    fast, full = QualityFilter("prose"), QualityFilter("prose", FilterConfig(lid_fast_sample_chars=None))
    for a, b in zip(fast.apply_batch(docs), full.apply_batch(docs), strict=True):
        assert (a.kept, a.reason, a.language) == (b.kept, b.reason, b.language)


def test_language_sample_is_bounded() -> None:
    text = "word " * 10_000
    assert len(sample(text, 400)) <= 401
    assert sample("short", 400) == "short"


# --- bad input ---------------------------------------------------------------------------------


def test_empty_and_whitespace_documents() -> None:
    qf = QualityFilter("prose")
    for text in ("", "   \n\t  "):
        decision = qf.apply(text)
        assert (decision.kept, decision.reason, decision.quality) == (False, "empty_document", 0.0)
    assert qf.apply("\x00\x01\x02").reason == "binary_content"
    with pytest.raises(ValueError, match="text must be a str, got bytes"):
        qf.apply(b"bytes")  # type: ignore[arg-type]


def test_single_50_mb_line() -> None:
    line = "x" * 50_000_000
    start = time.process_time()
    decision = QualityFilter("prose").apply(line)
    assert (decision.kept, decision.reason) == (False, "too_long")
    assert decision.text is line  # refused before normalization: no copy
    no_cap = FilterConfig(profiles={"code": {"max_chars": None}})
    assert QualityFilter("code", no_cap).apply(line).reason == "line_too_long"
    assert time.process_time() - start < 60  # a guard against a quadratic scan, not a benchmark


def test_binary_looking_content() -> None:
    binary = bytes(range(256)).decode("latin-1") * 40
    for profile in ("prose", "code", "legal"):
        assert QualityFilter(profile).apply(binary).reason == "binary_content"
    replaced = (b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)) * 20).decode("utf-8", "replace")
    assert QualityFilter("code").apply(replaced).reason == "binary_content"


def test_mixed_encodings_are_repaired_and_kept() -> None:
    mojibake = PROSE.replace("harbour", "café’s harbour").encode().decode("cp1252")
    mixed = mojibake + "\n\n" + "A naïve reader would " + ENGLISH_TAIL  # one bad paragraph, one good
    decision = QualityFilter("prose").apply(mixed)
    assert decision.kept, decision.reason
    assert decision.normalized == ["mojibake_fixed"]
    assert "café’s harbour" in decision.text and "naïve reader" in decision.text


# --- the Decision API ----------------------------------------------------------------------------


def test_apply_batch_equals_apply() -> None:
    docs = [PROSE, GERMAN, "", "too short", PROSE.replace("river", "river, write to ann.lee@mail.org,")]
    qf = QualityFilter("prose")
    for batched, single in zip(qf.apply_batch(docs), [qf.apply(d) for d in docs], strict=True):
        assert batched.features == pytest.approx(single.features)  # lingua's thread pool: last-bit differences
        assert dataclasses.replace(batched, features={}) == dataclasses.replace(single, features={})


def test_settings_describe_the_filter() -> None:
    settings = QualityFilter("legal", languages=["en", "de"]).settings()
    assert settings["profile"] == "legal"
    assert settings["thresholds"]["max_dup_line_fraction"] == 0.6
    assert settings["languages"] == ["en", "de"] and settings["lid_sample_chars"] == 400
    assert (settings["lid_fast_sample_chars"], settings["lid_decisive_confidence"]) == (200, 0.95)
    # Without the fast look the keys are absent, as in manifests written before it existed.
    assert "lid_fast_sample_chars" not in QualityFilter("legal", FilterConfig(lid_fast_sample_chars=None)).settings()
    assert settings["pii_policy"]["email"] == "redact" and settings["pii_policy"]["github_token"] == "drop"
    assert set(settings["libraries"]) == {"ftfy", "lingua-language-detector", "phonenumbers", "numpy"}
    assert QualityFilter("code").settings()["languages"] is None


def test_decision_fields() -> None:
    text = PROSE + " Mail ann.lee@mail.org today."
    decision = QualityFilter("prose").apply(text)
    assert isinstance(decision, Decision)
    assert decision.kept and decision.reason is None
    assert decision.text.endswith("Mail <EMAIL> today.")
    assert [(d.kind, d.action) for d in decision.detections] == [("email", "redact")]
    assert 0.0 < decision.quality <= 1.0
    assert decision.features["n_words"] == len(text.split()) == 96
    record = decision.to_record()
    assert "text" not in record and record["detections"][0]["kind"] == "email"
    assert json.loads(json.dumps(record)) == record  # plain Python values only (no numpy scalars)
    dropped = QualityFilter("prose").apply("cheap watches " * 100)
    assert (dropped.kept, dropped.quality) == (False, 0.0)
    assert dropped.reason == "top_2_gram"


def test_step_timers_for_benchmarks() -> None:
    qf = QualityFilter("code")
    assert qf.timings is None  # off by default: no timer calls in the loop
    qf.timings = {}
    qf.apply("def f(x):\n    return x * 2\n" * 5)
    assert set(qf.timings) == {
        "normalize",
        "split",
        "char_count",
        "control_chars",
        "max_line_length",
        "mean_line_length",
        "alnum_fraction",
        "encoded_data",
        "pii",
    }
