"""tokenized_documents: GPT-2 ids per source as one flat uint16 array, `<|endoftext|>` after each document.

Document text is encoded as ordinary text (`encode_ordinary_batch`): a literal "<|endoftext|>" inside a
document is split into ordinary tokens, so no document can forge a boundary. The index holds each
document's start and length (the length includes its trailing EOT) so any token maps back to a doc_id.
Batches of `BATCH_ROWS` documents keep memory bounded; tiktoken's batch encoder uses both cores.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from corpus.lake import Version, VersionWriter
from corpus.stages import StageOutput
from corpus.stages.io import ParquetSink, iter_batches
from corpus.tokenizer import get_encoding

CODE_VERSION = "tokenized_documents/1"

INDEX_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("uri", pa.string()),
        ("position", pa.int64()),
        ("start", pa.int64()),
        ("length", pa.int64()),
    ]
)


def build_tokenized_documents(documents: Version, writer: VersionWriter, encoding: str = "gpt2") -> StageOutput:
    enc = get_encoding(encoding)
    eot = enc.eot_token
    threads = max(1, min(8, os.cpu_count() or 1))
    offset = 0
    n_docs = 0
    n_bytes = 0
    with (
        open(writer.path("tokens.bin"), "wb") as out,
        ParquetSink(writer.path("index.parquet"), INDEX_SCHEMA) as index,
    ):
        for batch in iter_batches(documents.file("documents.parquet"), ["doc_id", "source", "uri", "position", "text"]):
            texts = batch.column("text").to_pylist()
            encoded = enc.encode_ordinary_batch(texts, num_threads=threads)
            lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
            flat = np.empty(int(lengths.sum()), dtype=np.uint16)
            ends = np.cumsum(lengths)
            for ids, end, length in zip(encoded, ends, lengths, strict=True):
                flat[end - length : end - 1] = ids
            flat[ends - 1] = eot
            # uint16 holds GPT-2's ids (max 50256 < 65536); check the range before writing.
            assert not flat.size or int(flat.max()) < enc.n_vocab, f"token id {int(flat.max())} >= {enc.n_vocab}"
            out.write(np.ascontiguousarray(flat, dtype="<u2").data)
            starts = offset + ends - lengths
            for i, doc_id in enumerate(batch.column("doc_id").to_pylist()):
                index.add(
                    {
                        "doc_id": doc_id,
                        "source": batch.column("source")[i].as_py(),
                        "uri": batch.column("uri")[i].as_py(),
                        "position": batch.column("position")[i].as_py(),
                        "start": int(starts[i]),
                        "length": int(lengths[i]),
                    }
                )
            offset += int(lengths.sum())
            n_docs += len(texts)
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
    counts = {"in": n_docs, "out": n_docs, "dropped": {}, "documents": n_docs, "tokens": offset, "bytes_in": n_bytes}
    extra = {
        "out_file": "index.parquet",
        "in_from": [documents.asset],
        "dtype": "uint16",
        "encoding": enc.name,
        "vocab_size": enc.n_vocab,
        "eot": eot,
    }
    version = writer.commit(
        code_version=CODE_VERSION,
        config={"encoding": encoding},
        upstream=[documents.ref()],
        counts=counts,
        extra=extra,
    )
    return StageOutput(
        version=version,
        counts=counts,
        summary={"documents": n_docs, "tokens": offset, "bytes_per_token": round(n_bytes / max(offset - n_docs, 1), 3)},
    )
