"""The conversation text of one session, kept for checkpointing (SPEC 5.9).

User and agent transcript text is collected as `user:...` / `agent:...` lines, a new line each
time the speaker changes, with the text exactly as the provider sent it (json.loads has already
undone the JSON escapes). Nothing here logs: transcript text never appears in logs.
"""
from __future__ import annotations

from collections.abc import Mapping

USER_DELTA = "conversation.item.input_audio_transcription.delta"
USER_COMPLETED = "conversation.item.input_audio_transcription.completed"
AGENT_DELTAS = frozenset(
    {
        "response.output_audio_transcript.delta",
        "response.output_text.delta",
        "response.audio_transcript.delta",  # beta name
        "response.text.delta",  # beta name
    }
)

_USER, _AGENT = "user:", "agent:"
# Items whose transcript is streaming as deltas. One is forgotten when its `.completed` arrives;
# the cap bounds memory when a `.completed` never comes (a `.failed` transcription, say).
_MAX_STREAMING_ITEMS = 64


class Conversation:
    """Pending conversation text for one session; the session flushes it with take()."""

    __slots__ = ("_pieces", "_size", "_speaker", "_streaming")

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self._size = 0
        self._speaker: str | None = None  # prefix of the open line, None when no line is open
        self._streaming: dict[str, None] = {}  # insertion-ordered set of item ids

    def observe(self, event: Mapping) -> None:
        """Feed any parsed upstream event; transcript events add text, others are ignored. Never raises."""
        if not isinstance(event, Mapping):
            return
        kind = event.get("type")
        if kind in AGENT_DELTAS:
            self._add(_AGENT, event.get("delta"))
        elif kind == USER_DELTA:
            if self._add(_USER, event.get("delta")):
                self._streamed(event.get("item_id"))
        elif kind == USER_COMPLETED:
            item = event.get("item_id")
            # gpt-4o-transcribe streams deltas then repeats the whole text in `.completed`;
            # whisper-1 sends only `.completed`. Use the transcript only when nothing streamed.
            if type(item) is str and item in self._streaming:
                del self._streaming[item]
                return
            self._add(_USER, event.get("transcript"))

    def __len__(self) -> int:
        """Characters pending (code points)."""
        return self._size

    def take(self) -> str:
        """The pending text, cleared; the session sends it with APPEND_CONVERSATION."""
        text = "".join(self._pieces)
        self._pieces.clear()
        self._size = 0
        # A flush can fall between the two halves of a surrogate pair split across two deltas:
        # hold the high half back so the pair is rejoined on the next take.
        if text and "\ud800" <= text[-1] <= "\udbff":
            self._pieces.append(text[-1])
            self._size = 1
            text = text[:-1]
        return _utf8_safe(text)

    def close(self) -> str:
        """At session end: the pending text plus a final "\\n" if a line is open; "" if nothing."""
        text = _utf8_safe("".join(self._pieces))
        self._pieces.clear()
        self._size = 0
        if self._speaker is not None:
            self._speaker = None
            text += "\n"
        return text

    def _add(self, speaker: str, text: object) -> bool:
        if type(text) is not str or not text:
            return False
        if speaker != self._speaker:
            head = speaker if self._speaker is None else "\n" + speaker
            self._speaker = speaker
            self._pieces.append(head)
            self._size += len(head)
        self._pieces.append(text)
        self._size += len(text)
        return True

    def _streamed(self, item: object) -> None:
        if type(item) is str and item not in self._streaming:
            self._streaming[item] = None
            if len(self._streaming) > _MAX_STREAMING_ITEMS:
                del self._streaming[next(iter(self._streaming))]


def _utf8_safe(text: str) -> str:
    """`text` with surrogate halves rejoined into pairs and lone ones replaced by U+FFFD.

    json.loads accepts a lone `\\ud83d` escape, and a provider may split a pair across two
    deltas; the result must still encode as UTF-8 for the wire (common/wire.py encodes strictly).
    Well-formed text comes back unchanged.
    """
    if text.isascii():
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
