"""The corpus reader and the model resolver, offline: no .deb, no model, no network.

R data files are made here by a tiny XDR R-serialization writer, so the reader is checked
against the format itself; apt-get and dpkg-deb are stand-in scripts on PATH.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import stat
import struct
import sys
import zlib
from pathlib import Path

import pytest

from kvslim_fx.errors import KVSlimError
from kvslim_fx.eval import corpus, default_model

# --- a minimal R serializer: the inverse of what corpus.unserialize reads ---

NIL, SYM, LIST, CHAR, LGL, INT, STR, VEC, REF = 254, 1, 2, 9, 10, 13, 16, 19, 255
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
ASCII, UTF8, LATIN1 = 1 << 6, 1 << 3, 1 << 2


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


class RWriter:
    """Writes one object; like R, a symbol's second use is a back-reference into a table."""

    def __init__(self) -> None:
        self.symbols: list[str] = []

    def charsxp(self, s: str | None, latin1: bool = False) -> bytes:
        if s is None:
            return i32(CHAR, -1)
        if latin1:
            raw, level = s.encode("latin-1"), LATIN1
        else:
            raw, level = s.encode(), ASCII if s.isascii() else UTF8
        return i32(CHAR | level << 12, len(raw)) + raw

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:
            return i32((self.symbols.index(name) + 1) << 8 | REF)
        self.symbols.append(name)
        return i32(SYM) + self.charsxp(name)

    def attributes(self, attrs: dict[str, bytes]) -> bytes:
        out = b""
        for tag, value in attrs.items():
            out += i32(LIST | HAS_TAG) + self.symbol(tag) + value
        return out + i32(NIL)

    def vector(self, kind: int, body: bytes, n: int, attrs: dict[str, bytes] | None) -> bytes:
        # R writes a vector's attributes after its items, so they are built after them too.
        head = i32(kind | (HAS_ATTR if attrs else 0), n)
        return head + body + (self.attributes(attrs) if attrs else b"")

    def strsxp(self, items: list[str | None], names: list[str] | None = None, **attrs) -> bytes:
        body = b"".join(self.charsxp(s) for s in items)
        return self.vector(STR, body, len(items), self._attrs(names, attrs))

    def intsxp(self, items: list[int], kind: int = INT) -> bytes:
        return self.vector(kind, i32(*items), len(items), None)

    def vecsxp(self, items: dict[str, bytes]) -> bytes:
        # Named list: its item bytes are already written, so their symbols come first.
        body = b"".join(items.values())
        return self.vector(VEC, body, len(items), self._attrs(list(items), {}))

    def _attrs(self, names: list[str] | None, extra: dict[str, list[str]]) -> dict[str, bytes]:
        attrs = {} if names is None else {"names": names}
        return {k: self.strsxp(v) for k, v in {**attrs, **extra}.items()}


def serialize(body: bytes, version: int = 3) -> bytes:
    head = b"X\n" + i32(version, 0x040201, 0x030500 if version == 3 else 0x020300)
    return head + (i32(5) + b"UTF-8" if version == 3 else b"") + body


def write_rdb(path: Path, vectors: dict[str, bytes], version: int = 3) -> None:
    """``vectors`` (name -> serialized-object body) as a zlib lazy-load .rdb and its .rdx."""
    blob, where = b"", {}
    for name, body in vectors.items():
        data = serialize(body, version)
        record = struct.pack(">I", len(data)) + zlib.compress(data)
        where[name] = (len(blob), len(record))
        blob += record
    path.write_bytes(blob)
    w = RWriter()
    # The .rdx lists are built innermost first, as R writes them.
    variables = w.vecsxp({name: w.intsxp(list(span)) for name, span in where.items()})
    references = w.vector(VEC, b"", 0, {"names": w.strsxp([])})
    index = w.vecsxp(
        {"variables": variables, "references": references, "compressed": w.intsxp([1], LGL)}
    )
    path.with_suffix(".rdx").write_bytes(gzip.compress(serialize(index, version)))


# --- the reader ---

TRICKY = ["naïve café", "", None, "☃ — 😀", "  spaced  ", "plain"]


@pytest.mark.parametrize("version", [2, 3])
def test_read_rdb_round_trips_unicode_empty_and_na(tmp_path: Path, version: int) -> None:
    w = RWriter()
    latin1 = i32(STR, 2) + w.charsxp("Åland £5", latin1=True) + w.charsxp("x")
    write_rdb(
        tmp_path / "Rdata.rdb",
        {"tricky": w.strsxp(TRICKY), "empty": w.strsxp([]), "latin": latin1},
        version,
    )
    got = corpus.read_rdb(tmp_path / "Rdata.rdb")
    assert got == {"tricky": TRICKY, "empty": [], "latin": ["Åland £5", "x"]}
    assert list(got) == ["tricky", "empty", "latin"]  # .rdx order kept


def test_read_rdx_decodes_the_index(tmp_path: Path) -> None:
    w = RWriter()
    write_rdb(tmp_path / "db.rdb", {"a": w.strsxp(["1"]), "b": w.strsxp(["2", "3"])})
    index = corpus.read_rdx(tmp_path / "db.rdx")
    blob = (tmp_path / "db.rdb").read_bytes()
    a, b = index["variables"]["a"], index["variables"]["b"]
    assert a[0] == 0 and a[0] + a[1] == b[0] and b[0] + b[1] == len(blob)
    assert index["references"] == {} and index["compressed"] == [True]


def test_named_character_vector_becomes_a_dict() -> None:
    w = RWriter()
    assert corpus.unserialize(serialize(w.strsxp(["x", None], names=["p", "q"]))) == {
        "p": "x",
        "q": None,
    }


