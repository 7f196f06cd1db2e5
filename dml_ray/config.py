"""Configuration as data: pydantic models for every stage; YAML in, one-line errors out."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Literal, Optional

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DatasetKind = Literal["synthetic", "cub", "cars196", "sop", "inshop", "folder"]
LossName = Literal["multi_similarity", "triplet", "contrastive", "proxy_anchor", "binomial_deviance"]
Stage = Literal["data", "train", "embed", "evaluate", "knn", "mpn", "explain", "localize", "report"]
MapMethod = Literal["decomposition", "decomposition_bias", "distcam", "gradcam", "gradcam_nonorm", "rgradcam", "oam"]


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(Strict):
    n_classes: int = Field(20, ge=2)
    images_per_class: int = Field(12, ge=2)
    image_size: int = Field(96, ge=32)
    seed: int = 0


class DataConfig(Strict):
    kind: DatasetKind = "synthetic"
    root: str = ""
    synthetic: SyntheticConfig = SyntheticConfig()
    image_size: int = Field(224, ge=16, description="side of the square model input (center crop)")
    resize: int = Field(256, ge=16, description="shorter side after resizing, before the crop")
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)

    @model_validator(mode="after")
    def _crop_fits(self) -> "DataConfig":
        if self.image_size > self.resize:
            raise ValueError(f"image_size {self.image_size} is larger than resize {self.resize}")
        return self


class MPNConfig(Strict):
    """Message passing network on top of the backbone embedding (intra-batch-mpn Sec. 3.1, Table 1)."""

    num_layers: int = Field(1, ge=1, description="L (Table 1: CUB 1, Cars196 2, SOP 1, In-Shop 1)")
    num_heads: int = Field(2, ge=1, description="M (Table 1: CUB 2, Cars196 8, SOP 8, In-Shop 4)")
    temperature: float = Field(0.2, gt=0, description="tau (Table 1: CUB 0.20, Cars196 0.11, SOP 0.60, In-Shop 0.19)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="epsilon of both cross-entropies (Sec. 3.1)")
    aux_weight: float = Field(1.0, ge=0, description="weight of the auxiliary backbone cross-entropy")
    dropout: float = Field(0.1, ge=0, lt=1)
    ff_dim: Optional[int] = Field(None, ge=1, description="hidden width of the FF layers; default 4 d")


class DeMLConfig(Strict):
    """Decoupled metric learning (deml-zero-shot-retrieval Sec. 3, implementation details of Sec. 4)."""

    scales: int = Field(1, ge=1, description="I: object-attention root learners (scales, Table 2)")
    branches: int = Field(1, ge=1, description="J: channel-attention sub-learners per scale (Table 2)")
    channel_attention: bool = Field(True, description="false: no CAM, the U<d> baseline (needs branches: 1)")
    cam_hidden: int = Field(64, ge=1, description="width of the CAM's first FC (Sec. 3.2: 64)")
    walk_steps: int = Field(10, ge=1, description="T random-walk steps (Eq. 3: 10)")
    crop_threshold: float = Field(0.5, ge=0, le=1, description="the crop keeps proposal values >= this (min-max "
                                                               "normalised)")
    min_crop_fraction: float = Field(0.25, gt=0, le=1, description="smallest crop side / image side")
    adversary: bool = Field(True, description="the adversary network behind a gradient-reversal layer (Eq. 4)")
    adversary_weight: float = Field(1.0, ge=0, description="lambda_0 (Sec. 4: 1)")
    activation_decay: float = Field(0.014, ge=0, description="lambda_1 (Sec. 4: 0.014)")
    norm_penalty: float = Field(0.25, ge=0, description="lambda_2 of L_ntri (Sec. 4: 0.25)")

    @model_validator(mode="after")
    def _baseline_has_one_branch(self) -> "DeMLConfig":
        if not self.channel_attention and self.branches != 1:
            raise ValueError("branches must be 1 without channel_attention (the U<d> baseline)")
        return self


class ModelConfig(Strict):
    kind: Literal["embedding", "mpn", "deml"] = Field(
        "embedding", description="embedding: trained with train.loss; mpn: backbone + message passing network "
                                 "trained with cross-entropy (the embeddings table still comes from the backbone); "
                                 "deml: GoogLeNet with object- and channel-attention learners (section deml)")
    mpn: MPNConfig = MPNConfig()
    deml: DeMLConfig = DeMLConfig()
    backbone: str = "resnet50"
    weights: str = Field("none", description="'none' (random init), 'imagenet' or a checkpoint path")
    pooling: Literal["gap", "gmp", "flatten"] = "gap"
    hidden_dims: list[int] = Field(default_factory=list, description="FC -> (BN) -> ReLU layers before the last FC")
    embedding_dim: Optional[int] = Field(512, ge=1, description="None: no FC, the pooled feature is the embedding")
    bn: bool = False

    @model_validator(mode="after")
    def _fc_needed(self) -> "ModelConfig":
        if self.embedding_dim is None and (self.hidden_dims or self.bn):
            raise ValueError("hidden_dims and bn need an embedding_dim")
        if self.kind == "mpn" and self.embedding_dim is not None and self.embedding_dim % self.mpn.num_heads:
            raise ValueError(f"embedding_dim {self.embedding_dim} is not divisible by mpn.num_heads "
                             f"{self.mpn.num_heads}")
        if self.kind == "deml":
            learners = self.deml.scales * self.deml.branches
            if self.backbone != "googlenet" or self.pooling != "gap" or self.hidden_dims or self.bn:
                raise ValueError("kind deml is GoogLeNet with GAP and one FC per learner: set backbone: googlenet, "
                                 "pooling: gap, no hidden_dims, bn: false")
            if self.embedding_dim is None or self.embedding_dim < learners:
                raise ValueError(f"kind deml needs embedding_dim >= scales x branches = {learners}")
        return self


class LossConfig(Strict):
    name: LossName = "multi_similarity"
    params: dict[str, Any] = Field(default_factory=dict)
    miner: Optional[Literal["triplet_margin", "multi_similarity", "batch_hard"]] = None
    miner_params: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(Strict):
    name: Literal["adam", "adamw", "sgd", "radam"] = "adam"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0)
    head_lr_multiplier: float = Field(1.0, gt=0, description="lr of head and loss parameters / lr")


class SchedulerConfig(Strict):
    name: Literal["none", "step", "multistep", "cosine"] = "none"
    step_size: int = Field(10, ge=1)
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)


class TrainConfig(Strict):
    epochs: int = Field(5, ge=1)
    classes_per_batch: int = Field(8, ge=1, description="P of the P x K batches, per worker")
    samples_per_class: int = Field(4, ge=1, description="K of the P x K batches")
    steps_per_epoch: Optional[int] = Field(None, ge=1, description="default: train images / global batch")
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    num_workers: int = Field(1, ge=0, description="Ray Train workers; 0 runs the loop in-process")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    max_failures: int = Field(1, ge=0)
    seed: int = 0
    loader_workers: int = Field(0, ge=0, description="torch DataLoader processes per Ray Train worker")
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability of random erasing after normalisation "
                                                                "(intra-batch-mpn Sec. 3.2 uses 0.5)")


class EmbedConfig(Strict):
    batch_size: int = Field(32, ge=1)
    concurrency: int = Field(1, ge=1, description="max model actors")
    cpus_per_actor: int = Field(1, ge=1)
    use_gpu: bool = False
    splits: list[str] = Field(default_factory=lambda: ["train", "test", "query", "gallery"])
    max_error_fraction: float = Field(0.05, ge=0, le=1, description="above it the stage fails and commits nothing")
    feature_maps: bool = Field(False, description="also store each image's feature map (fp16), GAP feature and "
                                                  "head bias: every activation map is then computed without "
                                                  "a second backbone pass")
    incremental: bool = Field(True, description="copy, not recompute, the rows of images whose (image_id, content "
                                                "hash, model_id) an earlier committed run of output_root embedded")
    in_process_below: int = Field(4096, ge=0, description="fewer images to embed than this: run the batches in the "
                                                          "driver (no Ray Data job, no actor start); 0: always Ray "
                                                          "Data")


class EvaluateConfig(Strict):
    metric: Literal["cosine", "euclidean"] = "cosine"
    ks: Optional[list[int]] = Field(None, description="Recall@K list; default by dataset (DESIGN.md)")
    nmi: bool = True
    map_at_r: bool = True
    splits: Optional[list[str]] = Field(None, description="evaluated splits; default: test (query/gallery for In-Shop)")
    query_shards: int = Field(4, ge=1, description="Ray tasks the queries are split over")
    block_size: int = Field(4096, ge=1, description="queries per faiss search call")
    seed: int = 0

    @field_validator("ks")
    @classmethod
    def _positive(cls, ks: Optional[list[int]]) -> Optional[list[int]]:
        if ks is not None and (not ks or min(ks) < 1):
            raise ValueError("ks must be a non-empty list of positive integers")
        return ks


class KnnConfig(Strict):
    k1: int = Field(30, ge=1, description="neighbours per image besides itself (intra-batch-mpn Sec. 3.4)")
    k: Optional[int] = Field(None, ge=1, description="reciprocal neighbourhood size; default k1")
    batch_size: int = Field(30, ge=1, description="test-time MPN batch size (<= k1 + 1)")
    metric: Literal["cosine", "euclidean"] = "cosine"
    index: Literal["exact", "ivf", "hnsw"] = "exact"
    index_params: dict[str, Any] = Field(default_factory=dict)
    splits: Optional[list[str]] = Field(None, description="default: the evaluated splits")
    shards: int = Field(4, ge=1, description="Ray tasks the queries are split over")

    @model_validator(mode="after")
    def _sizes(self) -> "KnnConfig":
        if self.batch_size > self.k1 + 1:
            raise ValueError(f"batch_size {self.batch_size} exceeds k1 + 1 = {self.k1 + 1}")
        if (self.k or self.k1) > self.k1:
            raise ValueError(f"k {self.k} exceeds k1 {self.k1}")
        return self


class ExplainConfig(Strict):
    methods: list[MapMethod] = Field(default_factory=lambda: ["decomposition", "decomposition_bias", "distcam"])
    references: list[Literal["neighbor", "prototype"]] = Field(default_factory=lambda: ["neighbor", "prototype"],
                                                               min_length=1)
    splits: Optional[list[str]] = Field(None, description="explained splits; default: the evaluated ones")
    pairs: list[tuple[str, str]] = Field(default_factory=list,
                                         description="(query id, reference id) pairs whose point-to-point tensors "
                                                     "are stored (method point_to_point)")
    batch_size: int = Field(64, ge=1)
    concurrency: int = Field(1, ge=1)
    use_gpu: bool = Field(False, description="a GPU per actor for the model pass of DeML's oam maps")
    in_process_below: int = Field(4096, ge=0, description="fewer images to explain than this: compute the maps in "
                                                          "the driver (no Ray Data job, no actor start); 0: always "
                                                          "Ray Data")


class LocalizeConfig(Strict):
    mode: Literal["paper", "wsol"] = Field("paper", description="paper: DESIGN.md protocol; wsol: wsolevaluation's")
    threshold_interval: float = Field(0.01, gt=0, lt=1, description="threshold grid np.arange(0, 1, interval)")
    holdout_fraction: float = Field(0.5, gt=0, lt=1, description="images used to choose a held-out threshold")
    baselines: bool = Field(True, description="also localize random maps and a centred box")
    shards: int = Field(4, ge=1, description="Ray tasks over the activation_maps files")
    seed: int = 0


class StorageConfig(Strict):
    allowed_schemes: list[str] = Field(default_factory=lambda: ["file", "s3", "memory"], min_length=1,
                                       description="URI schemes a run may read or write (fsspec protocols)")


def uri_scheme(uri: str) -> str:
    """The fsspec protocol of ``uri`` ('file' for plain paths); chained URIs give their outermost protocol."""
    protocol = fsspec.core.split_protocol(uri)[0]
    return "file" if protocol in (None, "local") else protocol


class RunConfig(Strict):
    output_root: str = "dml_ray_out"
    run_id: str = Field(default_factory=lambda: _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    stages: list[Stage] = Field(default_factory=lambda: ["data", "train", "embed", "evaluate"],
                                description="explain is opt-in: it needs embed.feature_maps")
    num_threads: int = Field(1, ge=1, description="torch threads per worker / actor / task")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    embed: EmbedConfig = EmbedConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    knn: KnnConfig = KnnConfig()
    explain: ExplainConfig = ExplainConfig()
    localize: LocalizeConfig = LocalizeConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _explain_fits_the_model(self) -> "RunConfig":
        if self.model.kind == "deml":
            return self._deml_consistent()
        if "explain" in self.stages and not self.embed.feature_maps:
            raise ValueError("the explain stage needs embed.feature_maps: true")
        if "oam" in self.explain.methods:
            raise ValueError("explain.methods: oam (object-attention proposals) needs model.kind: deml")
        return self

    def _deml_consistent(self) -> "RunConfig":
        if self.embed.feature_maps:
            raise ValueError("embed.feature_maps: decomposition maps need a single-head model; "
                             "model.kind deml explains with explain.methods: [oam]")
        if "explain" in self.stages and list(self.explain.methods) != ["oam"]:
            raise ValueError("explain.methods: model.kind deml explains with [oam] (object-attention proposals)")
        if self.train.loss.name != "binomial_deviance" or self.train.loss.miner is not None:
            raise ValueError("train.loss: model.kind deml trains each learner with binomial_deviance (Eq. 5), "
                             "no miner")
        return self

    @model_validator(mode="after")
    def _schemes_allowed(self) -> "RunConfig":
        uris = {"output_root": self.output_root, "data.root": self.data.root}
        if self.model.weights not in ("none", "imagenet"):
            uris["model.weights"] = self.model.weights
        for field, uri in uris.items():
            if uri and uri_scheme(uri) not in self.storage.allowed_schemes:
                raise ValueError(f"{field}: scheme '{uri_scheme(uri)}' is not in storage.allowed_schemes "
                                 f"{self.storage.allowed_schemes}")
        return self

    @model_validator(mode="after")
    def _dataset_located(self) -> "RunConfig":
        if "data" in self.stages and self.data.kind != "synthetic" and not self.data.root:
            raise ValueError(f"data.root is required for data.kind {self.data.kind!r}")
        return self


class ConfigError(ValueError):
    """A configuration is invalid; the message is one line naming the field."""


def _format(err: ValidationError, prefix: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {msg}{extra}"


def parse_config(data: dict[str, Any], model: type[BaseModel] = RunConfig, prefix: str = "config") -> Any:
    """Validate a mapping into ``model``; raise ConfigError with one line naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, prefix)) from None


def load_config(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    """Read a YAML run config, apply dotted-key ``overrides`` and validate it."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_config(data)
