"""Vectorised MinHash signatures over word 5-gram shingles, bit-identical to datasketch's.

Normalization (`normalize_for_dedup`): NFKC, lowercase, delete every Unicode punctuation character
(general category P*: `.,;:!?'"()[]{}-_/@#%&*` ...; symbols such as `+ = < $ |` are kept), map every
whitespace character to a space and collapse runs, strip the ends. `exact_key` is the sha256 hex of
that text encoded as UTF-8. Shingles are the normalized text's word n-grams joined by one space
(n = `DedupConfig.shingle_size`); a document with 1..n-1 words has one shingle of all its words, an
empty one (no words after normalization) has none.

Shingle hash (`shingle_hash`): h = sum_i (byte_i + 1) * B^i mod 2^64 over the shingle's UTF-8 bytes,
then the 64-bit MurmurHash3 finalizer, then the top 32 bits. The prefix sums of (byte + 1) * B^i over
a whole batch give every shingle's h as (S[end] - S[start]) * B^-start (B is odd, so invertible mod
2^64): a few numpy passes per byte and no Python call per shingle. Trade-off against datasketch's
default `sha1_hash32`: sha1 is cryptographic, ours is a polynomial hash that an adversary can collide
(e.g. Thue-Morse strings of >= 2048 bytes collide for every odd B), but on non-adversarial text both
are dominated by the same 2^-32 chance that two distinct shingles share a 32-bit value, and ours
costs ~20 ns per shingle (byte passes included) against ~400 ns for a Python call to sha1_hash32.

Permutations (`DedupConfig.scheme`), exactly as datasketch 2.x computes them for the same scheme, seed
and num_perm, so `datasketch.LeanMinHash(seed=cfg.seed, hashvalues=sig, scheme=cfg.scheme)` is a
faithful sketch and `datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash, scheme=cfg.scheme)` fed
`shingles(text)` yields the same hashvalues (tested; datasketch 2.x refuses hashvalues without an explicit
scheme). "legacy" (default; datasketch's only scheme before 2.0): `a, b` drawn by
`np.random.RandomState(seed)` and `phv = ((a * h + b) mod 2^64) mod (2^61 - 1) & 0xFFFFFFFF`, the mod
2^64 being numpy's uint64 wrap-around that datasketch also has. "affine32" (datasketch 2.x's default):
`phv = a * fmix32(h) + b mod 2^32` with odd a, a bijection, all in uint32, which numpy vectorises: its
signatures are ~1.8x faster end to end and free of the legacy fold's bias below.

The legacy hot loop avoids the 64-bit modulo: with x' = a * h + b + 1 (mod 2^64),
c = low32(x' + (x' >> 61)) equals e + 1 for the exact value e, except where e <= 7 or e = 2^32 - 1, and
those all give c <= 8 (x' >> 61 is at most 7, so the fold x mod (2^61 - 1) = (x & (2^61 - 1)) + (x >> 61)
wraps only into [0, 7]). A chunk whose per-document
minima of c are all >= 9 is therefore exact after subtracting 1; the others (~2e-4 of chunks) are
redone with datasketch's formula verbatim, so the signatures are always bit-identical.
Legacy folds a 61-bit random function into 32 bits, so two different shingles can tie for the minimum:
that inflates J estimates by about n / 2^33 for sets of n shingles (datasketch issue 212), 1.2e-4 at
a 10^6-shingle (~6 MB) document.

Empty documents get the all-0xFFFFFFFF signature (datasketch's empty MinHash). corpus.dedup never
indexes it, so empty documents are never near duplicates of each other or of anything else.

LSH (corpus.dedup): b bands of r rows; a pair with Jaccard J shares at least one whole band with
probability P(J) = 1 - (1 - J^r)^b; the S-curve's steepest point is near t = (1/b)^(1/r).
Defaults b=14, r=8 (112 permutations): t = 0.719, P(0.9) = 0.9996, P(0.8) = 0.9235, P(0.7) = 0.5645,
P(0.5) = 0.0533, P(0.3) = 0.0009. Candidates are then confirmed against the threshold (0.8), by default
(DedupConfig.confirm = "exact") by the exact Jaccard of the two documents' shingle sets
(`MinHasher.shingle_sets`: the same shingles hashed to 64 bits, sorted and unique). The alternative,
the signature estimate (>= 90 of 112 values equal), has sd sqrt(J(1-J)/112) = 0.038 at J = 0.8, so
about half of the pairs exactly at J = 0.8 fall below it and 11% of the pairs at J = 0.75 pass.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import unicodedata
from collections.abc import Sequence

import numpy as np

from corpus.config import DedupConfig

MERSENNE_PRIME = (1 << 61) - 1
MAX_HASH = (1 << 32) - 1  # datasketch's _max_hash: the value of an empty MinHash
EMPTY_KEY = hashlib.sha256(b"").hexdigest()  # exact_key of a document with no words

_M64 = (1 << 64) - 1
# Fixed odd base of the polynomial shingle hash (the 64-bit golden ratio constant, made odd).
_BASE = 0x9E3779B97F4A7C15
_BASE_INV = pow(_BASE, -1, 1 << 64)
_FMIX1 = 0xFF51AFD7ED558CCD
_FMIX2 = 0xC4CEB9FE1A85EC53
_SPACE = 0x20


@functools.cache
def _tables() -> tuple[dict[int, str | None], dict[int, str | None], bytes, bytes]:
    """Translation tables, built on first use (~0.3 s: a scan of all 1.1M code points).

    Every punctuation character (Unicode P*) is deleted and every whitespace character becomes a space,
    so that str.split() and the byte-level space collapse in `_Batch` see the same words.
    """
    table: dict[int, str | None] = {}
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        if unicodedata.category(ch).startswith("P"):
            table[cp] = None
        elif ch.isspace():
            table[cp] = " "
    wide = {cp: v for cp, v in table.items() if cp >= 128}
    spaces = bytes(cp for cp in range(128) if table.get(cp) == " ")
    delete = bytes(cp for cp in range(128) if cp in table and table[cp] is None)
    upper = bytes(range(ord("A"), ord("Z") + 1))
    # ASCII bytes: whitespace -> space and A-Z -> a-z (what str.lower does to ASCII) in one table.
    ascii_map = bytes.maketrans(spaces + upper, b" " * len(spaces) + upper.lower())
    return table, wide, ascii_map, delete


# Shingles per permutation chunk: 112 x 1024 x 8 bytes = 0.9 MB per buffer (four, with the a and b tiles).
# Measured flat from 512 to 2048; 256 is 1.7x slower (per-call overhead of the ~10 numpy calls per chunk).
_PERM_CHUNK = 1024
# Normalized bytes per hashing batch: bounds the per-byte uint64 temporaries (~40 bytes per byte).
_BATCH_BYTES = 1 << 20
# The fast permutation value c is exact + 1 except for exact values <= 7 or == 2^32 - 1, which all
# give c <= 8; a chunk whose segment minima are all > _FAST_LOW needs no repair.
_FAST_LOW = 8


def lsh_probability(jaccard: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(a pair with this Jaccard similarity shares at least one band) = 1 - (1 - J^r)^b."""
    return 1.0 - (1.0 - np.asarray(jaccard, dtype=np.float64) ** rows) ** bands


