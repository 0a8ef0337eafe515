"""A 3D thorax/abdomen phantom, sampled slice by slice.

Ellipsoids in normalised coordinates (x, y, z in [-1, 1]; z runs from feet to
head), each with a tissue class. CT maps classes to Hounsfield units, MR to
T1-like intensities, so a viewer shows anatomy-like slices and a converter
builds a coherent volume. Pure numpy; no DICOM here.
"""

from __future__ import annotations

import numpy as np

# (cx, cy, cz, rx, ry, rz, tissue); later entries paint over earlier ones.
_ELLIPSOIDS = [
    (0.0, 0.0, 0.0, 0.86, 0.66, 1.30, "fat"),
    (0.0, 0.0, 0.0, 0.80, 0.60, 1.30, "muscle"),
    (-0.36, -0.04, 0.30, 0.28, 0.40, 0.75, "lung"),
    (0.36, -0.04, 0.30, 0.28, 0.40, 0.75, "lung"),
    (0.08, 0.10, 0.05, 0.22, 0.20, 0.30, "blood"),
    (-0.30, 0.02, -0.65, 0.42, 0.36, 0.38, "liver"),
    (0.40, 0.10, -0.70, 0.14, 0.20, 0.25, "kidney"),
    (-0.05, 0.30, 0.0, 0.06, 0.06, 1.40, "blood"),
    (0.0, 0.46, 0.0, 0.09, 0.09, 1.50, "bone"),
    (0.0, 0.46, 0.0, 0.04, 0.04, 1.50, "marrow"),
]

TISSUES = ["air", "fat", "muscle", "lung", "blood", "liver", "kidney", "bone", "marrow", "lesion"]
CT_HU = np.array([-1000, -100, 45, -850, 60, 70, 35, 900, 250, 110], dtype=np.float64)
MR_T1 = np.array([0, 900, 350, 40, 500, 450, 300, 80, 700, 800], dtype=np.float64)


def tissue_map(n: int, z: float, lesion: tuple[float, float, float, float]) -> np.ndarray:
    """Return an (n, n) array of tissue indices (into TISSUES) for the slice at height z."""
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    out = np.zeros((n, n), dtype=np.intp)
    lx, ly, lz, lr = lesion
    for cx, cy, cz, rx, ry, rz, tissue in [*_ELLIPSOIDS, (lx, ly, lz, lr, lr, lr, "lesion")]:
        dz = ((z - cz) / rz) ** 2
        if dz >= 1.0:
            continue
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0 - dz
        out[inside] = TISSUES.index(tissue)
    return out


def ct_slice(n: int, z: float, lesion, noise_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Hounsfield units of one axial slice (float)."""
    tissues = tissue_map(n, z, lesion)
    hu = CT_HU[tissues]
    if noise_hu > 0:  # quantum noise, weaker in air: CT then zips to 35-45 % of raw, as real CT
        hu += rng.normal(0.0, 1.0, size=hu.shape) * np.where(tissues != 0, noise_hu, noise_hu / 8)
    return hu


def mr_slice(n: int, z: float, lesion, noise: float, rng: np.random.Generator) -> np.ndarray:
    tissues = tissue_map(n, z, lesion)
    sig = MR_T1[tissues]
    # A smooth coil-sensitivity bias, as real MR has.
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    sig *= 1.0 - 0.15 * (x ** 2 + y ** 2)
    if noise > 0:
        sig += np.abs(rng.normal(0.0, noise, size=sig.shape))
    return sig
