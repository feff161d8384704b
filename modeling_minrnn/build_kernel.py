"""Build the native CPU scan kernel ahead of its first use: ``python -m modeling_minrnn.build_kernel``.

Otherwise the first forward on a CPU compiles it (~30 s, once per machine, torch version and kernel source), which
a CI job, a Docker image or a timed run would rather do up front. The build goes to torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), which models loaded from the Hub with
``trust_remote_code=True`` share: same kernel source, same build. Exits 0 with the library's path when the kernel is
ready (built now or already cached), 1 with the reason on one line when it cannot be built.

Not imported by the package, so not part of the remote code a checkpoint ships.
"""

import argparse
import os
import sys

from . import scan_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_minrnn.build_kernel", description=__doc__.split("\n\n")[0].split(": ")[0] + "."
    )
    parser.parse_args(argv)
    disabled = os.environ.get(scan_cpu._DISABLE_ENV, "0")
    if disabled not in ("", "0"):
        print(f"error: {scan_cpu._DISABLE_ENV}={disabled} disables the native CPU scan; unset it to build the kernel",
              file=sys.stderr)
        return 1
    if scan_cpu._load_ops() is None:  # the reason is the one warning line _load_ops has logged
        return 1
    print(f"native CPU scan kernel ready: {scan_cpu._cached_library(scan_cpu._extension_name())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
