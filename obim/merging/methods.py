"""The methods registry: each merge method is an intra-model sparsifier composed with an inter-model combiner,
as in the paper's Table 7. Registering a new one here (or from user code) touches no driver code."""

from __future__ import annotations

from dataclasses import dataclass

from .combiners import (
    Choice,
    Combiner,
    Consensus,
    DisjointMean,
    FisherMean,
    IterativeMerging,
    LayerScaled,
    RegressionMean,
    SignWeightedMean,
    Slerp,
    Sum,
    TaskSingularVectors,
    WeightedMean,
)
from .context import Param, number_in
from .errors import ObimError
from .saliency import magnitude, saliency
from .sparsifiers import (
    Breadcrumbs,
    Keep,
    MagPrune,
    PCBBalance,
    RandomDrop,
    Rank,
    Sparsifier,
    TopK,
    VarianceSelect,
)


@dataclass(frozen=True)
class Method:
    name: str
    sparsifier: Sparsifier
    combiner: Combiner
    lam: float = 1.0  # default of `lambda`: θ = θ0 + λ·δM
    retention_param: str | None = None  # the parameter a model's `retention` key sets
    statistics: str | None = None  # the per-model statistics it merges with (statistics.KINDS): hdiag, gram, fisher
    doc: str = ""
    label: str = ""  # the paper's name of the method (tables, plots); the registry name when empty
    reference_url: str = ""  # the paper that defines it
    version: int = 1  # bump when this method's output changes for the same config (cached merges are keyed by it)

    def code_version(self) -> str:
        """What a merge of this method computes besides its config: the declared versions of the method and its
        parts (a cached merge is reused only under the same ones; a change elsewhere invalidates nothing)."""
        return f"{self.name}@{self.version}/{self.sparsifier.code_version()}/{self.combiner.code_version()}"

    @property
    def uses_saliency(self) -> bool:
        """Whether each model needs statistics from validation data (computed, or a file obim-saliency wrote)."""
        return self.statistics is not None

    @property
    def uses_kernels(self) -> bool:
        """Whether it selects or combines through obim.merging.kernels on CPU (their numba is then loaded on a
        thread of its own while a merge's first tensors are read)."""
        return self.sparsifier.uses_kernels or self.combiner.uses_kernels

    @property
    def max_models(self) -> int | None:
        """The most models a merge of this method takes (None: any number)."""
        return self.combiner.max_models

    @property
    def pretty_name(self) -> str:
        return self.label or self.name

    @property
    def params(self) -> tuple[Param, ...]:
        return (*self.sparsifier.params, *self.combiner.params, Param("lambda", self.lam, number_in(-1e9, 1e9)))

    def validate(self, params: list[dict], models: list[str]) -> str | None:
        return self.sparsifier.validate(params, models) or self.combiner.validate(params, models)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ObimError(f"method: unknown method '{name}'; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# The paper's Table 7 (plus Breadcrumbs): sparsifier | combiner.
register(
    Method("ta", Keep(), Sum(), doc="Task Arithmetic", label="TA", reference_url="https://arxiv.org/abs/2212.04089")
)
register(
    Method(
        "ties",
        TopK(magnitude, density=0.2),
        DisjointMean(),
        doc="TIES-Merging",
        label="TIES",
        reference_url="https://arxiv.org/abs/2306.01708",
    )
)
register(
    Method(
        "dare",
        RandomDrop(drop_rate=0.9),
        Choice("combine", "sum", {"sum": Sum(), "ties": DisjointMean()}),
        doc="DARE (+TA or +TIES)",
        label="DARE",
        reference_url="https://arxiv.org/abs/2311.03099",
    )
)
register(
    Method(
        "della",
        MagPrune(density=0.7, epsilon=0.07),
        DisjointMean(),
        lam=1.1,
        doc="DELLA (MAGPRUNE)",
        label="DELLA",
        reference_url="https://arxiv.org/abs/2406.11617",
    )
)
register(
    Method(
        "tall_mask",
        Keep(),
        Consensus(),
        doc="TALL-Mask / consensus merging",
        label="TALL-Mask",
        reference_url="https://arxiv.org/abs/2405.07813",
    )
)
register(
    Method(
        "pcb",
        PCBBalance(ratio=0.1),
        WeightedMean(),
        doc="Parameter Competition Balancing",
        label="PCB",
        reference_url="https://arxiv.org/abs/2410.02396",
    )
)
register(
    Method(
        "breadcrumbs",
        Breadcrumbs(density=0.1, gamma=0.01),
        Sum(),
        doc="Model Breadcrumbs",
        label="Breadcrumbs",
        reference_url="https://arxiv.org/abs/2312.06795",
    )
)
register(
    Method(
        "obim",
        Rank(saliency),
        IterativeMerging(),
        retention_param="retention",
        statistics="hdiag",
        doc="OBIM: OBM saliency + iterative merging",
        label="OBIM",
        reference_url="https://arxiv.org/abs/2502.12217",
    )
)
register(
    Method(
        "ties_obm",
        TopK(saliency, density=0.2),
        DisjointMean(),
        retention_param="density",
        statistics="hdiag",
        doc="ablation: OBM saliency + TIES disjoint mean",
        label="TIES+OBM",
        reference_url="https://arxiv.org/abs/2502.12217",
    )
)
register(
    Method(
        "ties_im",
        Rank(magnitude),
        IterativeMerging(),
        retention_param="retention",
        doc="ablation: magnitude + iterative merging",
        label="TIES+IM",
        reference_url="https://arxiv.org/abs/2502.12217",
    )
)
register(
    Method(
        "slerp",
        Keep(),
        Slerp(),
        doc="SLERP: spherical interpolation of the base and one model, or of two models",
        label="SLERP",
        reference_url="https://doi.org/10.1145/325165.325242",
    )
)
register(
    Method(
        "tsv",
        Keep(),
        TaskSingularVectors(),
        doc="TSV-M: task singular vectors, orthogonalised across tasks",
        label="TSV-M",
        reference_url="https://arxiv.org/abs/2412.00081",
    )
)
register(
    Method(
        "sce",
        VarianceSelect(),
        SignWeightedMean(),
        doc="SCE: select by variance, calculate weights, erase sign conflicts (FuseChat; mergekit's sce)",
        label="SCE",
        reference_url="https://arxiv.org/abs/2408.07990",
    )
)
register(
    Method(
        "lines",
        Keep(),
        LayerScaled(Sum()),
        doc="LiNeS over task arithmetic: the summed task vector scaled up with depth",
        label="TA+LiNeS",
        reference_url="https://arxiv.org/abs/2410.17146",
    )
)
register(
    Method(
        "ties_lines",
        TopK(magnitude, density=0.2),
        LayerScaled(DisjointMean()),
        doc="LiNeS over TIES: the disjoint mean scaled up with depth",
        label="TIES+LiNeS",
        reference_url="https://arxiv.org/abs/2410.17146",
    )
)
register(
    Method(
        "regmean",
        Keep(),
        RegressionMean(),
        statistics="gram",
        doc="RegMean: each linear layer's least-squares merge from its inputs' Gram matrices; others averaged",
        label="RegMean",
        reference_url="https://arxiv.org/abs/2212.09849",
    )
)
register(
    Method(
        "fisher",
        Keep(),
        FisherMean(),
        statistics="fisher",
        doc="Fisher merging: every parameter averaged with each model's diagonal Fisher information as weight",
        label="Fisher",
        reference_url="https://arxiv.org/abs/2111.09832",
    )
)
