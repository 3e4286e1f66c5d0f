"""Random training subsets for the LDS: stratified, seeded, and split into tuning and reported.

Subset m of role r is drawn from a generator seeded by (seed, r, m) alone, so asking for more
subsets later adds new ones and never changes the ones already trained. Each subset holds
round(alpha * n_c) images of every stratum c (artist), so every subset keeps the artists'
proportions and the datamodel does not mostly learn "how many noto images were in".

Two roles: ``tune`` subsets choose lambda (and any other knob); ``report`` subsets give the
published numbers. Never tune on what you report.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dtrak_core.evaluation.units import RECORD_CHECKSUM, CorruptUnitError, corrupt_message, write_atomic
from dtrak_core.io import sha256_json
from dtrak_core.seeds import experiment_seed

ROLES = ("tune", "report")
SUBSETS_FILE = "subsets.json"
#: Fault point of the subsets file's write.
SUBSETS_POINT = "lds.subsets"


@dataclass(frozen=True)
class Subset:
    """One training subset: ``indices`` into the model's training set (sorted)."""

    name: str          # "tune-003", "report-017"
    role: str          # "tune" or "report"
    number: int        # m within its role
    indices: tuple[int, ...]

    def mask(self, num_train: int) -> np.ndarray:
        """Membership as a bool vector (n,)."""
        out = np.zeros(num_train, dtype=bool)
        out[list(self.indices)] = True
        return out


def stratified_subset(strata: Sequence[str], alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices holding round(alpha * n_c) members of every stratum c (at least one each)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"subset fraction alpha={alpha} must be strictly between 0 and 1")
    labels = np.asarray([str(s) for s in strata])
    if len(labels) < 2:
        raise ValueError(f"subsets need a training set of at least 2 images, got {len(labels)}")
    chosen = []
    # Strata in sorted order: the draw must not depend on the order the labels first appear in.
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        size = max(1, int(round(alpha * len(members))))
        chosen.append(rng.choice(members, size=min(size, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def draw_subsets(strata: Sequence[str], num_subsets: int, alpha: float = 0.5, seed: int = 0,
                 role: str = "report") -> list[Subset]:
    """``num_subsets`` stratified subsets of one role; subset m depends on (seed, role, m) only."""
    if role not in ROLES:
        raise ValueError(f"subset role {role!r} is not one of {list(ROLES)}")
    if num_subsets < 0:
        raise ValueError(f"number of subsets {num_subsets} must be >= 0")
    subsets = []
    for m in range(num_subsets):
        rng = np.random.default_rng(experiment_seed("lds-subset", seed, role, m))
        subsets.append(Subset(f"{role}-{m:03d}", role, m, tuple(int(i) for i in stratified_subset(strata, alpha, rng))))
    return subsets


@dataclass
class SubsetPlan:
    """All subsets of an LDS build and how they were drawn (``subsets.json``)."""

    num_train: int
    alpha: float
    seed: int
    stratify_column: str | None
    subsets: list[Subset] = field(default_factory=list)

    def by_role(self, role: str) -> list[Subset]:
        return [s for s in self.subsets if s.role == role]

    def masks(self, role: str) -> np.ndarray:
        """(M_role, n) bool membership matrix of one role, in subset order."""
        chosen = self.by_role(role)
        if not chosen:
            return np.zeros((0, self.num_train), dtype=bool)
        return np.stack([s.mask(self.num_train) for s in chosen])

    def get(self, name: str) -> Subset:
        for s in self.subsets:
            if s.name == name:
                return s
        raise KeyError(f"no subset named {name!r}")

    def to_dict(self) -> dict:
        return {"num_train": self.num_train, "alpha": self.alpha, "seed": self.seed,
                "stratify_column": self.stratify_column,
                "subsets": [{**asdict(s), "indices": list(s.indices)} for s in self.subsets]}

    @classmethod
    def from_dict(cls, data: dict) -> "SubsetPlan":
        subsets = [Subset(s["name"], s["role"], int(s["number"]), tuple(int(i) for i in s["indices"]))
                   for s in data["subsets"]]
        return cls(int(data["num_train"]), float(data["alpha"]), int(data["seed"]), data.get("stratify_column"),
                   subsets)

    def text(self, checksum: bool = True) -> str:
        """``subsets.json``: one subset per line (compact, and a new subset is a one-line diff); the
        head holds ``record_sha256`` of :meth:`to_dict` (``checksum=False``: the format from before
        checksums)."""
        data = self.to_dict()
        head = {k: v for k, v in data.items() if k != "subsets"}
        if checksum:
            head[RECORD_CHECKSUM] = sha256_json(data)
        rows = ",\n".join(json.dumps(s, separators=(",", ":")) for s in data["subsets"])
        return json.dumps(head, sort_keys=True)[:-1] + ', "subsets": [\n' + rows + "\n]}\n"

    def save(self, folder: str | Path) -> Path:
        """Write ``subsets.json`` atomically (the caller holds the build lock)."""
        path = Path(folder) / SUBSETS_FILE
        data = self.text().encode()
        write_atomic(path, lambda tmp: tmp.write_bytes(data), SUBSETS_POINT)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "SubsetPlan":
        """The stored plan, verified: the file must be exactly :meth:`text` of what it holds, and
        match its checksum (a file from before checksums: the old format); else a
        :class:`~dtrak_core.evaluation.units.CorruptUnitError`."""
        path = Path(folder) / SUBSETS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run 'lds build' first")
        raw = path.read_text()
        redo = "run 'lds build' again to write it again"
        try:
            data = json.loads(raw)
            plan = cls.from_dict(data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise CorruptUnitError(f"{path} is not a subsets file (torn or changed after it was written); "
                                   f"{redo}") from None
        has_checksum = RECORD_CHECKSUM in data
        if plan.text(checksum=has_checksum) != raw or (has_checksum and data[RECORD_CHECKSUM] != sha256_json(
                plan.to_dict())):
            raise CorruptUnitError(corrupt_message(path, redo))
        return plan


def make_plan(strata: Sequence[str], num_report: int, num_tune: int, alpha: float = 0.5, seed: int = 0,
              stratify_column: str | None = "artist") -> SubsetPlan:
    """Tuning and reported subsets of one training set (tuning first, then reported)."""
    subsets = draw_subsets(strata, num_tune, alpha, seed, "tune") + draw_subsets(strata, num_report, alpha, seed, "report")
    return SubsetPlan(len(strata), alpha, seed, stratify_column, subsets)
