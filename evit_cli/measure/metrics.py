"""The fidelity and accuracy measures, declared once, and the typed row that carries them.

:data:`METRICS` is the one list of what an evaluation measures: its key (in the rows and the JSON
reports), its column title, its format, whether more is better, and how a line of text says it.
The tables of `evit eval` and `evit sweep`, the rows of a sweep, the settings a search scores and
the fine-tune's validation line all read it. :class:`FidelityRow` is one model's measures on one
set of images (None where a measure does not apply: no labels, a headless model, the reference itself).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .fidelity import NEIGHBOURS


@dataclass(frozen=True)
class Metric:
    key: str  # in FidelityRow, in the rows and in the JSON reports
    title: str  # the column title in tables
    fmt: str  # how a value is written: "{:.2f}"
    higher_is_better: bool
    says: str  # in a line of text: {v} is the formatted value, {ref} what the model is compared with
    against_reference: bool  # measured against the reference model's outputs (else: against labels)
    column: bool = True  # shown as a column in the eval and sweep tables (and carried by sweep rows)

    def format(self, value: float) -> str:
        return self.fmt.format(value)

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is better than ``b``."""
        return a > b if self.higher_is_better else a < b


METRICS: tuple[Metric, ...] = (
    Metric("agreement", "agreement (%)", "{:.2f}", True, "agreement with {ref} {v}%", True),
    Metric("kl", "KL(dense‖EViT)", "{:.4f}", False, "KL {v}", True),
    Metric("cosine", "cosine", "{:.4f}", True, "cosine to {ref}'s embedding {v}", True),
    Metric("neighbour_overlap", f"{NEIGHBOURS}-NN overlap (%)", "{:.2f}", True, f"{NEIGHBOURS}-NN overlap {{v}}%",
           True),
    Metric("knn_top1", "kNN top-1 (%)", "{:.2f}", True, "kNN top-1 {v}%", False),
    Metric("top1", "top-1 (%)", "{:.2f}", True, "top-1 {v}%", False),
    Metric("top5", "top-5 (%)", "{:.2f}", True, "top-5 {v}%", False),
    Metric("val_loss", "loss", "{:.4f}", False, "val loss {v}", False, column=False),
)
COLUMNS: tuple[Metric, ...] = tuple(m for m in METRICS if m.column)  # the measures the tables and sweep rows show
BY_KEY = {m.key: m for m in METRICS}


@dataclass
class FidelityRow:
    """One model's measures on one set of images (see :mod:`.fidelity` for their definitions);
    None where a measure does not apply. ``gmacs`` and ``images_per_s`` are filled by a report that
    counts or times the model."""

    name: str
    images: int = 0
    agreement: float | None = None  # % of images with the reference's top-1 class
    kl: float | None = None  # KL(reference || model) per image
    cosine: float | None = None  # a headless model: cosine to the reference's embedding
    neighbour_overlap: float | None = None  # a headless model: % of shared nearest neighbours
    knn_top1: float | None = None  # a headless model with labels: leave-one-out kNN top-1 (%)
    top1: float | None = None  # a classifier with labels (%)
    top5: float | None = None
    val_loss: float | None = None  # cross-entropy with the labels
    labelled_images: int | None = None
    gmacs: float | None = None
    images_per_s: float | None = None

    @classmethod
    def from_dict(cls, name: str, values: dict) -> FidelityRow:
        """A row from a dict of measures (keys that are not fields are left out)."""
        names = {f.name for f in fields(cls)} - {"name"}
        return cls(name, **{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        """The measures that apply (None left out), as the JSON reports write them; without the name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "name" and getattr(self, f.name) is not None}

    def metrics(self, columns_only: bool = True) -> dict:
        """The declared measures that apply: :data:`COLUMNS` (or all of :data:`METRICS`), in their order."""
        return {m.key: getattr(self, m.key) for m in (COLUMNS if columns_only else METRICS)
                if getattr(self, m.key) is not None}


def column_values(values: dict) -> dict:
    """The :data:`COLUMNS` measures in a dict of values (a tally's result, a scored setting), in their order."""
    return {m.key: values[m.key] for m in COLUMNS if m.key in values}


def _values(row: FidelityRow | dict) -> dict:
    return row.to_dict() if isinstance(row, FidelityRow) else row


def present(rows) -> list[Metric]:
    """The table columns that some row (a :class:`FidelityRow` or a dict) has, in the declared order."""
    values = [_values(r) for r in rows]
    return [m for m in COLUMNS if any(v.get(m.key) is not None for v in values)]


def cells(row: FidelityRow | dict, columns: list[Metric]) -> list[str]:
    """``row``'s values in ``columns``, formatted; '-' where it has none (the reference itself)."""
    v = _values(row)
    return [m.format(v[m.key]) if v.get(m.key) is not None else "-" for m in columns]


def describe(row: FidelityRow | dict, reference: str = "the teacher") -> str:
    """The measures in one line, the ones against ``reference`` first, then the ones against labels;
    a dict's ``keep_rate``, ``images`` and ``split`` (a fine-tune's validation) close it:
    "agreement with the teacher 91.20%, KL 0.0312; top-1 80.00%, top-5 95.00%, val loss 0.7000;
    keep 0.700 (250 images: split 'validation')"."""
    v = _values(row)
    parts = []
    for against in (True, False):
        said = [m.says.format(v=m.format(v[m.key]), ref=reference) for m in METRICS
                if m.against_reference is against and v.get(m.key) is not None]
        if said:
            parts.append(", ".join(said))
    if "keep_rate" in v:
        where = f" ({v['images']} images: {v['split']})" if "split" in v else f" ({v.get('images', 0)} images)"
        rates = v["keep_rate"] if isinstance(v["keep_rate"], (list, tuple)) else [v["keep_rate"]]
        parts.append(f"keep {','.join(f'{r:.3f}' for r in rates)}{where}")
    return "; ".join(parts)
