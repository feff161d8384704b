"""The paper's two cells: minGRU and minLSTM gates, computed from the input only, in log space.

Both hand the recurrence `h_t = a_t * h_{t-1} + b_t` (`scan.py`) its coefficients as `(log_a, log_b)`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log of the paper's positive activation `g(x) = x + 0.5 if x >= 0 else sigmoid(x)`."""
    # clamp, not relu: its gradient at exactly 0 is 1, the right-hand derivative of g.
    return torch.where(x >= 0, (x.clamp(min=0) + 0.5).log(), -F.softplus(-x))


def mingru_log_gates(k: torch.Tensor, h_tilde: torch.Tensor):
    """minGRU: `h_t = (1 - z_t) h_{t-1} + z_t g(h~_t)` with `z_t = sigmoid(k_t)`. Returns `(log_a, log_b)`."""
    log_coeffs = -F.softplus(k)  # log(1 - z)
    log_z = log_coeffs + k  # -softplus(-k), one pass cheaper: softplus(k) - softplus(-k) = k
    return log_coeffs, log_z + log_g(h_tilde)


def minlstm_log_gates(f: torch.Tensor, i: torch.Tensor, h_tilde: torch.Tensor):
    """minLSTM: `h_t = f'_t h_{t-1} + i'_t g(h~_t)` with the normalised gates `f' = f / (f + i)`, `i' = i / (f + i)`.

    `log f' = -softplus(log i - log f)` and `log i' = -softplus(log f - log i)`, where `log f - log i` equals
    `softplus(-i) - softplus(-f)` for sigmoid gates. Returns `(log_a, log_b)`.
    """
    diff = F.softplus(-f) - F.softplus(-i)  # log i - log f
    log_f = -F.softplus(diff)
    log_i = -F.softplus(-diff)
    return log_f, log_i + log_g(h_tilde)


@dataclass(frozen=True)
class Cell:
    name: str  # as the paper writes it
    projections: int  # input projections the gates and the candidate are computed from
    log_gates: Callable  # projections, chunked -> (log_a, log_b)


# The one list of cells: the config, the kernels, the scripts and the model card read it.
CELLS = {"mingru": Cell("minGRU", 2, mingru_log_gates), "minlstm": Cell("minLSTM", 3, minlstm_log_gates)}
CELL_TYPES = tuple(CELLS)
