"""Download tinyshakespeare, the character-level corpus of `configs/shakespeare_char.yaml`.

    python scripts/download_tinyshakespeare.py                  # -> data/tinyshakespeare.txt
    python scripts/download_tinyshakespeare.py --out corpus.txt

Karpathy's char-rnn file (1,115,394 characters of Shakespeare's plays, the paper's and nanoGPT's
`shakespeare_char` data) from its public URL, checked against its size and SHA-256 before it is
written; offline, one line says what to do instead.
"""

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SIZE = 1_115_394
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_OUT = Path("data") / "tinyshakespeare.txt"


def _intact(data: bytes) -> bool:
    return len(data) == SIZE and hashlib.sha256(data).hexdigest() == SHA256


def download(out: Path = DEFAULT_OUT, url: str = URL, timeout: float = 30.0) -> Path:
    """`out` holding the corpus (kept when already there and intact); raises SystemExit with one line on failure."""
    if out.is_file() and _intact(out.read_bytes()):
        return out
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SystemExit(f"error: could not download {url} ({reason}); fetch it with a browser or curl on a machine "
                         f"online, save it as {out}, or give pretrain.py --dataset a local copy") from None
    if not _intact(data):
        raise SystemExit(f"error: {url} gave {len(data):,} bytes that are not tinyshakespeare ({SIZE:,} bytes, "
                         f"sha256 {SHA256[:12]}...); nothing written")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, out)  # never a half-written corpus under the final name
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the corpus")
    parser.add_argument("--url", default=URL, help="where to download it from (a mirror)")
    args = parser.parse_args(argv)
    path = download(args.out, args.url)
    print(f"{path}: tinyshakespeare, {SIZE:,} characters", file=sys.stdout)


if __name__ == "__main__":
    main()
