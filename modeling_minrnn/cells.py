"""The paper's two cells: minGRU and minLSTM gates, computed from the input only.

Both hand the recurrence `h_t = a_t * h_{t-1} + b_t` (`scan.py`) its coefficients as `(log_a, log_b)`, the stable
form for a scan over many tokens. One token needs no scan: `step_gates` gives `(a, b)` directly, with no log, exp or
branch (which a graph for a runtime such as XNNPACK would run outside its fast kernels).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log of the paper's positive activation `g(x) = x + 0.5 if x >= 0 else sigmoid(x)`."""
    # clamp, not relu: its gradient at exactly 0 is 1, the right-hand derivative of g.
    return torch.where(x >= 0, (x.clamp(min=0) + 0.5).log(), -F.softplus(-x))


def g(x: torch.Tensor) -> torch.Tensor:
    """The paper's `g(x) = x + 0.5 if x >= 0 else sigmoid(x)`, branch-free: `relu(x) + sigmoid(min(x, 0))`."""
    return x.clamp(min=0) + torch.sigmoid(x.clamp(max=0))


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


def mingru_step_gates(k: torch.Tensor, h_tilde: torch.Tensor):
    """`mingru_log_gates` for one token, in linear space: `(a, b) = (1 - z, z g(h~))`."""
    return torch.sigmoid(-k), torch.sigmoid(k) * g(h_tilde)  # sigmoid(-k), not 1 - z: exact where z is near 1


def minlstm_step_gates(f: torch.Tensor, i: torch.Tensor, h_tilde: torch.Tensor):
    """`minlstm_log_gates` for one token, in linear space: `(a, b) = (f', i' g(h~))`, `f' = f / (f + i)`."""
    f, i = torch.sigmoid(f), torch.sigmoid(i)
    total = f + i
    return f / total, i / total * g(h_tilde)


@dataclass(frozen=True)
class Cell:
    name: str  # as the paper writes it
    projections: int  # input projections the gates and the candidate are computed from
    log_gates: Callable  # projections, chunked -> (log_a, log_b)
    step_gates: Callable  # projections of one token, chunked -> (a, b)


# The one list of cells: the config, the kernels, the scripts and the model card read it.
CELLS = {
    "mingru": Cell("minGRU", 2, mingru_log_gates, mingru_step_gates),
    "minlstm": Cell("minLSTM", 3, minlstm_log_gates, minlstm_step_gates),
}
CELL_TYPES = tuple(CELLS)
