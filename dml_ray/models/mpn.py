"""Message passing network over the complete mini-batch graph (intra-batch-mpn-reproduction Sec. 3.1).

Each of L layers updates every node of the batch from every node of the batch (itself included)
by M-head dot-product self-attention, then a skip connection and LayerNorm, then two FC layers,
a skip connection and LayerNorm:

    h_i' = cat_m( sum_j alpha_ij^m W^m h_j )                  # Sec. 3.1, first equation
    alpha_ij^m = softmax_j( (W_q^m h_i) . (W_k^m h_j) / sqrt(d) )  # Sec. 3.1, second equation
    f_i = LayerNorm(h_i' + h_i)                                # third equation
    h_i <- LayerNorm(FF(f_i) + f_i)                            # fourth equation

with W^m, W_q^m, W_k^m in R^{d/M x d} (no bias). A final FC maps the refined features to class
logits. Choices the paper leaves open follow the authors' code (github.com/dvl-tum/intra_batch):
FF = Linear(d, 4d) -> ReLU -> dropout -> Linear(4d, d), and dropout (0.1 there) on the attention
weights, on the attention output and on the FF output.

``variant="paper"`` (the default) follows the equations above. ``variant="authors"`` reproduces the
authors' layers (``net/attentions.py``, ``net/gnn_base.py``, ``net/utils.py`` there), which produced
the reported numbers; it differs in exactly these points:

- the softmax has an extra zero logit (``exp(s_j) / (1 + sum_k exp(s_k))``): a node's attention row
  sums to less than 1;
- W_q, W_k, W have biases, and an output projection (d x d, with bias) follows the concatenation;
- the logits are scaled by sqrt(d / M) (the head width), not sqrt(d);
- the input is the unit-norm backbone embedding through a learnable d x d linear map (``dim_red``),
  not the unit embedding rescaled to norm sqrt(d) (``MessagePassingNetwork.embed_input``);
- the classifier is BatchNorm (its shift frozen at 0) followed by a bias-free linear layer
  (initialised N(0, 0.001^2)); W_q, W_k, W and the output projection start Xavier-uniform, biases 0.

``concat_layers`` (the authors' Cars196 setting ``cat``) classifies, and returns as the refined
feature, the concatenation of every layer's output (L d wide) instead of the last layer's.

L, M and the loss temperature are per-dataset hyper-parameters (Table 1: CUB L=1, M=2, tau=0.20;
Cars196 2, 8, 0.11; SOP 1, 8, 0.60; In-Shop 1, 4, 0.19): they come from the config, not from
defaults here.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

Variant = Literal["paper", "authors"]
VARIANTS: tuple[str, ...] = ("paper", "authors")


class MPNOutput(NamedTuple):
    """A forward pass: refined features (B x d), class logits (B x C), attention (L x M x B x B); G x ... for G graphs."""

    features: torch.Tensor
    logits: torch.Tensor
    attention: torch.Tensor


def softmax_with_null(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with an extra logit fixed at 0 that is dropped from the output:
    ``exp(s_j) / (exp(0) + sum_k exp(s_k))`` (the authors' ``softmax`` in ``net/utils.py``, margin 0).
    Rows sum to less than 1; the rest is the mass a node gives to attending nowhere."""
    return torch.softmax(F.pad(logits, (0, 1)), dim=-1)[..., :-1]


class MessagePassingLayer(nn.Module):
    """One MPN layer: multi-head dot-product attention over the batch, skip + LayerNorm, FF, skip + LayerNorm."""

    def __init__(self, dim: int, num_heads: int, dropout: float, ff_dim: int, variant: Variant = "paper") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"mpn: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if variant not in VARIANTS:
            raise ValueError(f"mpn: unknown variant {variant!r}; expected one of: {', '.join(VARIANTS)}")
        authors = variant == "authors"
        self.num_heads = num_heads
        self.variant = variant
        self.query = nn.Linear(dim, dim, bias=authors)  # the M matrices W_q^m stacked
        self.key = nn.Linear(dim, dim, bias=authors)  # W_k^m
        self.value = nn.Linear(dim, dim, bias=authors)  # W^m
        self.output = nn.Linear(dim, dim) if authors else nn.Identity()
        self.scale = math.sqrt(dim / num_heads if authors else dim)
        self.attention_dropout = nn.Dropout(dropout)
        self.message_dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim), nn.Dropout(dropout)
        )
        self.norm2 = nn.LayerNorm(dim)
        if authors:
            for linear in (self.query, self.key, self.value, self.output):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (each ... x d, the M heads side by side) of node features ... x d."""
        return self.query(h), self.key(h), self.value(h)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update R nodes of each of G graphs from all B nodes of their graph (Sec. 3.1, all four equations).

        Args:
            q: (G, R, d) queries of the updated nodes; k, v: (G, B, d) keys and values of every node;
            h: (G, R, d) features of the updated nodes (for the skip connection).

        Returns:
            (G, R, d) updated features and (G, M, R, B) attention weights (rows sum to 1; to less than 1
            in the authors' variant).
        """
        g, r, d = q.shape
        b = k.shape[1]
        heads = (self.num_heads, d // self.num_heads)
        q = q.view(g, r, *heads).transpose(1, 2)  # G x M x R x d/M
        k = k.view(g, b, *heads).transpose(1, 2)  # G x M x B x d/M
        v = v.view(g, b, *heads).transpose(1, 2)
        logits = q @ k.transpose(2, 3) / self.scale  # G x M x R x B
        attention = softmax_with_null(logits) if self.variant == "authors" else torch.softmax(logits, dim=-1)
        messages = self.output((self.attention_dropout(attention) @ v).transpose(1, 2).reshape(g, r, d))
        f = self.norm1(self.message_dropout(messages) + h)
        return self.norm2(self.ff(f) + f), attention

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Updated node features (G x B x d) and attention weights (G x M x B x B) of G graphs."""
        return self.attend(*self.project(h), h)


class NeckClassifier(nn.Module):
    """The authors' classifier: BatchNorm with its shift frozen at 0, then a bias-free linear layer
    (``bottleneck`` + ``fc`` of ``GNNReID``, ``neck: 1``); any leading shape, features last."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.norm.bias.requires_grad_(False)
        self.linear = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.linear.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x.reshape(-1, x.shape[-1])).view(x.shape))


