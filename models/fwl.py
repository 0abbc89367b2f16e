"""Fast Weight Layers: Clark, Guu, Chang, Pasupat, Hinton & Norouzi, "Meta-Learning Fast Weight
Language Models" (EMNLP 2022, arXiv 2212.02475).

An FWL is a small block between a language model's body and its softmax whose parameters, at
every position t, are the slow parameters minus ONE learned-step-size SGD step on the weighted
cross-entropy of all strictly earlier positions s < t (dynamic evaluation, done in parallel).
Because a dense layer's per-position weight gradient is rank one (input^T error), the stepped
layer applied at t is causal linear attention, so the whole block costs about two extra
linear-attention passes and is trained end to end (meta-learning slow weights and step sizes).

Dimensions: B batch, T time, D input width (``d_input``), S = ``size``, F = 4 S hidden width,
V vocabulary.

Slow pass (per position; the unembedding U, c is never fast-updated):

    z1 = x K1 + b1                      [F]
    h  = relu(z1)^2                     [F]   (squared ReLU)
    z2 = h K2 + b2                      [S]
    n  = (z2 - mean z2) / sqrt(var z2 + eps),  y = alpha * n + beta_ln     (LayerNorm)
    o  = y U + c,  p = softmax(o)       [V]

Inner loss and its per-position errors (back-propagated by hand, see ``_layer_norm_backward``):

    L_inner = sum_{b,s} w_{b,s} CE(p_{b,s}, Y_{b,s}) / N
    d_o = w (p - Y) / N,  d_y = d_o U^T,  g_alpha = d_y * n,  g_beta = d_y
    d_z2 = LayerNorm backward of alpha * d_y,  d_z1 = (d_z2 K2^T) * 2 relu(z1)

Fast pass (strictly causal, sum over s < t; eta are learned scalars initialised to 0.01):

    z1~_t = z1_t - eta_K1 sum_s (x_t . x_s) d_z1_s - eta_b1 sum_s d_z1_s
    h~_t  = relu(z1~_t)^2
    z2~_t = h~_t K2 + b2 - eta_K2 sum_s (h~_t . h_s) d_z2_s - eta_b2 sum_s d_z2_s
    y~_t  = (alpha - eta_alpha sum_s g_alpha_s) * LN(z2~_t) + (beta_ln - eta_beta sum_s g_beta_s)
    logits_t = y~_t U + c

The two ``sum_s (q_t . k_s) v_s`` terms are ``causal_linear_attention(q, k, v, strict=True)``,
evaluated as mixed chunk attention (Hua et al. 2022, arXiv 2202.10447): exact, not an
approximation. The bias and LayerNorm terms are exclusive cumulative sums over T. Nothing is
detached: the outer loss reaches the slow weights, the step sizes and x through the inner
errors (second-order meta-gradients).

Choices (the official code has a TF and a JAX version that differ; both are available):

- ``semantics="tf"`` (default): every parameter of the block except U, c is fast-updated, each
  parameter tensor with its own step size (6: K1, b1, K2, b2, alpha, beta_ln). Default because
  the paper's experiments were run with the TF code (ported from TF1 for Transformer-XL) and
  because it is the equations above. ``"jax"``: dense biases are NOT fast-updated and there is one
  step size per layer (dense1, dense2, LayerNorm; the LayerNorm scale and bias share one).
- ``normalisation="sequence"`` (default): N = max(sum_s w_{b,s}, 1e-8) per sequence, so a
  sequence's logits never depend on the other sequences in the batch (results do not change
  with the evaluation batch size or with other sequences' padding). ``"batch"`` is the official
  code: N = max(sum_{b,s} w_{b,s}, 1e-8), which couples the sequences of a batch through N; with
  no padding it equals ``"sequence"`` with every step size divided by B, so step sizes learned
  under ``"batch"`` are tied to the training batch size. Either way N is the whole sequence's
  weight sum: it depends on the padding mask (known in advance), never on label content.
- ``ln_eps=1e-6`` (JAX / flax's value, added to the variance). The TF code has no epsilon;
  pass ``ln_eps=0.0`` to reproduce it exactly.
- Initialisation: kernels N(0, 1/fan_in) (close to flax's LeCun normal), biases 0, alpha 1,
  beta_ln 0. The TF code used 0.05 N(0, 1) kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEMANTICS = ("tf", "jax")
NORMALISATIONS = ("batch", "sequence")

# Which parameters are fast-updated under each semantics, and the name of the step size each one
# uses. Parameters absent from a mapping keep their slow value at every position.
FAST_UPDATES: dict[str, dict[str, str]] = {
    "tf": {"K1": "K1", "b1": "b1", "K2": "K2", "b2": "b2", "alpha": "alpha", "beta_ln": "beta_ln"},
    "jax": {"K1": "dense1", "K2": "dense2", "alpha": "layernorm", "beta_ln": "layernorm"},
}


# ----------------------------------------------------------------------------------------------
# Pure functions: causal linear attention (reference and mixed chunk form), cumulative sums.
# ----------------------------------------------------------------------------------------------


def exclusive_cumsum(a: Tensor, dim: int) -> Tensor:
    """out[..., t, ...] = sum_{s < t} a[..., s, ...] along ``dim``.

    Shift then cumsum (not ``cumsum(a) - a``), so the result is exact: position 0 is exactly 0
    and no large running sum has a small term subtracted from it.
    """
    shifted = torch.roll(a, shifts=1, dims=dim)
    # Zero the element that wrapped around from the end to index 0.
    shifted = shifted.index_fill(dim, torch.tensor([0], device=a.device), 0)
    return shifted.cumsum(dim)


def causal_linear_attention_reference(q: Tensor, k: Tensor, v: Tensor, strict: bool = True) -> Tensor:
    """Causal linear attention as a recurrence over time, float-exact reference for tests.

    q, k: [B, T, D_k]; v: [B, T, D_v] -> o: [B, T, D_v] with
    o_t = sum_{s < t} (q_t . k_s) v_s   (strict=True; s <= t when strict=False).
    Identity feature map and no normaliser, as in the FWL (this is a gradient step, not softmax
    attention).
    """
    B, T, _ = q.shape
    state = q.new_zeros(B, k.shape[-1], v.shape[-1])  # [B, D_k, D_v]: sum_s k_s^T v_s
    outputs = []
    for t in range(T):
        write = torch.einsum("bk,bv->bkv", k[:, t], v[:, t])
        if not strict:
            state = state + write
        outputs.append(torch.einsum("bk,bkv->bv", q[:, t], state))
        if strict:
            state = state + write
    return torch.stack(outputs, dim=1)  # [B, T, D_v]


def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, chunks: int, strict: bool = True) -> Tensor:
    """Causal linear attention in mixed chunk form (Hua et al. 2022, arXiv 2202.10447).

    q, k: [B, T, D_k]; v: [B, T, D_v] -> o: [B, T, D_v], o_t = sum_{s < t} (q_t . k_s) v_s
    (s <= t when strict=False). T is split into ``chunks`` = G chunks of C = T / G positions:
    inside a chunk, a masked C x C score matrix (quadratic, parallel); across chunks, the
    key-value state sum k_s^T v_s of all earlier chunks (exclusive cumsum over chunks). This is
    exactly the same sum as ``causal_linear_attention_reference``, only grouped differently.
    G = 1 is plain masked quadratic attention; G = T is the recurrence with a state per position.
    """
    B, T, D_k = q.shape
    if chunks < 1 or T % chunks != 0:
        raise ValueError(
            f"causal_linear_attention: sequence length T={T} is not divisible by chunks={chunks}; "
            f"choose a chunk count that divides T (or pad the sequence)."
        )
    G, C = chunks, T // chunks
    q = q.reshape(B, G, C, D_k)  # [B, G, C, D_k]
    k = k.reshape(B, G, C, D_k)  # [B, G, C, D_k]
    v = v.reshape(B, G, C, -1)  # [B, G, C, D_v]

    # Within a chunk: o_i += sum_{j < i} (q_i . k_j) v_j (j <= i when not strict).
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(diagonal=-1 if strict else 0)
    scores = torch.einsum("bgik,bgjk->bgij", q, k).masked_fill(~mask, 0.0)  # [B, G, C, C]
    local = torch.einsum("bgij,bgjv->bgiv", scores, v)  # [B, G, C, D_v]

    # Across chunks: chunk g reads the state written by chunks 0..g-1.
    chunk_state = torch.einsum("bgjk,bgjv->bgkv", k, v)  # [B, G, D_k, D_v]
    past_state = exclusive_cumsum(chunk_state, dim=1)  # [B, G, D_k, D_v]
    carried = torch.einsum("bgik,bgkv->bgiv", q, past_state)  # [B, G, C, D_v]

    return (local + carried).reshape(B, T, -1)  # [B, T, D_v]


# ----------------------------------------------------------------------------------------------
# Pure functions: pieces of the slow forward and its hand-written backward.
# ----------------------------------------------------------------------------------------------


def squared_relu(z: Tensor) -> Tensor:
    return F.relu(z).square()


def _layer_norm(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Normalise over the last dim. Returns (n, rstd): n = (z - mean) * rstd, rstd = 1/sqrt(var+eps)."""
    centred = z - z.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
    return centred * rstd, rstd


