"""Delta events and the front doors' delta frames are templates with only the text
escaped: byte for byte what encoding the whole payload gives, whatever the text."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from app.dialects.anthropic import Message
from app.dialects.openai import ChatCompletion
from streaming import EventEncoder, encode_data
from streaming.events import delta_text, encode_delta

# Any text a provider can send: every code point a UTF-8 payload can carry.
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@given(texts, st.integers(min_value=0, max_value=10**9))
def test_a_delta_payload_is_what_encoding_it_whole_gives(text: str, index: int) -> None:
    data = encode_delta(text, index)
    assert data == encode_data({"text": text, "index": index})
    assert delta_text(data) == text
    assert json.loads(data) == {"text": text, "index": index}


def test_the_text_of_a_payload_written_otherwise_is_still_read() -> None:
    # Written by hand, by a client or another version: key order or spacing may differ.
    assert delta_text(b'{"index": 3, "text": "a\\nb"}') == "a\nb"
    assert delta_text(b'{"text":"\\u00e9\\"","index":1}') == 'é"'


def test_the_encoder_numbers_deltas_with_the_other_events() -> None:
    encode = EventEncoder()
    assert encode("start", {}).id == 1
    delta = encode.delta("hi", 0, tokens=1)
    assert (delta.id, delta.name, delta.text, delta.tokens) == (2, "delta", "hi", 1)


def _data(frame: bytes) -> dict[str, object]:
    line = next(x for x in frame.split(b"\n") if x.startswith(b"data: "))
    value: dict[str, object] = json.loads(line[6:])
    return value


@given(texts)
def test_front_door_delta_frames_match_their_whole_encoding(text: str) -> None:
    openai = ChatCompletion("m")
    openai.stream_id = "s_1"
    chunk = _data(openai.delta_frame(text))
    assert chunk["id"] == "chatcmpl-s_1"
    assert chunk["choices"] == [
        {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    ]
    assert openai.delta_frame(text) == openai._chunk({"content": text})
    openai.stream_id = "s_2"  # another stream's id: the template follows
    assert _data(openai.delta_frame(text))["id"] == "chatcmpl-s_2"
    anthropic = Message("m")
    frame = anthropic.delta_frame(text)
    assert frame.startswith(b"event: content_block_delta\n")
    assert _data(frame) == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }
