"""Configuration as data: pydantic models for every stage; YAML in, one-line errors out."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DatasetKind = Literal["synthetic", "cub", "cars196", "sop", "inshop", "folder"]
LossName = Literal["multi_similarity", "triplet", "contrastive", "proxy_anchor", "binomial_deviance"]
Stage = Literal["data", "train", "embed", "evaluate", "knn", "mpn", "explain", "localize", "report"]
Precision = Literal["fp32", "bf16", "fp16"]
log = logging.getLogger(__name__)

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
    frame: Optional[Literal["resize_crop", "resize"]] = Field(
        None, description="model input frame at inference: resize_crop = Resize(resize) (shorter side) + "
                          "CenterCrop(image_size); resize = Resize((image_size, image_size)), no crop (wsolevaluation's "
                          "evaluation frame). None: resize for localize.mode wsol, else resize_crop")
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False, exclude=True,
                                            description="deprecated: use storage.options")

    def input_resize(self) -> int | tuple[int, int]:
        """What the inference transforms pass to torchvision ``Resize`` before ``CenterCrop(image_size)``:
        ``resize`` (shorter side) for the resize_crop frame, (image_size, image_size) for the resize frame
        (the crop then keeps everything)."""
        return (self.image_size, self.image_size) if self.frame == "resize" else self.resize

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
    variant: Literal["paper", "authors"] = Field(
        "paper", description="paper: Sec. 3.1's equations; authors: the layers of github.com/dvl-tum/intra_batch "
                             "(softmax with a zero logit, Q/K/V biases and an output projection, sqrt(d/M) scale, "
                             "learnable input map, BatchNorm + bias-free classifier); README 'paper vs authors' code'")
    concat_layers: bool = Field(False, description="classify and refine with every layer's output concatenated "
                                                   "(the authors' Cars196 setting 'cat')")
    mpn_weight: float = Field(1.0, ge=0, description="weight of the MPN cross-entropy; 0 trains the backbone's alone "
                                                     "(the authors' SOP setting, loss 'lsce')")


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
    decoupled_weight_decay: bool = Field(False, description="radam only: decay the weights directly (p -= lr wd p, "
                                                            "as the intra-batch-mpn authors' RAdam does) instead of "
                                                            "adding wd p to the gradient")

    @model_validator(mode="after")
    def _decoupled_for_radam(self) -> "OptimizerConfig":
        if self.decoupled_weight_decay and self.name != "radam":
            raise ValueError(f"decoupled_weight_decay applies to radam (adamw always decouples), not {self.name}")
        return self


class SchedulerConfig(Strict):
    name: Literal["none", "step", "multistep", "cosine"] = "none"
    step_size: int = Field(10, ge=1)
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)


class ValidationConfig(Strict):
    """Zero-shot validation during training: a fraction of the *training* classes is held out of training and
    evaluated every ``every`` epochs; the best evaluation's model becomes the run's model."""

    fraction: float = Field(0.0, ge=0, lt=1, description="fraction of the training classes held out (0: no "
                                                           "validation, the last epoch's model is kept)")
    every: int = Field(1, ge=1, description="evaluate after every N-th epoch (and after the last)")
    metric: Literal["recall_at_1", "map_at_r"] = Field("recall_at_1", description="selects the kept checkpoint")
    patience: Optional[int] = Field(None, ge=1, description="stop after this many evaluations without gain "
                                                            "(None: never stop early)")
    min_delta: float = Field(0.0, ge=0, description="a gain is an improvement by more than this")
    seed: int = Field(0, description="which classes are held out")
    batch_size: int = Field(64, ge=1, description="images per forward pass when embedding the held-out images")


class AugmentConfig(Strict):
    """One torchvision.transforms.v2 transform by class name, with its keyword arguments."""

    name: str = Field(..., description="a class of torchvision.transforms.v2, e.g. RandomResizedCrop")
    params: dict[str, Any] = Field(default_factory=dict)


def default_augmentations() -> list[AugmentConfig]:
    """Today's training augmentation: a random resized crop of 30-100 % of the area, then a horizontal flip."""
    return [AugmentConfig(name="RandomResizedCrop", params={"scale": [0.3, 1.0]}),
            AugmentConfig(name="RandomHorizontalFlip")]


class PrecisionSection(Strict):
    """A stage section with ``precision`` and ``use_gpu`` fields: fp16 needs a GPU (GradScaler, half kernels)."""

    @model_validator(mode="after")
    def _fp16_on_gpu(self) -> "PrecisionSection":
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs use_gpu: true (on CPU use bf16)")
        return self