class MessagePassingNetwork(nn.Module):
    """L message passing layers over the complete batch graph and a classifier (mpn-reproduction Sec. 3.1).

    Its input is the unit-norm backbone embedding of every node; ``embed_input`` maps it to the first
    layer's node features (see the module docstring for the two variants).

    Args:
        num_classes: classes of the training split (logits per node).
        num_layers: L (Table 1).
        num_heads: M (Table 1); must divide ``dim``.
        dim: feature dimension d of the backbone embedding (paper: 512).
        dropout: dropout rate of attention weights, messages and FF layers (authors' code: 0.1).
        ff_dim: hidden width of the two FC layers (default 4 d, as in the authors' code).
        variant: "paper" (the equations) or "authors" (the authors' layers; module docstring).
        concat_layers: classify and return the concatenation of every layer's output (the authors' ``cat``).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        num_layers: int,
        num_heads: int,
        dim: int = 512,
        dropout: float = 0.1,
        ff_dim: int | None = None,
        variant: Variant = "paper",
        concat_layers: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1 or num_heads < 1 or num_classes < 1:
            raise ValueError(
                "mpn: num_layers, num_heads and num_classes must be >= 1, "
                f"got {num_layers}, {num_heads}, {num_classes}"
            )
        self.variant = variant
        self.concat_layers = concat_layers
        self.dim_red = nn.Linear(dim, dim) if variant == "authors" else None
        self.layers = nn.ModuleList(
            MessagePassingLayer(dim, num_heads, dropout, ff_dim or 4 * dim, variant) for _ in range(num_layers)
        )
        out_dim = dim * num_layers if concat_layers else dim
        self.classifier = NeckClassifier(out_dim, num_classes) if variant == "authors" else nn.Linear(out_dim,
                                                                                                       num_classes)

    def embed_input(self, embedding: torch.Tensor) -> torch.Tensor:
        """First-layer node features of unit-norm embeddings (... x d).

        "authors": the learnable d x d map ``dim_red`` of the authors' code, which feeds the MPN the
        L2-normalised backbone feature (``output_train_enc: plain``) through it. "paper": the paper does
        not say how the feature enters the MPN; this variant rescales the unit embedding to norm sqrt(d),
        the scale of a LayerNorm output, with no parameters: at the small norms of a from-scratch head the
        attention logits would otherwise stay near zero and the attention near uniform, while a fixed
        norm makes the attention's sharpness learnable from the first step, at training and test time alike.
        """
        if self.dim_red is not None:
            return self.dim_red(embedding)
        return embedding * embedding.shape[-1] ** 0.5

    def forward(self, x: torch.Tensor) -> MPNOutput:
        """Refine the unit embeddings of one batch graph (B x d), or of G independent graphs at once (G x B x d).

        The outputs keep the input's leading shape (features are L d wide with ``concat_layers``);
        attention is L x M x B x B for one graph and G x L x M x B x B for G graphs.
        """
        if x.ndim not in (2, 3):
            raise ValueError(f"mpn: expected a (batch, dim) or (graphs, batch, dim) tensor, got shape {tuple(x.shape)}")
        single = x.ndim == 2
        h = self.embed_input(x[None] if single else x)
        attentions, outputs = [], []
        for layer in self.layers:
            h, attention = layer(h)
            attentions.append(attention)
            outputs.append(h)
        attention = torch.stack(attentions, dim=1)  # G x L x M x B x B
        features = torch.cat(outputs, dim=-1) if self.concat_layers else h
        logits = self.classifier(features)
        if single:
            return MPNOutput(features[0], logits[0], attention[0])
        return MPNOutput(features, logits, attention)


def attention_diagnostics(attention: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head attention statistics of one batch (mpn-reproduction Sec. 4.2.2, Figures 1 and 2).

    Args:
        attention: (L, M, B, B) attention weights, row i = node i's distribution over the batch.
        labels: (B,) class of each node.

    Returns:
        ``kl_from_uniform`` (L, M): mean over nodes of KL(alpha_i || uniform over the B nodes),
        ``sum_j alpha_ij log(B alpha_ij)``; 0 for uniform attention.
        ``same_class_mass`` (L, M): mean over nodes of the attention on nodes of the same class,
        the node itself included.
        ``same_class_mass_uniform`` (scalar): that mass under uniform attention, for reference.
        In the authors' variant rows sum to less than 1 (the zero logit keeps the rest); both statistics
        are then taken over the attention the batch receives, as it is.
    """
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention_diagnostics: expected (L, M, B, B) attention, got {tuple(attention.shape)}")
    b = attention.shape[-1]
    if labels.shape != (b,):
        raise ValueError(f"attention_diagnostics: expected ({b},) labels, got {tuple(labels.shape)}")
    kl = (torch.xlogy(attention, attention) + attention * math.log(b)).sum(-1).mean(-1)
    same = (labels[:, None] == labels[None, :]).to(attention.dtype)
    return {
        "kl_from_uniform": kl,
        "same_class_mass": (attention * same).sum(-1).mean(-1),
        "same_class_mass_uniform": same.mean(),
    }


