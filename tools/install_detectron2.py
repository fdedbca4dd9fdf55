#!/usr/bin/env python
"""Install detectron2 v0.6's Python package without compiling anything.

PyPI serves no official detectron2. ``pb1-detectron2==0.6`` is an sdist whose ``detectron2/`` tree
is
the official v0.6 release, but it ships no C++/CUDA sources, so ``pip install`` of it fails. This
script copies that tree into the current interpreter's site-packages and records it as the
distribution ``detectron2 0.6`` (so ``pip show``/``pip uninstall detectron2`` work).

* If ``import detectron2`` already works (for example a build from source), nothing is touched.
* The sdist is pinned by version and by the SHA-256 recorded below; a mismatch aborts.
* Offline use (a GPU node without a package index): ``--sdist PATH`` or ``$RESIM_D2_SDIST`` names a
  local copy of the sdist; ``--download-only DIR`` fetches it on a connected machine.

The compiled-op gaps and library drift are handled at import time by ``resim_d2.compat``.
"""

import argparse
import hashlib
import html.parser
import importlib.util
import os
import shutil
import sys
import sysconfig
import tarfile
import tempfile
import urllib.parse
import urllib.request

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
DEFAULT_INDEX = "https://pypi.org/simple"


class _LinkParser(html.parser.HTMLParser):
    """Collects the href of every <a> in a PEP 503 simple-index page."""

    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.extend(v for k, v in attrs if k == "href")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path):
    digest = sha256_of(path)
    if digest != SDIST_SHA256:
        raise SystemExit(
            f"{path}: SHA-256 is {digest}, expected {SDIST_SHA256} for {SDIST_FILE}; "
            "refusing to install"
        )


def index_urls():
    """The package indexes pip would use: $PIP_INDEX_URL (or pypi.org) then $PIP_EXTRA_INDEX_URL."""
    urls = [os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX)]
    urls += os.environ.get("PIP_EXTRA_INDEX_URL", "").split()
    return [u for u in urls if u.startswith(("http://", "https://"))]


def download(dest_dir):
    """Fetch the pinned sdist from the first index that lists it; returns the local path."""
    os.makedirs(dest_dir, exist_ok=True)
    target = os.path.join(dest_dir, SDIST_FILE)
    if os.path.isfile(target) and sha256_of(target) == SDIST_SHA256:
        return target
    errors = []
    for index in index_urls():
        page = f"{index.rstrip('/')}/{SDIST_NAME}/"
        try:
            with urllib.request.urlopen(page, timeout=60) as r:
                parser = _LinkParser()
                parser.feed(r.read().decode("utf-8", "replace"))
        except OSError as e:
            errors.append(f"{page}: {e}")
            continue
        for href in parser.links:
            url = urllib.parse.urljoin(page, href)
            if urllib.parse.urlparse(url).path.endswith("/" + SDIST_FILE):
                tmp = target + ".part"
                with urllib.request.urlopen(url.split("#")[0], timeout=300) as r, open(
                    tmp, "wb"
                ) as f:
                    shutil.copyfileobj(r, f)
                verify(tmp)
                os.replace(tmp, target)
                return target
        errors.append(f"{page}: no link to {SDIST_FILE}")
    raise SystemExit(
        "could not download " + SDIST_FILE + ":\n  " + "\n  ".join(errors) + "\n"
        "On an offline machine pass --sdist PATH (or set RESIM_D2_SDIST) to a copy of the sdist."
    )


def install_tree(sdist, site_dir):
    """Copy ``detectron2/`` from the sdist into ``site_dir`` and write its dist-info."""
    prefix = f"{SDIST_NAME}-{SDIST_VERSION}/detectron2/"
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(sdist) as tar:
        members = [
            m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())
        ]
        if not members:
            raise SystemExit(f"{sdist}: holds no '{prefix}' tree; is this the {SDIST_FILE} sdist?")
        tar.extractall(tmp, members=members, filter="data")
        dest = os.path.join(site_dir, "detectron2")
        if os.path.exists(dest):
            shutil.rmtree(dest)
        shutil.copytree(os.path.join(tmp, prefix), dest)
    dist_info = os.path.join(site_dir, f"detectron2-{SDIST_VERSION}.dist-info")
    os.makedirs(dist_info, exist_ok=True)
    with open(os.path.join(dist_info, "METADATA"), "w") as f:
        f.write(
            "Metadata-Version: 2.1\nName: detectron2\nVersion: 0.6\n"
            f"Summary: detectron2 v0.6 Python tree from {SDIST_FILE} (no compiled ops)\n"
        )
    with open(os.path.join(dist_info, "INSTALLER"), "w") as f:
        f.write("resim_d2\n")
    record = []
    for root, _, files in os.walk(dest):
        record += [os.path.relpath(os.path.join(root, n), site_dir) + ",," for n in files]
    record += [
        os.path.relpath(os.path.join(dist_info, n), site_dir) + ",,"
        for n in ("METADATA", "INSTALLER", "RECORD")
    ]
    with open(os.path.join(dist_info, "RECORD"), "w") as f:
        f.write("\n".join(record) + "\n")
    return dest


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sdist", default=os.environ.get("RESIM_D2_SDIST"), help="local copy of the sdist"
    )
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/resim_d2"))
    p.add_argument("--site-dir", default=sysconfig.get_paths()["purelib"], help="where to install")
    p.add_argument(
        "--download-only", metavar="DIR", help="only fetch and verify the sdist into DIR"
    )
    p.add_argument("--force", action="store_true", help="install even if detectron2 imports")
    args = p.parse_args(argv)

    if args.download_only:
        print(download(args.download_only))
        return 0
    if not args.force and importlib.util.find_spec("detectron2") is not None:
        spec = importlib.util.find_spec("detectron2")
        print(
            f"detectron2 already importable from {os.path.dirname(spec.origin)}; leaving it as is"
        )
        return 0
    sdist = args.sdist or download(args.cache_dir)
    verify(sdist)
    dest = install_tree(sdist, args.site_dir)
    print(f"installed detectron2 {SDIST_VERSION} (Python only) into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