class TrainConfig(PrecisionSection):
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
    erasing_aspect: Literal["log_uniform", "uniform"] = Field(
        "log_uniform", description="how random erasing draws the patch's aspect ratio in [0.3, 3.3]: log-uniformly "
                                   "(torchvision) or uniformly (intra-batch-mpn Sec. 3.2 and the authors' code)")
    batch_factorisation: Literal["fixed", "random"] = Field(
        "fixed", description="fixed: classes_per_batch x samples_per_class every step; random: each epoch draws "
                             "P x K afresh among the factorisations of their product (the intra-batch-mpn authors' "
                             "CUB setting)")
    augmentations: list[AugmentConfig] = Field(
        default_factory=default_augmentations,
        description="torchvision.transforms.v2 transforms applied in order to the uint8 image tensor; a transform "
                    "taking a size (RandomResizedCrop, RandomCrop, CenterCrop, Resize) gets data.image_size unless "
                    "params sets it; the output is resized / cropped to image_size if it is not already")
    validation: ValidationConfig = ValidationConfig()
    precision: Precision = Field("fp32", description="autocast dtype of the forward pass: bf16 (GPU and CPU), "
                                                     "fp16 (GPU only, with a gradient scaler)")


class EmbedConfig(PrecisionSection):
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
    precision: Precision = Field("fp32", description="autocast dtype of the forward pass (fp16: GPU only); "
                                                     "outputs are stored as float32 either way")
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


class ExplainConfig(PrecisionSection):
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
    precision: Precision = Field("fp32", description="autocast dtype of the map computations (fp16: GPU only); "
                                                     "maps are stored as float32 either way")
    in_process_below: int = Field(4096, ge=0, description="fewer images to explain than this: compute the maps in "
                                                          "the driver (no Ray Data job, no actor start); 0: always "
                                                          "Ray Data")


class LocalizeConfig(Strict):
    mode: Literal["paper", "wsol"] = Field("paper", description="paper: DESIGN.md protocol; wsol: wsolevaluation's")
    threshold_interval: Optional[float] = Field(
        None, gt=0, lt=1, description="threshold grid np.arange(0, 1, interval); mode paper adds the paper's Table I "
                                      "thresholds (0.15, 0.2, ..., 0.7) it misses. None: paper 0.01, wsol 0.001 "
                                      "(wsolevaluation's cam_curve_interval)")
    normalise: Optional[Literal["relu_max", "minmax"]] = Field(
        None, description="mode paper: relu_max = ReLU then divide by the max (the TIP authors' code, default) or "
                          "minmax; mode wsol is always minmax")
    iou_rule: Optional[Literal["greater", "at_least"]] = Field(
        None, description="mode paper: greater = IoU > 0.5 (TIP Sec. VI-A, default) or at_least = IoU >= 0.5; "
                          "mode wsol is always at_least")
    holdout_fraction: float = Field(0.5, gt=0, lt=1, description="images used to choose a held-out threshold")
    baselines: bool = Field(True, description="also localize random maps and a centred box")
    shards: int = Field(4, ge=1, description="Ray tasks over the activation_maps files")
    seed: int = 0

    @model_validator(mode="after")
    def _wsol_is_exact(self) -> "LocalizeConfig":
        if self.mode == "wsol" and (self.normalise or "minmax", self.iou_rule or "at_least") != ("minmax", "at_least"):
            raise ValueError("localize.mode wsol reproduces wsolevaluation (normalise minmax, iou_rule at_least); "
                             "use mode paper to change normalise or iou_rule")
        return self


class ReportConfig(Strict):
    grid_queries: int = Field(5, ge=0, description="best and worst queries each in the report's retrieval grid "
                                                   "(ranked by precision@k, then first correct rank)")
    grid_k: int = Field(5, ge=1, le=50, description="retrieved images per query in the retrieval grid")
    thumbnail_px: int = Field(96, ge=16, le=512, description="longest side of a grid thumbnail (inlined JPEG)")
    per_class_rows: int = Field(50, ge=1, description="classes in the per-class Recall@1 table and plot (worst first)")
    confused_pairs: int = Field(10, ge=1, description="most-confused class pairs listed")
    projection: Literal["pca", "umap", "auto"] = Field(
        "pca", description="embedding projection: pca; umap (needs umap-learn); auto = umap when installed")

    @field_validator("projection")
    @classmethod
    def _umap_installed(cls, projection: str) -> str:
        from dml_ray.explore.projection import resolve_method

        resolve_method(projection)  # umap without umap-learn fails here, not after the run's other stages
        return projection


class StorageConfig(Strict):
    options: dict[str, Any] = Field(default_factory=dict, repr=False,
                                    description="fsspec storage options of every URI the run reads or writes "
                                                "(credentials, endpoint_url); never logged or written to a manifest")
    allowed_schemes: list[str] = Field(default_factory=lambda: ["file", "s3"], min_length=1,
                                       description="URI schemes a run may read or write (fsspec protocols)")


