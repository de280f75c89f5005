"""Several processes' output on one stream, each line prefixed with its process's name.

The output arrives in chunks that split lines anywhere, and progress bars (tqdm, pip) redraw
one line with carriage returns. Copied naively, a bar of one service and a line of another
end up on the same terminal line, and a bar's last state is appended after its previous one.
Here every service has its own pending line, and a line is written whole:
- a line ended by "\\n" is written once, with its prefix;
- on a terminal, a line being redrawn ("\\r") is drawn in place (prefix, text, clear to the end
  of the line) and stays "open"; anything else written meanwhile first ends the open line, so
  the bar keeps its last state and the other output starts on a line of its own;
- into a file or a pipe (a log), redraws are not copied: only the bar's final line is, so a log
  holds lines, not hundreds of carriage-return frames.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

CLEAR_TO_EOL = b"\x1b[K"


class LinePrefixer:
    def __init__(self, out: BinaryIO, prefix: Callable[[str], bytes], tty: bool) -> None:
        self.out = out
        self.prefix = prefix
        self.tty = tty
        self._pending: dict[str, bytes] = {}  # each service's unfinished line
        self._redrawing: set[str] = set()  # services whose pending line is a redrawn one
        self._open: str | None = None  # whose redrawn line is on the terminal, unfinished

    def feed(self, name: str, data: bytes) -> None:
        buf = self._pending.get(name, b"") + data
        start = 0
        for i, byte in enumerate(buf):
            if byte == 10:  # \n: a finished line (the text after its last \r, if any)
                self._line(name, _last_frame(buf[start:i]))
                self._redrawing.discard(name)
                start = i + 1
            elif byte == 13:
                if i + 1 == len(buf):
                    break  # "\r" last: a redraw, or the first half of "\r\n" (next chunk)
                if buf[i + 1] == 10:
                    continue  # \r\n: a plain line end
                self._redrawing.add(name)
                self._redraw(name, buf[start:i])
                start = i + 1
        rest = buf[start:]
        self._pending[name] = rest
        if rest and name in self._redrawing:
            # The bar's current state, drawn now (terminal only); a "\r" held back for the next
            # chunk ("\r\n"?) changes nothing on screen.
            self._redraw(name, rest.removesuffix(b"\r"))
        self.out.flush()

    def end(self, name: str) -> None:
        """The service's output ended: its unfinished line, if any, is written as a line."""
        rest = _last_frame(self._pending.pop(name, b""))
        self._redrawing.discard(name)
        if rest:
            self._line(name, rest)
        elif self._open == name:
            self.out.write(b"\n")
            self._open = None
        self.out.flush()

    def close(self) -> None:
        for name in list(self._pending):
            self.end(name)
        if self._open is not None:
            self.out.write(b"\n")
            self._open = None
        self.out.flush()

    def _line(self, name: str, text: bytes) -> None:
        if self._open == name:  # its bar becomes this line
            self.out.write(b"\r" + self.prefix(name) + text + CLEAR_TO_EOL + b"\n")
        else:
            if self._open is not None:
                self.out.write(b"\n")  # another's bar keeps its state on its own line
            self.out.write(self.prefix(name) + text + b"\n")
        self._open = None

    def _redraw(self, name: str, text: bytes) -> None:
        if not self.tty or not text:
            return
        if self._open not in (None, name):
            self.out.write(b"\n")
        self.out.write(b"\r" + self.prefix(name) + text + CLEAR_TO_EOL)
        self._open = name


def _last_frame(text: bytes) -> bytes:
    """What a line redrawn with carriage returns finally shows: the text after its last \\r."""
    frames = [f for f in text.split(b"\r") if f]
    return frames[-1] if frames else b""