def lsh_threshold(bands: int, rows: int) -> float:
    """The S-curve's approximate inflection point (1/b)^(1/r)."""
    return float((1.0 / bands) ** (1.0 / rows))


def normalize_for_dedup(text: str) -> str:
    """NFKC, lowercase, delete punctuation (Unicode P*), whitespace runs to one space, strip."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().translate(_tables()[0]).split())


def exact_key(text: str) -> str:
    """sha256 hex of the normalized text (UTF-8)."""
    return hashlib.sha256(normalize_for_dedup(text).encode("utf-8")).hexdigest()


def shingles(text: str, shingle_size: int = 5) -> list[bytes]:
    """The document's shingles as UTF-8 bytes, in order, repeats included (what MinHash is fed)."""
    if shingle_size < 1:
        raise ValueError(f"shingle_size must be >= 1, got {shingle_size!r}")
    words = normalize_for_dedup(text).split(" ")
    if words == [""]:
        return []
    if len(words) < shingle_size:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i : i + shingle_size]).encode("utf-8") for i in range(len(words) - shingle_size + 1)]


def _fmix64_int(h: int) -> int:
    h ^= h >> 33
    h = (h * _FMIX1) & _M64
    h ^= h >> 33
    h = (h * _FMIX2) & _M64
    return h ^ (h >> 33)


def shingle_hash(shingle: bytes) -> int:
    """The 32-bit shingle hash as a Python function (slow; for datasketch interop and tests)."""
    h = 0
    power = 1
    for byte in shingle:
        h = (h + (byte + 1) * power) & _M64
        power = (power * _BASE) & _M64
    return _fmix64_int(h) >> 32


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place on a uint64 array."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(_FMIX1)
    h ^= h >> np.uint64(33)
    h *= np.uint64(_FMIX2)
    h ^= h >> np.uint64(33)
    return h


