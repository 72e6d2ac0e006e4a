"""Evaluation text: Jane Austen's six novels, from Debian's ``r-cran-janeaustenr`` package.

The texts are public domain and the package is MIT; Debian ships it as an R data package, so
the novels sit in ``janeaustenr/data/Rdata.rdb`` as R-serialized character vectors (one string
per line, the title first). This module carries just enough of R's serialization format to read
them, so neither R nor an R-reading library is needed::

    books = austen_text()   # {"Sense and Sensibility": "SENSE AND SENSIBILITY\\n...", ...}

The first call fetches the ``.deb`` with ``apt-get download`` (no install, no R), decodes it and
keeps the result as JSON under the cache root (``$KVSLIM_FX_CACHE`` or ``~/.cache/kvslim_fx``);
later calls only read that file.

R's lazy-load database format: ``NAME.rdx`` is one gzip'd serialized named list whose
``variables`` entry maps each object's name to ``c(offset, length)`` in ``NAME.rdb``; each
record there is a 4-byte big-endian uncompressed size and a zlib stream holding one
serialized object (``compressed = 2 / 3`` put a type byte before bzip2 / xz data instead).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

from ..errors import KVSlimError
from .default_model import cache_root

DEB_PACKAGE = "r-cran-janeaustenr"
CORPUS_FILE = "austen.json"

# The names the package gives the books, in publication order, with their usual titles
# (the first line of each text is the title, in inconsistent capitals).
AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

# --- R serialization (XDR, versions 2 and 3), only the parts .rdx/.rdb files of strings use ---

_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _STRSXP, _VECSXP = 1, 2, 9, 10, 13, 16, 19
_REFSXP, _NILVALUE_SXP = 255, 254
_NA_INTEGER = -(2**31)
# CHARSXP encoding bits, in the "levels" field (flags >> 12).
_BYTES_MASK, _LATIN1_MASK, _UTF8_MASK, _ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6

RValue = Any
"""What :func:`unserialize` returns: ``None`` for NULL, a list for an unnamed vector (``str``,
``int`` or ``bool`` items, ``None`` for NA), a dict for a vector with names."""


class _Reader:
    """A cursor over one serialized object; symbols go in a table that REFSXP indexes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[str] = []
        self.native_encoding = "utf-8"

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise KVSlimError(f"R data ends early: wanted {n} bytes at offset {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def ints(self, n: int) -> tuple[int, ...]:
        return struct.unpack(f">{n}i", self.take(4 * n))

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise KVSlimError(f"R data in format {fmt!r}: only XDR (b'X\\n') is supported")
        version, _writer, _min_reader = self.ints(3)
        if version == 3:
            # Strings with no encoding flag are in the writer's native encoding.
            self.native_encoding = self.take(self.int()).decode("ascii")
        elif version != 2:
            raise KVSlimError(f"R serialization version {version}: only 2 and 3 are supported")

    def item(self) -> RValue:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == _NILVALUE_SXP:
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _CHARSXP:
            return self.charsxp(flags >> 12)
        if kind == _LISTSXP:
            return self.pairlist(has_attr, has_tag)
        if kind in (_LGLSXP, _INTSXP):
            values: list[Any] = [None if v == _NA_INTEGER else v for v in self.ints(self.length())]
            if kind == _LGLSXP:
                values = [None if v is None else bool(v) for v in values]
        elif kind == _STRSXP:
            values = [self.string() for _ in range(self.length())]
        elif kind == _VECSXP:
            values = [self.item() for _ in range(self.length())]
        else:
            raise KVSlimError(f"R object of SEXP type {kind} is not supported by this reader")
        return self.with_attributes(values) if has_attr else values

    def length(self) -> int:
        n = self.int()
        if n < 0:
            raise KVSlimError("R long vectors (2^31 items or more) are not supported")
        return n

    def charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        if levels & _LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & (_UTF8_MASK | _ASCII_MASK):
            return raw.decode("utf-8")
        if levels & _BYTES_MASK:
            return raw.decode("utf-8", errors="surrogateescape")
        return raw.decode(self.native_encoding)

    def string(self) -> str | None:
        flags = self.int()
        if flags & 0xFF != _CHARSXP:
            raise KVSlimError(f"character vector item of SEXP type {flags & 0xFF}, not CHARSXP")
        return self.charsxp(flags >> 12)

    def pairlist(self, has_attr: int, has_tag: int) -> list[tuple[str | None, RValue]]:
        """A pairlist as ``[(tag, value), ...]``; its cdr chain is unrolled, not recursed."""
        cells = []
        while True:
            if has_attr:
                raise KVSlimError("R pairlist cells with attributes are not supported")
            tag = self.item() if has_tag else None
            cells.append((tag, self.item()))
            flags = self.int()
            if flags & 0xFF == _NILVALUE_SXP:
                return cells
            if flags & 0xFF != _LISTSXP:
                raise KVSlimError(f"R pairlist ends in SEXP type {flags & 0xFF}, not NULL")
            has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)

    def with_attributes(self, values: list[Any]) -> RValue:
        flags = self.int()
        if flags & 0xFF != _LISTSXP:
            raise KVSlimError(f"R attributes of SEXP type {flags & 0xFF}, not a pairlist")
        attributes = dict(self.pairlist(flags & (1 << 9), flags & (1 << 10)))
        names = attributes.pop("names", None)
        if attributes:
            # class, levels, dim, ...: factors, data frames and matrices are not needed here.
            raise KVSlimError(f"R attributes {sorted(map(str, attributes))} are not supported")
        if names is None:
            return values
        if len(names) != len(values) or len(set(names)) != len(names) or None in names:
            raise KVSlimError("R names attribute is not a list of distinct names, one per item")
        return dict(zip(names, values, strict=True))


