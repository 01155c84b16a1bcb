"""Incremental detokenization and stop strings.

Text is decoded over a short window of ids so that multi-byte characters split over tokens
and tokenizers that drop a leading space on the first token both come out right. With stop
strings, the last len(longest stop) - 1 characters are held back until they cannot start one.
"""
from __future__ import annotations


class Detokenizer:
    WINDOW = 6  # prompt ids used as left context for the first output token

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-self.WINDOW:])
        self.prefix = 0  # start of the decode window
        self.read = len(self.ids)  # ids up to here are already text
        self.text = ""  # all output text decoded so far
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0  # characters already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> bool:
        """Append one token; returns True when a stop string has appeared (text is cut before it)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            start = max(0, len(self.text) - self.hold)
            self.text += new
            hits = [at for at in (self.text.find(s, start) for s in self.stop) if at >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return True
        return False

    def delta(self, final: bool) -> str:
        """Text not yet handed out; when not final, keep back what might begin a stop string."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out