def _layer_norm_backward(d_n: Tensor, n: Tensor, rstd: Tensor) -> Tensor:
    """Gradient w.r.t. the LayerNorm input z from the gradient d_n w.r.t. n = (z - mu) * rstd.

    With S features, dn_i/dz_j = rstd (delta_ij - 1/S - n_i n_j / S): the three terms are the
    direct path, the path through the mean and the path through the variance. Hence
    d_z = rstd * (d_n - mean(d_n) - n * mean(d_n * n)).
    """
    mean_d_n = d_n.mean(dim=-1, keepdim=True)
    mean_d_n_n = (d_n * n).mean(dim=-1, keepdim=True)
    return rstd * (d_n - mean_d_n - n * mean_d_n_n)


def inner_loss_normaliser(weights: Tensor, normalisation: str) -> Tensor:
    """N of the inner loss, broadcastable against weights [B, T]: [] for "batch", [B, 1] for "sequence"."""
    if normalisation == "batch":
        return weights.sum().clamp_min(1e-8)
    if normalisation == "sequence":
        return weights.sum(dim=1, keepdim=True).clamp_min(1e-8)
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")


def fwl_labels_and_weights(
    tokens: Tensor, pad_id: int | None = None, *, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """Inner-loss labels and weights for an FWL from token ids.

    tokens: [B, T] long -> labels [B, T, V] float one-hot of the NEXT token (roll by -1),
    weights [B, T] float in {0, 1}.

    Weight 0 on the last position (its label wrapped around to token 0) and, when ``pad_id`` is
    given, wherever the current token OR the next token is padding: a position only writes to
    the fast weights if both its input and its target are real tokens. Predicting a pad is
    meaningless, and (with left padding) predicting the first real token from a pad would store
    an association keyed on the pad's representation. labels follow the same dtype as weights
    (float32); cast both with the model (e.g. ``.double()``) if needed.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
    next_tokens = torch.roll(tokens, shifts=-1, dims=1)  # [B, T]: label at t is token t+1
    labels = F.one_hot(next_tokens, vocab_size).float()  # [B, T, V]
    weights = torch.ones(tokens.shape, dtype=torch.float32, device=tokens.device)
    weights[:, -1] = 0.0
    if pad_id is not None:
        weights = weights * (tokens != pad_id) * (next_tokens != pad_id)
    return labels, weights


# ----------------------------------------------------------------------------------------------
# The block.
# ----------------------------------------------------------------------------------------------


class FWLBlock(nn.Module):
    """Fast Weight Layer block: x [B, T, D] (+ labels, weights) -> logits [B, T, V].

    Args:
        size: S, the block's width (hidden layer is 4 S).
        vocab_size: V.
        attn_chunks: G, number of chunks of the mixed chunk attention; must divide T.
        d_input: D, width of x (default S).
        semantics: "tf" (default) or "jax"; which parameters are fast-updated and how step sizes
            are shared (see the module docstring and ``FAST_UPDATES``).
        normalisation: "sequence" (default, batch-invariant) or "batch" (official code).
        ln_eps: LayerNorm epsilon added to the variance.
    """

    def __init__(
        self,
        size: int,
        vocab_size: int,
        attn_chunks: int,
        d_input: int | None = None,
        semantics: str = "tf",
        normalisation: str = "sequence",
        ln_eps: float = 1e-6,
    ):
        super().__init__()
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        if attn_chunks < 1:
            raise ValueError(f"attn_chunks must be >= 1, got {attn_chunks}")
        D = size if d_input is None else d_input
        S, Fh = size, 4 * size
        self.size, self.vocab_size, self.d_input = size, vocab_size, D
        self.attn_chunks, self.semantics = attn_chunks, semantics
        self.normalisation, self.ln_eps = normalisation, ln_eps

        # Slow weights, stored in "x @ K" orientation so the code reads like the equations.
        self.K1 = nn.Parameter(torch.randn(D, Fh) / D**0.5)
        self.b1 = nn.Parameter(torch.zeros(Fh))
        self.K2 = nn.Parameter(torch.randn(Fh, S) / Fh**0.5)
        self.b2 = nn.Parameter(torch.zeros(S))
        self.alpha = nn.Parameter(torch.ones(S))
        self.beta_ln = nn.Parameter(torch.zeros(S))
        # Untied unembedding; never fast-updated, but its slow value sets the inner errors.
        self.U = nn.Parameter(torch.randn(S, vocab_size) / S**0.5)
        self.c = nn.Parameter(torch.zeros(vocab_size))

        step_size_names = dict.fromkeys(FAST_UPDATES[semantics].values())  # ordered, unique
        self.step_sizes = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(0.01)) for name in step_size_names}
        )

    def fast_step_sizes(self) -> dict[str, Tensor]:
        """{parameter name: its step size} for the fast-updated parameters of this semantics."""
        return {param: self.step_sizes[step] for param, step in FAST_UPDATES[self.semantics].items()}

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, vocab_size={self.vocab_size}, d_input={self.d_input}, "
            f"attn_chunks={self.attn_chunks}, semantics={self.semantics!r}, "
            f"normalisation={self.normalisation!r}, ln_eps={self.ln_eps}"
        )

    def forward(self, x: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
        """x [B, T, D], labels [B, T, V] (one-hot of token t+1), weights [B, T] -> logits [B, T, V].

        logits[:, t] use the parameters stepped on positions s < t only; labels[:, t] affect
        logits[:, t'] only for t' > t.
        """
        B, T, D = x.shape
        if D != self.d_input:
            raise ValueError(f"x has width {D}, expected d_input={self.d_input}")
        if labels.shape != (B, T, self.vocab_size):
            raise ValueError(f"labels must be [B, T, V]={(B, T, self.vocab_size)}, got {tuple(labels.shape)}")
        if weights.shape != (B, T):
            raise ValueError(f"weights must be [B, T]={(B, T)}, got {tuple(weights.shape)}")
        if T % self.attn_chunks != 0:
            raise ValueError(
                f"FWLBlock: sequence length T={T} is not divisible by attn_chunks={self.attn_chunks}"
            )
        labels = labels.to(x.dtype)
        weights = weights.to(x.dtype)
        eta = self.fast_step_sizes()

        # Slow pass, keeping what the inner backward and the fast pass need.
        z1 = x @ self.K1 + self.b1  # [B, T, F]
        h = squared_relu(z1)  # [B, T, F]
        z2 = h @ self.K2 + self.b2  # [B, T, S]
        n, rstd = _layer_norm(z2, self.ln_eps)  # [B, T, S], [B, T, 1]
        y = self.alpha * n + self.beta_ln  # [B, T, S]
        slow_logits = y @ self.U + self.c  # [B, T, V]

        # Inner backward by hand: per-position errors of the weighted cross-entropy. Each is the
        # error of ONE position; the fast pass sums them causally.
        scale = weights / inner_loss_normaliser(weights, self.normalisation)  # [B, T]
        d_o = (slow_logits.softmax(dim=-1) - labels) * scale[..., None]  # [B, T, V]
        d_y = d_o @ self.U.T  # [B, T, S]
        g_alpha, g_beta = d_y * n, d_y  # per-position grads of alpha, beta_ln
        d_z2 = _layer_norm_backward(self.alpha * d_y, n, rstd)  # [B, T, S]
        d_z1 = (d_z2 @ self.K2.T) * 2 * F.relu(z1)  # [B, T, F]; d relu(z)^2/dz = 2 relu(z)

        # Fast pass. A rank-one kernel gradient x_s^T d_z1_s applied to x_t gives (x_t . x_s) d_z1_s:
        # linear attention with query x_t, key x_s, value d_z1_s, over s < t.
        G = self.attn_chunks
        z1_fast = z1 - eta["K1"] * causal_linear_attention(x, x, d_z1, G)
        if "b1" in eta:
            z1_fast = z1_fast - eta["b1"] * exclusive_cumsum(d_z1, dim=1)
        h_fast = squared_relu(z1_fast)  # [B, T, F]

        # dense2 reads the FAST hidden h~_t (query) against the SLOW hiddens h_s (keys), which are
        # the inputs its weight gradients were computed at.
        z2_fast = h_fast @ self.K2 + self.b2 - eta["K2"] * causal_linear_attention(h_fast, h, d_z2, G)
        if "b2" in eta:
            z2_fast = z2_fast - eta["b2"] * exclusive_cumsum(d_z2, dim=1)

        n_fast, _ = _layer_norm(z2_fast, self.ln_eps)  # [B, T, S]
        alpha_fast = self.alpha - eta["alpha"] * exclusive_cumsum(g_alpha, dim=1)  # [B, T, S]
        beta_fast = self.beta_ln - eta["beta_ln"] * exclusive_cumsum(g_beta, dim=1)  # [B, T, S]
        y_fast = alpha_fast * n_fast + beta_fast  # [B, T, S]
        return y_fast @ self.U + self.c  # [B, T, V]
