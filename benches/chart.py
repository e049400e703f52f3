"""A PNG bar chart of benchmark results, with the standard library only (zlib + struct).

One group of horizontal bars per workload: requests per second of every server, the bar's
length relative to the fastest server of the workload, the figure and the ratio to the stdlib
written after it. Text uses the tiny built-in 5x8 bitmap font below (drawn for this file), so
the chart needs no font files and no matplotlib.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

# 5x8 glyphs: 8 rows of 5 pixels, '#' on. Rows 0-6 carry capitals and digits, row 7 descenders.
_GLYPHS = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... ..... .#### #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #...# #...#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .###. #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. .##.. ..#.. .#...",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "_": "..... ..... ..... ..... ..... ..... #####",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "/": "....# ....# ...#. ..#.. .#... #.... #....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "%": "##..# ##..# ...#. ..#.. .#... #..## #..##",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "*": "..... #.#.# .###. ##### .###. #.#.# .....",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "'": "..#.. ..#.. .#... ..... ..... ..... .....",
    "\u00b5": "..... ..... #...# #...# #...# ##..# #.##. #....",
    "~": "..... ..... .#... #.#.# ...#. ..... .....",
}
_FONT = {ch: [row for row in (g.split() + ["....."] * 8)[:8]] for ch, g in _GLYPHS.items()}
GLYPH_W, GLYPH_H = 6, 9  # advance and line height, in font pixels

COLOURS = {
    "fss": (31, 119, 180),
    "stdlib": (140, 140, 140),
    "asyncio": (44, 160, 44),
    "uvloop": (255, 127, 14),
    "native": (148, 103, 189),
}
WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (20, 20, 20), (110, 110, 110), (232, 232, 232)


class Canvas:
    def __init__(self, w: int, h: int, bg: tuple[int, int, int] = WHITE) -> None:
        self.w, self.h = w, h
        self.px = bytearray(bytes(bg) * (w * h))

    def rect(self, x: int, y: int, w: int, h: int, c: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = max(0, x), max(0, y), min(self.w, x + w), min(self.h, y + h)
        if x1 <= x0 or y1 <= y0:
            return
        row = bytes(c) * (x1 - x0)
        for yy in range(y0, y1):
            o = (yy * self.w + x0) * 3
            self.px[o:o + len(row)] = row

    def text(self, x: int, y: int, s: str, c: tuple[int, int, int] = BLACK, scale: int = 2) -> int:
        """Draw *s* with its top-left corner at (x, y); return the x after it."""
        for ch in s:
            g = _FONT.get(ch) or _FONT["?"]
            for r, bits in enumerate(g):
                for col, b in enumerate(bits):
                    if b == "#":
                        self.rect(x + col * scale, y + r * scale, scale, scale, c)
            x += GLYPH_W * scale
        return x

    def png(self) -> bytes:
        raw = bytearray()
        stride = self.w * 3
        for y in range(self.h):
            raw.append(0)
            raw += self.px[y * stride:(y + 1) * stride]

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw), 9))
                + chunk(b"IEND", b""))


def text_width(s: str, scale: int = 2) -> int:
    return len(s) * GLYPH_W * scale


def _fmt_rps(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def render(doc: dict[str, Any], path: Path | str) -> None:
    rows = doc["results"]
    titles = doc.get("workloads", {})
    groups: list[str] = []
    for r in rows:
        if r["workload"] not in groups:
            groups.append(r["workload"])
    s = 2
    line = GLYPH_H * s
    bar_h = line
    row_h = bar_h + 6
    label_w = max([text_width(r["server"], s) for r in rows] + [200]) + 16
    bar_w = 560
    value_w = text_width(" 000.0 MiB  0.00x  5000/5000 served  5000 thr", s)
    left = 16
    width = left + label_w + bar_w + value_w + 16
    header_h = 3 * line + 24
    height = header_h + sum(line + 14 + row_h * sum(1 for r in rows if r["workload"] == g) + 10 for g in groups) + line + 20
    cv = Canvas(width, height)

    m = doc.get("machine", {})
    opts = doc.get("options", {})
    cv.text(left, 10, "fastsocketserver benchmark: requests/s over loopback (longer is better)", BLACK, s)
    where = f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, CPython {m.get('python', '?')}"
    cv.text(left, 10 + line + 4, where[:int((width - 2 * left) / (GLYPH_W * s))], GREY, s)
    how = (f"{doc.get('started', '')}  {opts.get('duration_s', '?')} s per run, "
           f"{'pinned' if opts.get('pin') else 'unpinned'}, load avg before {doc.get('loadavg_before', '?')}")
    cv.text(left, 10 + 2 * (line + 4), how[:int((width - 2 * left) / (GLYPH_W * s))], GREY, s)

    y = header_h
    for g in groups:
        grows = [r for r in rows if r["workload"] == g]
        idle = g.startswith("idle")
        metric = "rss_peak_kb" if idle else "rps"
        cv.rect(left, y, width - 2 * left, line + 8, LIGHT)
        head = f"{g}: {titles.get(g, '')}" + ("  (bars: peak RSS, shorter is better)" if idle else "")
        cv.text(left + 6, y + 4, head, BLACK, s)
        y += line + 14
        top = max([r[metric] for r in grows if r.get("status") == "ok"] + [1.0])
        for r in grows:
            cv.text(left + label_w - text_width(r["server"], s) - 10, y + 3, r["server"], BLACK, s)
            x0 = left + label_w
            if r.get("status") != "ok":
                cv.text(x0 + 4, y + 3, r.get("status", "?"), GREY, s)
                y += row_h
                continue
            bw = max(1, int(bar_w * r[metric] / top))
            cv.rect(x0, y, bw, bar_h, COLOURS.get(r.get("group", ""), GREY))
            if idle:
                val = f" {r['rss_peak_kb'] / 1024:.1f} MiB"
                if r.get("x_rss") is not None:
                    val += f"  {r['x_rss']:.2f}x"
                val += f"  {r.get('served', 0)}/{r.get('conns', 0)} served  {r.get('threads_peak', 0)} thr"
                cv.text(x0 + bw + 4, y + 3, val, BLACK, s)
                y += row_h
                continue
            val = f" {_fmt_rps(r['rps'])} req/s"
            if r.get("x_rps") is not None:
                val += f"  {r['x_rps']:.2f}x"
            p99 = r.get("p99_us")
            if p99 is not None:
                val += f"  p99 {p99 / 1000:.1f}ms" if p99 >= 10000 else f"  p99 {p99:.0f}\u00b5s"
            cv.text(x0 + bw + 4, y + 3, val, BLACK, s)
            y += row_h
        y += 10
    x = left
    for name, c in COLOURS.items():
        cv.rect(x, y + 2, line - 4, line - 4, c)
        x = cv.text(x + line + 2, y + 3, name, BLACK, s) + 24
    Path(path).write_bytes(cv.png())