def mpn_loss(
    mpn_logits: torch.Tensor,
    backbone_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    label_smoothing: float = 0.1,
    aux_weight: float = 1.0,
    mpn_weight: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy on the MPN output plus the auxiliary backbone cross-entropy (mpn-reproduction Sec. 3.1).

    ``mpn_weight * CE_eps(mpn_logits / tau, y) + aux_weight * CE_eps(backbone_logits / tau, y)``: both terms use
    label smoothing eps (targets ``(1 - eps) onehot + eps / C``) and the temperature tau (Sec. 3.1:
    "Both losses utilize label smoothing ... and low temperature scaling"; Table 1 gives tau per
    dataset). The authors' code weighs both terms 1 (``scaling_gnn``, ``scaling_ce``).

    Args:
        mpn_logits: (B, C) logits of the MPN classifier.
        backbone_logits: (B, C) logits of the backbone's classifier.
        labels: (B,) class indices.
        temperature: tau > 0; the logits are divided by it.
        label_smoothing: eps (paper: 0.1).
        aux_weight: weight of the backbone term.
        mpn_weight: weight of the MPN term (the authors' SOP config: 0, the backbone term alone).
    """
    main = smoothed_cross_entropy(mpn_logits, labels, temperature, label_smoothing)
    aux = smoothed_cross_entropy(backbone_logits, labels, temperature, label_smoothing)
    return mpn_weight * main + aux_weight * aux


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                           label_smoothing: float) -> torch.Tensor:
    """``CE_eps(logits / tau, y)``, one term of ``mpn_loss`` (mpn-reproduction Sec. 3.1)."""
    if temperature <= 0:
        raise ValueError(f"mpn_loss: temperature must be > 0, got {temperature}")
    return F.cross_entropy(logits / temperature, labels, label_smoothing=label_smoothing)


def refine_over_batches(mpn: MessagePassingNetwork, features: torch.Tensor, batches: torch.Tensor,
                        rows: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Each row's MPN feature refined within its own test-time batch (mpn-reproduction Sec. 3.4).

    Equal to running the MPN on each batch and reading the row's node, with two savings that
    change no value: the input map and the first layer's queries, keys and values depend on a node
    alone, so they are computed once per node rather than once per batch it appears in; and the last
    layer updates only the row's node (its attention over the batch, its FF), not all B nodes.

    Args:
        mpn: the trained network (put it in eval mode).
        features: (N, d) unit-norm backbone embeddings every batch draws from.
        batches: (Q, B) indices into ``features``: the reciprocal-kNN batch of each of Q rows.
        rows: (Q,) index into ``features`` of the row whose batch it is; it must occur in its batch.
        chunk: batch graphs per step.

    Returns:
        (Q, d) refined features of the rows (the output of the last MPN layer at the row's node;
        (Q, L d), every layer's output at that node, with ``concat_layers``).
    """
    where = batches == rows[:, None]
    if not bool(where.any(1).all()):
        raise ValueError("refine_over_batches: a row is missing from its own batch")
    position = where.int().argmax(1)
    layers = list(mpn.layers)
    out = []
    with torch.no_grad():
        nodes = mpn.embed_input(features)
        projected = layers[0].project(nodes)  # N x d each
        for a in range(0, len(rows), chunk):
            idx, pos = batches[a:a + chunk], position[a:a + chunk]
            at = torch.arange(len(idx))
            h = nodes[idx]  # G x B x d
            q, k, v = (p[idx] for p in projected)
            current, at_row = layers[0], []
            for layer in layers[1:]:
                h, _ = current.attend(q, k, v, h)  # every node of the batch, for the next layer
                at_row.append(h[at, pos])
                q, k, v = layer.project(h)
                current = layer
            refined, _ = current.attend(q[at, pos][:, None], k, v, h[at, pos][:, None])
            at_row.append(refined[:, 0])
            out.append(torch.cat(at_row, dim=-1) if mpn.concat_layers else at_row[-1])
    width = features.shape[1] * (len(layers) if mpn.concat_layers else 1)
    return torch.cat(out) if out else features.new_zeros((0, width))