class ServeConfig(Strict):
    """How ``dml-ray serve`` serves the explorer: one uvicorn process, or a Ray Serve deployment of N replicas."""

    host: str = Field("127.0.0.1", description="HTTP bind address; anything beyond loopback needs a token")
    port: int = Field(8000, ge=1, le=65535)
    ray_serve: bool = Field(False, description="deploy the app on Ray Serve (RAY_ADDRESS, else a private local "
                                               "Ray instance) instead of one uvicorn process")
    replicas: int = Field(1, ge=1, description="Ray Serve replicas of the app (ray_serve only)")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica (ray_serve only)")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica; > 0 runs uploads' forward pass on "
                                                           "CUDA (ray_serve only)")

    @model_validator(mode="after")
    def _replicas_need_ray_serve(self) -> "ServeConfig":
        if not self.ray_serve and (self.replicas != 1 or self.gpus_per_replica or self.cpus_per_replica != 1.0):
            raise ValueError("serve: replicas, cpus_per_replica and gpus_per_replica apply to ray_serve only "
                             "(--ray-serve)")
        return self


# schemes whose files live inside one process: Ray's workers (other processes) cannot see them
PROCESS_LOCAL_SCHEMES = ("memory",)

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_run_id(run_id: str) -> str:
    """A run id is a name, never a path: letters, digits, '.', '_' and '-', starting with a letter or digit,
    at most 128 characters. Returns it unchanged; raises ValueError naming it otherwise."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise ValueError(f"run id {run_id!r} is not a name: use letters, digits, '.', '_' and '-', starting with a "
                         "letter or digit (at most 128 characters)")
    return run_id


class TrackingConfig(Strict):
    """Experiment trackers the train stage logs its per-epoch scalars to."""

    tensorboard: bool = Field(True, description="TensorBoard event files in runs/<id>/logs/tensorboard/")
    mlflow_uri: Optional[str] = Field(None, description="MLflow tracking URI (a server, or file:/path for a local "
                                                        "store); None: no MLflow. Needs the mlflow extra")
    mlflow_experiment: str = Field("dml_ray", description="MLflow experiment (created if missing); the MLflow run "
                                                          "is named after the run id")


def uri_scheme(uri: str) -> str:
    """The fsspec protocol of ``uri`` ('file' for plain paths); chained URIs give their outermost protocol."""
    protocol = fsspec.core.split_protocol(uri)[0]
    return "file" if protocol in (None, "local") else protocol


def check_scheme(field: str, uri: str, allowed: list[str]) -> None:
    """Raise ValueError naming ``field`` when ``uri``'s scheme is not in ``allowed``."""
    if uri and uri_scheme(uri) not in allowed:
        raise ValueError(f"{field}: scheme '{uri_scheme(uri)}' is not in storage.allowed_schemes {allowed}")


def absolute_local_uri(uri: str) -> str:
    """``uri`` with a relative local path made absolute against this process's working directory; other URIs
    (``s3://...``, ``file:///abs``) unchanged."""
    protocol, path = fsspec.core.split_protocol(uri)
    if protocol in (None, "file", "local") and path and not os.path.isabs(path):
        return os.path.abspath(path)
    return uri


def resolve_local_paths(cfg: "RunConfig") -> "RunConfig":
    """A copy of ``cfg`` whose local paths (output_root, data.root, model.weights) are absolute: resolved once, in
    the driver, before anything is sent to Ray (Ray Train workers run in their own working directory)."""
    weights = cfg.model.weights
    if weights not in ("none", "imagenet"):
        weights = absolute_local_uri(weights)
    return cfg.model_copy(update={
        "output_root": absolute_local_uri(cfg.output_root),
        "data": cfg.data.model_copy(update={"root": absolute_local_uri(cfg.data.root) if cfg.data.root else ""}),
        "model": cfg.model.model_copy(update={"weights": weights}),
    })


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
    report: ReportConfig = ReportConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_name(cls, run_id: str) -> str:
        return validate_run_id(run_id)

    @model_validator(mode="after")
    def _storage_options_moved(self) -> "RunConfig":
        """``data.storage_options`` is accepted for one release: it becomes ``storage.options``."""
        if self.data.storage_options:
            if self.storage.options and self.storage.options != self.data.storage_options:
                raise ValueError("data.storage_options and storage.options are both set; keep storage.options")
            log.warning("config: data.storage_options is deprecated and will be removed in the next release; "
                        "move it to storage.options")
            self.storage.options = dict(self.data.storage_options)
        return self

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
    def _frame_follows_localize_mode(self) -> "RunConfig":
        if self.data.frame is None:
            self.data.frame = "resize" if self.localize.mode == "wsol" else "resize_crop"
        return self

    @model_validator(mode="after")
    def _schemes_allowed(self) -> "RunConfig":
        uris = {"output_root": self.output_root, "data.root": self.data.root}
        if self.model.weights not in ("none", "imagenet"):
            uris["model.weights"] = self.model.weights
        for field, uri in uris.items():
            check_scheme(field, uri, self.storage.allowed_schemes)
            if uri and uri_scheme(uri) in PROCESS_LOCAL_SCHEMES:
                raise ValueError(f"{field}: {uri_scheme(uri)}:// lives inside one process and Ray's workers cannot "
                                 "see it; use a local path or s3://")
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
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join(parents[: depth + 1])
                raise ConfigError(f"--set {key}: {section} is a value ({node!r}), not a section")
        node[leaf] = value
    return parse_config(data)
