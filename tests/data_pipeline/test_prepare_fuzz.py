"""Acceptance (property test): malformed records never crash `prepare`, every rejected record is
counted under its reason, and every accepted document round-trips exactly through the tokenizer."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prepare_testing import decode, load, make_tokenizer

from data_pipeline.formats import open_shardset
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.sources import split_long_text

ANY_CHARACTER = st.characters(exclude_categories=())  # lone surrogates included
JSON_NON_STRINGS = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.booleans(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _text_line(text: str, ascii_only: bool) -> bytes:
    # lone surrogates: ensure_ascii writes "\udXXX" escapes, otherwise the raw code point is
    # written with surrogatepass (bytes that are not UTF-8); both must count as invalid_utf8
    return json.dumps({"text": text, "id": 1}, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def record(draw) -> tuple[bytes, str | None, str | None]:
    """(JSONL line without newline, expected rejection reason, accepted text)."""
    kind = draw(st.sampled_from(
        ["text", "text", "text", "whitespace", "missing", "null", "non_string", "bad_utf8",
         "garbage", "array", "blank"]))
    if kind in ("text", "whitespace"):
        text = draw(st.text(ANY_CHARACTER, max_size=80) if kind == "text"
                    else st.text(st.sampled_from(" \t\n\r\u3000\u00a0\x0b"), max_size=5))
        line = _text_line(text, draw(st.booleans()))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return line, "invalid_utf8", None
        if not text.strip():
            return line, "empty_document", None
        return line, None, text
    if kind == "missing":
        return json.dumps({"content": draw(st.text(max_size=10))}).encode(), "missing_text_field", None
    if kind == "null":
        return b'{"text": null}', "missing_text_field", None
    if kind == "non_string":
        return json.dumps({"text": draw(JSON_NON_STRINGS)}).encode(), "non_string_text", None
    if kind == "bad_utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"]))
        return b'{"text": "ok ' + junk + b' ok"}', "invalid_utf8", None
    if kind == "garbage":
        raw = b"{{" + draw(st.binary(max_size=30)).replace(b"\n", b" ")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw, "invalid_utf8", None
        return raw, "invalid_json", None
    if kind == "array":
        return json.dumps(draw(st.lists(st.text(max_size=5), max_size=3))).encode(), "not_a_json_object", None
    return draw(st.sampled_from([b"", b" ", b"\t  ", b"\r"])), "blank_line", None


_TOKENIZER_DIR = Path(tempfile.mkdtemp(prefix="strata-fuzz-tok-"))
TOKENIZER = make_tokenizer(_TOKENIZER_DIR / "tokenizer.json", vocab_size=350)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(record(), max_size=25), max_doc_chars=st.sampled_from([0, 5, 64]),
       fmt=st.sampled_from(["mds", "wds", "megatron"]))
def test_malformed_records_are_counted_and_good_ones_round_trip(records, max_doc_chars, fmt):
    with tempfile.TemporaryDirectory(prefix="strata-fuzz-") as tmp:
        tmp = Path(tmp)
        (tmp / "in.jsonl").write_bytes(b"".join(line + b"\n" for line, _, _ in records))
        manifest = prepare(
            [tmp / "in.jsonl"], tmp / "out",
            PrepareOptions(format=fmt, tokenizer=str(TOKENIZER), max_doc_chars=max_doc_chars,
                           shard_size="200b", workers=1, progress=False),
        )
        expected_rejections = Counter(reason for _, reason, _ in records if reason)
        accepted = [text for _, reason, text in records if reason is None]
        counts = manifest["counts"]
        assert counts["input_records"] == len(records)
        assert manifest["rejected"] == dict(expected_rejections)
        assert counts["rejected_records"] == sum(expected_rejections.values())

        pieces = [split_long_text(text, max_doc_chars) for text in accepted]
        assert counts["documents"] == sum(len(p) for p in pieces)
        assert counts["split_records"] == sum(len(p) > 1 for p in pieces)
        if not accepted:
            return
        shardset = open_shardset(tmp / "out")
        tokenizer = load(TOKENIZER)
        doc_id = 0
        for text, text_pieces in zip(accepted, pieces, strict=True):
            decoded = []
            for _ in text_pieces:
                tokens = shardset.get(doc_id)
                assert tokens[-1] == shardset.eos_id and (tokens[:-1] != shardset.eos_id).all()
                decoded.append(decode(tokenizer, tokens))
                doc_id += 1
            assert decoded == text_pieces and "".join(decoded) == text
        assert doc_id == len(shardset)
