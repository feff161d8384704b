"""Build the native CPU scan kernel ahead of its first use: ``python -m modeling_minrnn.build_kernel``.

Otherwise the first forward on a CPU compiles it (~30 s, once per kernel source, torch installation and compiler),
which a CI job, a Docker image or a timed run would rather do up front. The build goes to a folder of its own under
``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``), which models loaded from the Hub with
``trust_remote_code=True`` share: same kernel source, same build. Exits 0 with the library's path when the kernel is
ready (built now or already cached), 1 with the reason on one line when it cannot be built.

Not imported by the package, so not part of the remote code a checkpoint ships.
"""

import argparse
import sys

from . import scan_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_minrnn.build_kernel", description=__doc__.split("\n\n")[0].split(": ")[0] + "."
    )
    parser.parse_args(argv)
    try:
        scan_cpu.load_kernel()
    except scan_cpu.KernelUnavailable as error:
        if scan_cpu.unavailable_reason() is None:  # disabled: nothing was logged yet
            print(f"error: {error}; unset it to build the kernel", file=sys.stderr)
        return 1  # a failed build has logged its one line
    print(f"native CPU scan kernel ready: {scan_cpu.library_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