def permutations(num_perm: int, seed: int, scheme: str = "legacy") -> tuple[np.ndarray, np.ndarray]:
    """datasketch's (a, b) for the scheme, drawn from one RandomState(seed) exactly as MinHash draws them."""
    gen = np.random.RandomState(seed)
    if scheme == "affine32":
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        return a, gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    if scheme != "legacy":
        raise ValueError(f"scheme must be 'legacy' or 'affine32', got {scheme!r}")
    pairs = np.array(
        [
            (gen.randint(1, MERSENNE_PRIME, dtype=np.uint64), gen.randint(0, MERSENNE_PRIME, dtype=np.uint64))
            for _ in range(num_perm)
        ],
        dtype=np.uint64,
    )
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, in place on a uint32 array (datasketch's affine32 pre-mix)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _encode_normalized_prefix(text: str) -> bytes:
    """The text after NFKC, lowercase and the punctuation/space table, as UTF-8; spaces not yet collapsed."""
    _, wide, ascii_map, ascii_delete = _tables()
    if text.isascii():
        # ASCII is NFKC-invariant; bytes.translate (~1 GB/s) lowercases, maps spaces and deletes at once.
        return text.encode("ascii").translate(ascii_map, ascii_delete)
    # Only lines holding non-ASCII characters need NFKC, str.lower and the large table (~100 ns per
    # character); both are line-local ("\n" is a starter that composes with nothing, and the Greek
    # final-sigma context stops at it), and "\n" itself becomes a space below.
    text = "\n".join(
        [
            line if line.isascii() else unicodedata.normalize("NFKC", line).lower().translate(wide)
            for line in text.split("\n")
        ]
    )
    return text.encode("utf-8").translate(ascii_map, ascii_delete)


class _Batch:
    """Normalized bytes of a batch of documents, with their words located."""

    def __init__(self, texts: Sequence[str]) -> None:
        raw = [_encode_normalized_prefix(t) for t in texts]
        # One separating space between documents so that no word spans two of them.
        joined = np.frombuffer(b" ".join(raw), dtype=np.uint8)
        doc_start = np.zeros(len(raw), dtype=np.int64)
        np.cumsum(np.fromiter((len(r) + 1 for r in raw[:-1]), dtype=np.int64, count=len(raw) - 1), out=doc_start[1:])
        # Collapse space runs: keep a byte unless it is a space following a space (or at position 0).
        is_space = joined == _SPACE
        keep = ~is_space
        keep[1:] |= ~is_space[:-1]
        # Each document's start in compacted coordinates: kept bytes of the documents before it.
        # (keep gets a False sentinel: an empty last document starts at len(joined)).
        bounds = np.zeros(len(raw) + 1, dtype=np.int64)
        np.cumsum(np.add.reduceat(np.append(keep, False), doc_start, dtype=np.int64), out=bounds[1:])
        self.data = joined[keep]
        # Compacted data has single spaces between words and none at the start: words lie between them.
        spaces = np.flatnonzero(self.data == _SPACE)
        starts = np.concatenate(([0], spaces + 1))
        ends = np.append(spaces, len(self.data))
        if len(starts) and starts[-1] == len(self.data):  # trailing space, or no data at all
            starts, ends = starts[:-1], ends[:-1]
        self.word_start = starts
        self.word_end = ends
        # Words of document d are word_start[first_word[d]:first_word[d + 1]].
        self.first_word = np.searchsorted(starts, bounds, side="left")

    def doc_bytes(self, d: int) -> bytes:
        lo, hi = self.first_word[d], self.first_word[d + 1]
        if lo == hi:
            return b""
        return self.data[self.word_start[lo] : self.word_end[hi - 1]].tobytes()


class PowerTable:
    """B^i and B^-i mod 2^64 (B = the shingle hash base) for i < size, grown on demand."""

    def __init__(self) -> None:
        self.pow = np.ones(1, dtype=np.uint64)
        self.inv = np.ones(1, dtype=np.uint64)

    def ensure(self, size: int) -> None:
        if size <= len(self.pow):
            return
        size = max(size, 2 * len(self.pow))
        self.pow = np.full(size, _BASE, dtype=np.uint64)
        self.pow[0] = 1
        np.multiply.accumulate(self.pow, out=self.pow)  # wraps mod 2^64, as intended
        self.inv = np.full(size, _BASE_INV, dtype=np.uint64)
        self.inv[0] = 1
        np.multiply.accumulate(self.inv, out=self.inv)


class MinHasher:
    """Signatures for many documents at once: (n_docs, num_perm) uint64 holding 32-bit values."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.a, self.b = permutations(cfg.num_perm, cfg.seed, cfg.scheme)
        self._powers = PowerTable()
        self._tile_cache: tuple[np.ndarray, np.ndarray] | None = None

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """MinHash signatures of the texts (all MAX_HASH for a text without words)."""
        return self.keys_and_signatures(texts, with_keys=False)[1]

    def keys_and_signatures(self, texts: Sequence[str], with_keys: bool = True) -> tuple[list[str], np.ndarray]:
        """`exact_key` and the signature of every text, normalizing each text once."""
        out = np.full((len(texts), self.cfg.num_perm), MAX_HASH, dtype=np.uint64)
        keys: list[str] = []
        for lo, hi in _batches(texts):
            batch = _Batch(texts[lo:hi])
            if with_keys:
                keys.extend(hashlib.sha256(batch.doc_bytes(d)).hexdigest() for d in range(hi - lo))
            hashes, offsets = self._shingle_hashes(batch)
            if self.cfg.scheme == "affine32":
                self._min_affine32(hashes, offsets, out[lo:hi])
            else:
                self._min_permuted(hashes, offsets, out[lo:hi])
        return keys, out

    def shingle_sets(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's shingles as a sorted unique uint64 array of 64-bit hashes (for exact Jaccard).

        The hash is `shingle_hash` before its top-32-bit cut: two distinct shingles collide with
        probability 2^-64, so set sizes and intersections are exact for any real corpus.
        """
        out: list[np.ndarray] = []
        for lo, hi in _batches(texts):
            hashes, offsets = self._shingle_hashes(_Batch(texts[lo:hi]), full=True)
            out.extend(np.unique(hashes[offsets[d] : offsets[d + 1]]) for d in range(hi - lo))
        return out

    def _shingle_hashes(self, batch: _Batch, full: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Hash of every shingle (32-bit as uint64; 64-bit when `full`) and per-document offsets into it."""
        n = self.cfg.shingle_size
        first = batch.first_word
        n_words = np.diff(first)
        per_doc = np.where(n_words >= n, n_words - n + 1, np.minimum(n_words, 1))
        offsets = np.zeros(len(per_doc) + 1, dtype=np.int64)
        np.cumsum(per_doc, out=offsets[1:])
        total = int(offsets[-1])
        # Global index of each shingle's first word, and of its last word (clipped for short documents).
        doc_of = np.repeat(np.arange(len(per_doc)), per_doc)
        first_word = np.arange(total, dtype=np.int64) - offsets[doc_of] + first[doc_of]
        last_word = np.minimum(first_word + (n - 1), first[doc_of + 1] - 1)
        start = batch.word_start[first_word]
        end = batch.word_end[last_word]
        data = batch.data
        self._powers.ensure(len(data) + 1)
        prefix = np.zeros(len(data) + 1, dtype=np.uint64)
        terms = data.astype(np.uint64)
        terms += np.uint64(1)  # byte + 1, so that a NUL byte still changes the hash
        terms *= self._powers.pow[: len(data)]
        np.cumsum(terms, out=prefix[1:])  # wraps mod 2^64
        h = prefix[end] - prefix[start]
        h *= self._powers.inv[start]
        fmix64(h)
        if not full:
            h >>= np.uint64(32)
        return h, offsets

    def _min_permuted(self, hashes: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
        """out[d] = min over document d's shingles of the legacy permutation, chunk by chunk.

        Layout (num_perm, chunk) with a and b + 1 pre-tiled to that shape: numpy's contiguous
        uint64 multiply/add run ~1.5-2x faster than the broadcast (n, 1) x (num_perm,) form.
        """
        total = len(hashes)
        if total == 0:
            return
        nonempty = np.flatnonzero(np.diff(offsets) > 0)
        seg_start = offsets[nonempty]
        # For each chunk: the segment running into its start, and the segments starting inside it.
        chunk_start = np.arange(0, total, _PERM_CHUNK)
        first_seg = np.searchsorted(seg_start, chunk_start, side="right") - 1
        end_seg = np.searchsorted(seg_start, np.minimum(chunk_start + _PERM_CHUNK, total), side="left")
        a_tile, b1_tile = self._tiles()
        buf = np.empty_like(a_tile)
        top = np.empty_like(a_tile)
        shift = np.uint64(61)
        low = np.uint64(MAX_HASH)
        one = np.uint64(1)
        for c0, lo, hi in zip(chunk_start.tolist(), first_seg.tolist(), end_seg.tolist(), strict=True):
            width = min(_PERM_CHUNK, total - c0)
            x, t = buf[:, :width], top[:, :width]
            h = hashes[None, c0 : c0 + width]
            # c = low32(x' + (x' >> 61)) with x' = a * h + b + 1 equals e + 1, e = ((a * h + b) mod 2^64)
            # mod (2^61 - 1) & 0xFFFFFFFF, except where e <= 7 (the fold wraps) or e = 2^32 - 1 (e + 1
            # wraps): both give c <= 8, so a segment minimum >= 9 is exact (module docstring).
            np.multiply(a_tile[:, :width], h, out=x)
            x += b1_tile[:, :width]
            np.right_shift(x, shift, out=t)
            x += t
            x &= low
            local = seg_start[lo:hi] - c0
            local[0] = 0
            mins = np.minimum.reduceat(x, local, axis=1)
            if mins.min() <= _FAST_LOW:
                # ~2e-4 of chunks: redo this one with datasketch's formula verbatim.
                np.multiply(a_tile[:, :width], h, out=x)
                x += self.b[:, None]
                x %= np.uint64(MERSENNE_PRIME)
                x &= low
                mins = np.minimum.reduceat(x, local, axis=1)
            else:
                mins -= one
            docs = nonempty[lo:hi]
            out[docs] = np.minimum(out[docs], mins.T)

    def _min_affine32(self, hashes: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
        """datasketch affine32: phv = a * fmix32(h) + b mod 2^32, exact in uint32 (vectorised by numpy)."""
        total = len(hashes)
        if total == 0:
            return
        h32 = fmix32(hashes.astype(np.uint32))
        nonempty = np.flatnonzero(np.diff(offsets) > 0)
        seg_start = offsets[nonempty]
        chunk_start = np.arange(0, total, _PERM_CHUNK)
        first_seg = np.searchsorted(seg_start, chunk_start, side="right") - 1
        end_seg = np.searchsorted(seg_start, np.minimum(chunk_start + _PERM_CHUNK, total), side="left")
        a_tile, b_tile = self._tiles()
        buf = np.empty_like(a_tile)
        for c0, lo, hi in zip(chunk_start.tolist(), first_seg.tolist(), end_seg.tolist(), strict=True):
            width = min(_PERM_CHUNK, total - c0)
            x = buf[:, :width]
            np.multiply(a_tile[:, :width], h32[None, c0 : c0 + width], out=x)
            x += b_tile[:, :width]
            local = seg_start[lo:hi] - c0
            local[0] = 0
            docs = nonempty[lo:hi]
            out[docs] = np.minimum(out[docs], np.minimum.reduceat(x, local, axis=1).T)

    def _tiles(self) -> tuple[np.ndarray, np.ndarray]:
        """a and b (legacy: b + 1) tiled to (num_perm, _PERM_CHUNK), cached."""
        if self._tile_cache is None or self._tile_cache[0].shape[1] != _PERM_CHUNK:
            shape = (len(self.a), _PERM_CHUNK)
            b = self.b if self.cfg.scheme == "affine32" else self.b + np.uint64(1)
            a_tile = np.ascontiguousarray(np.broadcast_to(self.a[:, None], shape))
            b_tile = np.ascontiguousarray(np.broadcast_to(b[:, None], shape))
            self._tile_cache = (a_tile, b_tile)
        return self._tile_cache


def _batches(texts: Sequence[str]) -> list[tuple[int, int]]:
    """[lo, hi) ranges of about _BATCH_BYTES characters each (a long text gets a batch of its own)."""
    out: list[tuple[int, int]] = []
    lo = 0
    size = 0
    for i, text in enumerate(texts):
        size += len(text) + 1
        if size >= _BATCH_BYTES:
            out.append((lo, i + 1))
            lo = i + 1
            size = 0
    if lo < len(texts):
        out.append((lo, len(texts)))
    return out


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature values, row by row (the MinHash estimate of Jaccard similarity)."""
    return np.mean(np.asarray(sig_a) == np.asarray(sig_b), axis=-1)


def is_empty_signature(signatures: np.ndarray) -> np.ndarray:
    """True for rows that are all MAX_HASH: documents without words."""
    return np.all(np.asarray(signatures) == MAX_HASH, axis=-1)
