"""Narrow filters for lines that dependencies print on import or export and that tell a minrnn user nothing.

Each filter drops one known message from one named logger (or one warning), with its cause beside it; anything
else those loggers say still shows. The import filters are installed when `modeling_minrnn` is imported, before it
imports transformers (transformers imports torchao whenever torchao is installed, which the `export` extra does).
"""

import contextlib
import logging
import warnings

# logger name -> the start of the messages dropped from it.
IMPORT_NOISE = {
    # torchao's wheel ships kernels built for CUDA and for other Pythons; loading them fails on a CPU machine, and
    # torchao says so on every import without any effect on what minrnn uses (its CPU quantization).
    "torchao": "Failed to load ",
    # torchao registers its enums with `register_constant`, which torch 2.13 deprecates, on every import.
    "torch.utils._pytree": "<enum ",
}
EXPORT_NOISE = {
    # The ONNX exporter registers torchvision's operators when it can, and says so when torchvision is absent.
    "torch.onnx._internal.exporter._registration": "torchvision is not installed",
}
# torch.export copies its own tree specs through a deprecated class (torch 2.13).
EXPORT_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _DropMessages(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def _add_filters(noise: dict[str, str]) -> list[tuple[logging.Logger, logging.Filter]]:
    added = []
    for name, start in noise.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.start == start for f in logger.filters):
            added.append((logger, _DropMessages(start)))
            logger.addFilter(added[-1][1])
    return added


def quiet_imports() -> None:
    """Drop the import-time lines of `IMPORT_NOISE` (idempotent)."""
    _add_filters(IMPORT_NOISE)


@contextlib.contextmanager
def quiet_export():
    """Within the block, drop the lines of `EXPORT_NOISE` and the warning `EXPORT_WARNING`."""
    added = _add_filters(EXPORT_NOISE)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=EXPORT_WARNING, category=FutureWarning)
            yield
    finally:
        for logger, log_filter in added:
            logger.removeFilter(log_filter)


quiet_imports()