def test_unsupported_objects_fail_clearly(tmp_path: Path) -> None:
    w = RWriter()
    factor_like = w.strsxp(["a"], names=None, **{"class": ["factor"]})
    with pytest.raises(KVSlimError, match=r"attributes \['class'\]"):
        corpus.unserialize(serialize(factor_like))
    with pytest.raises(KVSlimError, match="SEXP type 14"):  # a double vector
        corpus.unserialize(serialize(i32(14, 1) + struct.pack(">d", 1.5)))
    with pytest.raises(KVSlimError, match="only XDR"):
        corpus.unserialize(b"A\n" + serialize(b"")[2:])
    with pytest.raises(KVSlimError, match="ends early"):
        corpus.unserialize(serialize(w.strsxp(["abc"]))[:-2])
    write_rdb(tmp_path / "n.rdb", {"n": w.intsxp([1, 2])})
    with pytest.raises(KVSlimError, match="'n' is not a character vector"):
        corpus.read_rdb(tmp_path / "n.rdb")


# --- the corpus ---


def write_books(folder: Path) -> None:
    """A two-book stand-in for janeaustenr's Rdata.rdb, listed out of publication order."""
    w = RWriter()
    folder.mkdir(parents=True, exist_ok=True)
    write_rdb(
        folder / "Rdata.rdb",
        {
            "persuasion": w.strsxp(["Persuasion", "", "Chapter 1", None, "Finis"]),
            "emma": w.strsxp(["EMMA", "", "Emma Woodhouse, handsome, clever, and rich"]),
        },
    )


BOOKS = {
    "Emma": "EMMA\n\nEmma Woodhouse, handsome, clever, and rich",
    "Persuasion": "Persuasion\n\nChapter 1\n\nFinis",
}


def test_books_from_rdb_titles_and_joins_lines(tmp_path: Path) -> None:
    write_books(tmp_path)
    books = corpus.books_from_rdb(tmp_path / "Rdata.rdb")
    assert books == BOOKS
    assert list(books) == ["Emma", "Persuasion"]  # publication order, not file order


def test_austen_text_reads_the_cache_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(corpus, "_fetch_books", _no_fetch)
    (tmp_path / "corpus").mkdir()
    cached = {"source": "test", "books": {"Emma": "EMMA\n\nHandsome, clever, and rich."}}
    (tmp_path / "corpus" / "austen.json").write_text(json.dumps(cached))
    assert corpus.austen_text() == cached["books"]
    # An explicit cache_dir wins over the environment.
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "austen.json").write_text(json.dumps({"books": {"Persuasion": "P"}}))
    assert corpus.austen_text(other) == {"Persuasion": "P"}
    (other / "austen.json").write_text('{"books": ["not", "a", "dict"]}')
    with pytest.raises(KVSlimError, match="delete it"):
        corpus.austen_text(other)


def _no_fetch(target: Path) -> None:
    raise AssertionError(f"austen_text tried to download although {target} is cached")


def fake_tools(bindir: Path, apt_script: str, dpkg_script: str = "exit 1") -> None:
    for name, body in (("apt-get", apt_script), ("dpkg-deb", dpkg_script)):
        tool = bindir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)


@pytest.mark.skipif(sys.platform == "win32", reason="stand-in tools are shell scripts")
def test_austen_text_fetches_decodes_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "pkg"
    write_books(data)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    fake_tools(
        bindir,
        f'echo "apt-get $*" >> {log}; touch r-cran-janeaustenr_1.0.0-1_all.deb',
        f'dest="$3/usr/lib/R/site-library/janeaustenr/data"; mkdir -p "$dest"; '
        f'cp {data}/Rdata.rdb {data}/Rdata.rdx "$dest"',
    )
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    assert corpus.austen_text(cache) == BOOKS
    assert log.read_text() == "apt-get download r-cran-janeaustenr\n"
    saved = json.loads((cache / "austen.json").read_text())
    assert saved == {"source": "r-cran-janeaustenr_1.0.0-1_all.deb", "books": BOOKS}
    assert corpus.austen_text(cache) == BOOKS  # from the cache: apt-get is not called again
    assert log.read_text().count("\n") == 1


@pytest.mark.skipif(sys.platform == "win32", reason="stand-in tools are shell scripts")
def test_austen_text_names_the_fix_when_the_archive_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_tools(
        bindir,
        'echo "E: Failed to fetch http://deb.example/x.deb  Temporary failure resolving" >&2;'
        " exit 100",
    )
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(KVSlimError, match=r"Failed to fetch.*archive is reachable"):
        corpus.austen_text(tmp_path / "cache")
    assert not (tmp_path / "cache" / "austen.json").exists()


def test_austen_text_without_apt_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(KVSlimError, match=r"lacks apt-get.*austen.json"):
        corpus.austen_text(tmp_path)


# --- the default model ---


def test_resolve_model_rejects_bogus_paths(tmp_path: Path) -> None:
    with pytest.raises(KVSlimError, match=r"no model 'no/such/model'.*smollm2"):
        default_model.resolve_model("no/such/model")
    with pytest.raises(KVSlimError, match=r"no config.json"):
        default_model.resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert default_model.resolve_model(str(tmp_path)) == tmp_path


def test_default_model_uses_the_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))
    assert default_model.cache_root() == tmp_path
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "kvslim_fx_source.json").write_text("{}")  # a finished conversion
    monkeypatch.setattr(default_model, "convert_gguf", _no_convert)
    assert default_model.resolve_model(None) == folder
    assert default_model.resolve_model("SmolLM2") == folder


def _no_convert(gguf: Path, out: Path) -> None:
    raise AssertionError("converted although the cache holds a finished conversion")


def test_default_model_without_its_package_names_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))  # nothing cached here
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KVSlimError, match=re.escape(default_model.GGUF_PIP)):
        default_model.default_model_path()
