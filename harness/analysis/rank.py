"""Rank of a weight change: singular values, energy rank and stable rank, in float64.

A fine-tuning update that lives in a few directions (as LoRA forces, and full fine-tuning
often finds) has a small energy rank; stable rank is its smooth, noise-robust cousin.
"""

from __future__ import annotations

import torch

# σ² below this fraction of σ_max² counts as zero: float64 SVD leaves ~1e-16·σ_max noise
# in the null space, which would otherwise make energy=1.0 return the full size.
REL_TOL = 1e-12


def singular_values(delta) -> torch.Tensor:
    """Singular values of a 2-D matrix, in float64, largest first."""
    x = torch.as_tensor(delta).detach()
    if x.ndim != 2:
        raise ValueError(
            f"rank needs a matrix (2-D tensor), got a {x.ndim}-D tensor of shape {tuple(x.shape)}; "
            "vectors such as biases and norms have no rank to speak of"
        )
    if x.numel() == 0:
        raise ValueError(f"rank needs a non-empty matrix, got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("matrix has non-finite entries (NaN or inf); its singular values are undefined")
    return torch.linalg.svdvals(x)


def _energies(delta) -> torch.Tensor:
    """σ², with those below REL_TOL·σ_max² set to exactly zero."""
    s2 = singular_values(delta) ** 2
    top = s2[0]
    return torch.where(s2 > REL_TOL * top, s2, torch.zeros_like(s2))


def energy_rank(delta, energy: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold at least `energy` of Σσ²; 0 for a zero matrix.

    `energy` in (0, 1]. energy=1.0 gives the numerical rank (σ² ≤ 1e-12·σ_max² counts as zero).
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (0 < energy <= 1):
        raise ValueError(f"energy must be a fraction in (0, 1], got {energy!r}")
    s2 = _energies(delta)
    cum = torch.cumsum(s2, dim=0)
    total = cum[-1]  # the same sum cumsum ends on, so energy=1.0 is reached exactly
    if total.item() == 0:
        return 0
    # a relative slack of 1e-12 keeps a share that is exactly `energy` on paper from missing by rounding
    threshold = energy * total * (1 - 1e-12)
    return int(torch.searchsorted(cum, threshold).item()) + 1


def stable_rank(delta) -> float:
    """‖Δ‖_F² / σ_max²: between 1 and the rank for a non-zero matrix; 0 for a zero matrix."""
    s2 = singular_values(delta) ** 2
    top = s2[0].item()
    if top == 0:
        return 0.0
    return s2.sum().item() / top
