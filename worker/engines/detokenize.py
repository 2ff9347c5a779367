"""Token ids in, printable text deltas out, with stop strings cut before they are sent.

* **Incremental detokenization** follows TGI's two-offset method: decode a short window of
  recent ids and emit only the new suffix, holding back text while it ends in an incomplete
  UTF-8 sequence (``\\ufffd``). Decoding the whole answer per token would be quadratic.
* **Stop strings** are matched on the text, holding back any suffix that may still become a
  stop string, so the stop string itself is never sent. Once one is found,
  :attr:`DeltaStreamer.stopped_by_string` is set and nothing more is sent.

It runs on the job's own thread, never on the inference thread: decoding and publishing text
never delay the next decoding step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DeltaStreamer:
    """Receives new token ids and hands printable text deltas to ``on_text``."""

    tokenizer: Any
    on_text: Callable[[str], None]
    stop_strings: Sequence[str]
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    pending: str = ""  # text held back because it may be the start of a stop string
    text: str = ""  # everything sent so far
    stopped_by_string: bool = False
    first_token_at: float | None = None

    def push(self, ids: Sequence[int]) -> None:
        """New token ids of the answer, in order (one step's, or several)."""
        if not ids:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.stopped_by_string:
            return
        self.ids.extend(int(t) for t in ids)
        delta = self._decode_step()
        if delta:
            self._offer(delta)

    def end(self) -> None:
        """No more ids: send the held-back tail (unless it completes a stop string)."""
        if self.stopped_by_string:
            return
        tail = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        head = self.tokenizer.decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        rest = tail[len(head) :] if tail.startswith(head) else ""
        rest = rest.replace("\ufffd", "")
        if rest:
            self._offer(rest)  # the tail may complete a stop string
        if self.pending and not self.stopped_by_string:
            self._send(self.pending)
        self.pending = ""

    def _decode_step(self) -> str:
        head = self.tokenizer.decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        full: str = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(head) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(head) :]
        return ""

    def _offer(self, delta: str) -> None:
        if not self.stop_strings:
            self._send(delta)
            return
        buf = self.pending + delta
        for stop in self.stop_strings:
            at = buf.find(stop)
            if at >= 0:
                if at:
                    self._send(buf[:at])
                self.pending = ""
                self.stopped_by_string = True
                return
        # Hold back the longest suffix that is a prefix of some stop string.
        keep = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        cut = len(buf) - keep
        if cut:
            self._send(buf[:cut])
        self.pending = buf[cut:]

    def _send(self, text: str) -> None:
        self.text += text
        self.on_text(text)