def unserialize(data: bytes) -> RValue:
    """Decode one XDR R-serialized object (what ``serialize(x, NULL)`` / ``saveRDS`` write)."""
    reader = _Reader(data)
    reader.header()
    value = reader.item()
    if reader.pos != len(data):
        raise KVSlimError(f"{len(data) - reader.pos} bytes left after the R object")
    return value


def read_rdx(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The index of an R lazy-load database: ``variables`` maps name -> ``[offset, length]``."""
    try:
        index = unserialize(gzip.decompress(Path(path).read_bytes()))
    except (OSError, EOFError, zlib.error) as err:
        raise KVSlimError(f"cannot read R index {path}: {err}") from err
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise KVSlimError(f"{path} is not an R lazy-load index (no named `variables` list)")
    return index


def read_rdb(path: str | os.PathLike[str]) -> dict[str, list[str | None]]:
    """Every character vector of the R lazy-load database ``path`` (``.rdb``), by name.

    The names and offsets come from the ``.rdx`` index beside it. NA strings are ``None``.
    """
    path = Path(path)
    index = read_rdx(path.with_suffix(".rdx"))
    compressed = (index.get("compressed") or [True])[0]
    blob = path.read_bytes()
    books: dict[str, list[str | None]] = {}
    for name, where in index["variables"].items():
        offset, length = where
        value = unserialize(_decompress(blob[offset : offset + length], compressed, name))
        if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
            raise KVSlimError(f"{path}: object {name!r} is not a character vector")
        books[name] = value
    return books


def _decompress(record: bytes, compressed: bool | int, name: str) -> bytes:
    """One .rdb record: 4-byte big-endian size, then the data as ``compress=`` wrote it."""
    if len(record) < 4:
        raise KVSlimError(f"R database record {name!r} is truncated")
    size = struct.unpack(">I", record[:4])[0]
    body = record[4:]
    try:
        if compressed is True or compressed == 1:
            data = zlib.decompress(body)
        else:  # compress = 2 (bzip2) or 3 (xz): a type byte comes first
            kind, body = body[:1], body[1:]
            codecs = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}
            data = body if kind == b"0" else codecs[kind](body)
    except (KeyError, zlib.error, OSError, lzma.LZMAError) as err:
        raise KVSlimError(f"R database record {name!r} does not decompress: {err!r}") from err
    if len(data) != size:
        raise KVSlimError(f"R database record {name!r}: {len(data)} bytes, header says {size}")
    return data


# --- the corpus ---


def austen_text(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Jane Austen's six novels: title -> full text (lines joined by ``\\n``, title line first).

    ``cache_dir`` holds ``austen.json`` (default ``<cache root>/corpus``); when it is missing,
    the Debian package is fetched and decoded into it first.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "corpus"
    path = folder / CORPUS_FILE
    if not path.is_file():
        print(
            f"kvslim_fx: fetching Jane Austen's novels (Debian package {DEB_PACKAGE}, ~1.6 MB) "
            f"into {path}...",
            file=sys.stderr,
            flush=True,
        )
        books, source = _fetch_books(path)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"source": source, "books": books}, ensure_ascii=False))
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    try:
        books = json.loads(path.read_text(encoding="utf-8"))["books"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KVSlimError(f"corrupt corpus cache {path} ({err!r}): delete it to rebuild") from err
    if not isinstance(books, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in books.items()
    ):
        raise KVSlimError(f"corrupt corpus cache {path} (books is not title -> text): delete it")
    return books


def books_from_rdb(rdb: str | os.PathLike[str]) -> dict[str, str]:
    """``janeaustenr``'s ``Rdata.rdb`` as title -> text, in publication order."""
    vectors = read_rdb(rdb)
    books = {}
    order = [n for n in AUSTEN_TITLES if n in vectors] + [
        n for n in vectors if n not in AUSTEN_TITLES
    ]
    for name in order:
        lines = ["" if line is None else line for line in vectors[name]]
        if not lines:
            raise KVSlimError(f"{rdb}: book {name!r} is empty")
        title = AUSTEN_TITLES.get(name) or lines[0].strip().title()
        if lines[0].strip().casefold() != title.casefold():
            raise KVSlimError(f"{rdb}: book {name!r} starts with {lines[0]!r}, not its title")
        books[title] = "\n".join(lines)
    return books


def _fetch_books(target: Path) -> tuple[dict[str, str], str]:
    """Download the .deb into a temp dir, unpack it without installing, decode the books."""
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        lacking = "apt-get" if apt is None else "dpkg-deb"
        raise KVSlimError(
            f"the Austen corpus comes from Debian's {DEB_PACKAGE} package, fetched with apt-get "
            f"and unpacked with dpkg-deb, and this system lacks {lacking}: "
            f"run on Debian/Ubuntu, or copy an {CORPUS_FILE} made there to {target}"
        )
    with tempfile.TemporaryDirectory(prefix="kvslim_fx-austen-") as tmp:
        work = Path(tmp)
        result = _apt_download(apt, work)
        if result.returncode != 0 and _needs_update(result.stderr) and _is_root():
            # A fresh Debian image has no package lists yet; one update fixes that.
            print("kvslim_fx: apt-get update (no package lists yet)...", file=sys.stderr)
            _run([apt, "update"], work)
            result = _apt_download(apt, work)
        if result.returncode != 0:
            fix = (
                "run `sudo apt-get update` first"
                if _needs_update(result.stderr)
                else "check that the Debian archive is reachable (network, proxy, apt sources)"
            )
            raise KVSlimError(
                f"`apt-get download {DEB_PACKAGE}` failed ({_last_line(result)}): {fix}, "
                f"or copy an {CORPUS_FILE} made elsewhere to {target}"
            )
        debs = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))
        if not debs:
            raise KVSlimError(f"`apt-get download {DEB_PACKAGE}` succeeded but left no .deb")
        unpacked = _run([dpkg, "-x", str(debs[0]), str(work / "root")], work)
        if unpacked.returncode != 0:
            raise KVSlimError(f"`dpkg-deb -x {debs[0].name}` failed: {_last_line(unpacked)}")
        rdbs = sorted((work / "root").rglob("janeaustenr/data/Rdata.rdb"))
        if not rdbs:
            raise KVSlimError(f"{debs[0].name} holds no janeaustenr/data/Rdata.rdb")
        return books_from_rdb(rdbs[0]), debs[0].name


def _apt_download(apt: str, work: Path) -> subprocess.CompletedProcess[str]:
    return _run([apt, "download", DEB_PACKAGE], work)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        return subprocess.CompletedProcess(cmd, 1, "", f"E: {err}")


def _needs_update(stderr: str) -> bool:
    return "Unable to locate package" in stderr or "no installation candidate" in stderr


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (result.stderr or result.stdout or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or [f"exit status {result.returncode}"])[-1].strip()
