"""CapeX pose head as used by CapeNext (official `PoseHead` + `EncoderDecoder`, docs/MODEL.md §1.7-1.11).

Batch-first throughout. Pipeline for a query feature map and the fused keypoint texts:

  input_proj (1x1 conv) + sine positional encoding of the map, text_proj of the masked texts;
  3 post-norm encoder layers over [image tokens; keypoint tokens] that re-add the positional
  encoding at every layer (also into the values); a proposal generator (similarity map, global
  soft-argmax for the loss, 3x3 local soft-argmax to start the decoder); 3 graph decoder layers
  (self-attention, concat-position cross-attention, GCN feed-forward) with iterative reference
  refinement through per-layer `kpt_branch` MLPs.

Initialisation follows the official `init_weights`: xavier-uniform for every weight with two or
more dimensions (including MHA projections and out_proj), zero biases, LayerNorm 1/0, and the
last Linear of each `kpt_branch` zero (so initial outputs equal the reference points).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capenext_jax.models import layers


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  d_model: int = 256
  nhead: int = 8
  num_encoder_layers: int = 3
  num_decoder_layers: int = 3
  dim_feedforward: int = 768
  dropout: float = 0.1
  similarity_proj_dim: int = 256
  dynamic_proj_dim: int = 128
  num_feats: int = 128            # sine encoding features per axis; must be d_model / 2
  img_in_channels: int = 768
  text_in_channels: int = 512
  num_slots: int = 100            # keypoint slots N (data padding); the head reads N from inputs
  temperature: float = 10000.0    # sine encoding temperature


# ----------------------------------------------------------------------------- small pieces
def _xavier_linear(in_dim: int, out_dim: int, *, rngs: nnx.Rngs) -> layers.Linear:
  return layers.linear(in_dim, out_dim, rngs=rngs, init='xavier')


def _attention(embed_dim: int, num_heads: int, dropout: float, *, rngs: nnx.Rngs,
               kdim: int | None = None, vdim: int | None = None) -> layers.MultiHeadAttention:
  """torch MHA as the head initialises it: its out_proj is a >=2-D weight, so the official
  `init_weights` pass re-initialises it with xavier-uniform (bias 0)."""
  mha = layers.MultiHeadAttention(embed_dim, num_heads, kdim=kdim, vdim=vdim, dropout=dropout,
                                  rngs=rngs)
  kernel = mha.out_proj.kernel
  kernel.value = layers.xavier_uniform(embed_dim, embed_dim)(rngs.params(), kernel.value.shape)
  return mha


def inverse_sigmoid(x: jax.Array, eps: float = 1e-3) -> jax.Array:
  """log(x / (1 - x)) with x clipped to [0, 1] and both terms floored at eps."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


def _dim_t(num_feats: int, temperature: float) -> jax.Array:
  """temperature^(2 floor(c/2) / num_feats), in float32 as the official code computes it."""
  c = jnp.arange(num_feats, dtype=jnp.float32)
  return jnp.float32(temperature) ** (2.0 * jnp.floor(c / 2.0) / num_feats)


def _sine(values: jax.Array, num_feats: int, temperature: float) -> jax.Array:
  """values [...] -> [..., num_feats]: sin at even channels, cos at odd ones (interleaved)."""
  v = values[..., None] / _dim_t(num_feats, temperature)
  even = (jnp.arange(num_feats) % 2) == 0
  return jnp.where(even, jnp.sin(v), jnp.cos(v))


def feature_map_pos_embed(h: int, w: int, num_feats: int,
                          temperature: float = 10000.0) -> jax.Array:
  """Sine encoding of an all-valid h x w map -> [h, w, 2 * num_feats] (y channels first).

  Row i is encoded at (i + 1) / (h + 1e-6) * 2 pi (a cumulative sum of ones, normalised), so
  cell centres are *not* used: the half-cell offset w.r.t. `coordinate_pos_embed` is inherited.
  """
  scale = jnp.float32(2 * math.pi)
  ys = jnp.arange(1, h + 1, dtype=jnp.float32) / (jnp.float32(h) + jnp.float32(1e-6)) * scale
  xs = jnp.arange(1, w + 1, dtype=jnp.float32) / (jnp.float32(w) + jnp.float32(1e-6)) * scale
  pe_y = jnp.broadcast_to(_sine(ys, num_feats, temperature)[:, None], (h, w, num_feats))
  pe_x = jnp.broadcast_to(_sine(xs, num_feats, temperature)[None, :], (h, w, num_feats))
  return jnp.concatenate([pe_y, pe_x], axis=-1)


def coordinate_pos_embed(coords: jax.Array, num_feats: int,
                         temperature: float = 10000.0) -> jax.Array:
  """coords [B, N, 2] (x, y) in [0, 1] -> [B, N, 2 * num_feats]: concat(PE(2 pi y), PE(2 pi x))."""
  scale = jnp.float32(2 * math.pi)
  pe_x = _sine(coords[..., 0] * scale, num_feats, temperature)
  pe_y = _sine(coords[..., 1] * scale, num_feats, temperature)
  return jnp.concatenate([pe_y, pe_x], axis=-1)


def adjacency_from_skeleton(edges, num_slots: int = 100) -> np.ndarray:
  """0-based undirected edges [E, 2] -> symmetric 0/1 adjacency, float32 [num_slots, num_slots].

  Raises ValueError for an empty skeleton (the official model crashes on one) or an index
  outside [0, num_slots), naming the offending edge.
  """
  edges = np.asarray(edges)
  if edges.size == 0:
    raise ValueError('skeleton is empty: at least one edge is required')
  if edges.ndim != 2 or edges.shape[1] != 2:
    raise ValueError(f'skeleton must have shape [E, 2], got {list(edges.shape)}')
  if not np.issubdtype(edges.dtype, np.integer):
    raise ValueError(f'skeleton indices must be integers, got dtype {edges.dtype}')
  bad = np.nonzero((edges < 0) | (edges >= num_slots))[0]
  if bad.size:
    e = int(bad[0])
    raise ValueError(f'skeleton edge {e} = {edges[e].tolist()} has an index outside '
                     f'[0, {num_slots})')
  adj = np.zeros((num_slots, num_slots), np.float32)
  adj[edges[:, 0], edges[:, 1]] = 1.0
  adj[edges[:, 1], edges[:, 0]] = 1.0
  return adj


def _normalised_adjacency(adjacency: jax.Array, valid: jax.Array) -> jax.Array:
  """Symmetrise, drop masked nodes, row-normalise (zero-degree rows stay 0). [B, N, N]."""
  adj = jnp.maximum(adjacency, jnp.swapaxes(adjacency, 1, 2))
  adj = adj * valid[:, :, None] * valid[:, None, :]
  degree = adj.sum(-1, keepdims=True)
  return adj / jnp.where(degree > 0, degree, 1.0)


# ----------------------------------------------------------------------------- encoder
class EncoderLayer(nnx.Module):
  """Post-norm transformer encoder layer that adds `pos` to its input (and so to the values)."""

  def __init__(self, cfg: HeadConfig, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.self_attn = _attention(d, cfg.nhead, cfg.dropout, rngs=rngs)
    self.linear1 = _xavier_linear(d, cfg.dim_feedforward, rngs=rngs)
    self.linear2 = _xavier_linear(cfg.dim_feedforward, d, rngs=rngs)
    self.norm1 = layers.layer_norm(d, rngs=rngs)
    self.norm2 = layers.layer_norm(d, rngs=rngs)
    self.dropout = layers.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, x: jax.Array, pos: jax.Array, padding_mask: jax.Array) -> jax.Array:
    """x [B, L, d], pos [L, d], padding_mask [B, L] (True = ignore) -> [B, L, d]."""
    x = x + pos
    attended, _ = self.self_attn(x, x, x, key_padding_mask=padding_mask)
    x = self.norm1(x + self.dropout(attended))
    ffn = self.linear2(self.dropout(jax.nn.relu(self.linear1(x))))
    return self.norm2(x + self.dropout(ffn))


# ----------------------------------------------------------------------------- proposals
class ProposalGenerator(nnx.Module):
  """Similarity map between keypoint and image tokens, and soft-argmax proposals."""

  def __init__(self, cfg: HeadConfig, *, rngs: nnx.Rngs):
    d, p = cfg.d_model, cfg.similarity_proj_dim
    self.support_proj = _xavier_linear(d, p, rngs=rngs)
    self.query_proj = _xavier_linear(d, p, rngs=rngs)
    # Applied to the projected support features, hence p == d_model (checked by PoseHead).
    self.dynamic_proj_in = _xavier_linear(d, cfg.dynamic_proj_dim, rngs=rngs)
    self.dynamic_proj_out = _xavier_linear(cfg.dynamic_proj_dim, d, rngs=rngs)

  def __call__(self, img: jax.Array, kpt: jax.Array, h: int, w: int):
    """img [B, h*w, d], kpt [B, N, d] ->
    (similarity [B, N, h, w], global proposals [B, N, 2], local proposals [B, N, 2])."""
    b, n = kpt.shape[:2]
    # In float32 whatever the compute dtype: the arg-max below is not continuous, and these
    # small products (under 1% of the model's FLOPs) decide where the decoder starts.
    img, kpt = img.astype(jnp.float32), kpt.astype(jnp.float32)
    fs = self.support_proj(kpt)
    fq = self.query_proj(img)
    pattern = jnp.tanh(self.dynamic_proj_out(jax.nn.relu(self.dynamic_proj_in(fs))))
    sim = jnp.einsum('bqc,bnc->bnq', fq, (pattern + 1.0) * fs)           # [B, N, h*w]

    # Cell centres in map pixels, (x, y) per flattened row-major position.
    gy, gx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                          jnp.arange(w, dtype=jnp.float32) + 0.5, indexing='ij')
    grid = jnp.stack([gx.reshape(-1), gy.reshape(-1)], axis=-1)           # [h*w, 2]
    side = jnp.array([w, h], jnp.float32)
    prob = jax.nn.softmax(sim, axis=-1)
    global_prop = (prob @ grid) / side

    # 3x3 neighbourhood (clipped at the border) of the first arg-max. For h != w the official
    # code max-pools the one-hot map reshaped to (w, h), scrambling the window; the geometric
    # neighbourhood is used here (identical for the square maps CapeNext produces).
    arg = jnp.argmax(sim, axis=-1)                                        # [B, N]
    ai, aj = arg // w, arg % w
    rows, cols = jnp.arange(h * w) // w, jnp.arange(h * w) % w
    window = ((jnp.abs(rows - ai[..., None]) <= 1) &
              (jnp.abs(cols - aj[..., None]) <= 1)).astype(sim.dtype)
    local = prob * window
    local = local / (local.sum(-1, keepdims=True) + 1e-10)
    local_prop = (local @ grid) / side
    return sim.reshape(b, n, h, w), global_prop, local_prop


# ----------------------------------------------------------------------------- decoder
class GraphDecoderLayer(nnx.Module):
  """Self-attention, concat-position cross-attention and a GCN feed-forward ('pre' graph)."""

  def __init__(self, cfg: HeadConfig, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.dim_feedforward
    self.self_attn = _attention(d, cfg.nhead, cfg.dropout, rngs=rngs)
    self.cross_attn = _attention(2 * d, cfg.nhead, cfg.dropout, kdim=2 * d, vdim=d, rngs=rngs)
    self.choker = _xavier_linear(2 * d, d, rngs=rngs)
    # Conv1d(d, 2f, kernel 1): channels [0, f) are the self kernel, [f, 2f) the neighbour one.
    self.gcn = _xavier_linear(d, 2 * f, rngs=rngs)
    self.ffn2 = _xavier_linear(f, d, rngs=rngs)
    self.norm1 = layers.layer_norm(d, rngs=rngs)
    self.norm2 = layers.layer_norm(d, rngs=rngs)
    self.norm3 = layers.layer_norm(d, rngs=rngs)
    self.dropout = layers.Dropout(cfg.dropout, rngs=rngs)
    self.ffn_dim = f

  def __call__(self, x: jax.Array, memory: jax.Array, query_pos: jax.Array,
               memory_pos: jax.Array, padding_mask: jax.Array, valid: jax.Array,
               adjacency: jax.Array):
    """x [B, N, d] keypoint tokens, memory [B, hw, d], query_pos [B, N, d], memory_pos [hw, d],
    padding_mask [B, N] (True = ignore), valid [B, N] float = ~padding_mask, adjacency [B, N, N]
    row-normalised -> (x [B, N, d], cross-attention weights [B, N, hw])."""
    q = x + query_pos   # the keypoint "support order" embedding is all zeros
    attended, _ = self.self_attn(q, q, x, key_padding_mask=padding_mask)
    x = self.norm1(x + self.dropout(attended))

    cq = jnp.concatenate([x, query_pos], axis=-1)
    ck = jnp.concatenate(
        [memory, jnp.broadcast_to(memory_pos, memory.shape)], axis=-1)
    attended, attn_map = self.cross_attn(cq, ck, memory)
    x = self.norm2(x + self.dropout(self.choker(attended)))

    y = self.gcn(x)
    y_self, y_nbr = y[..., :self.ffn_dim], y[..., self.ffn_dim:]
    # Node w receives neighbour v with weight A[v, w] = 1/deg(v): the official einsum
    # 'bkcv,bkvw->bcw' uses the row-normalised matrix transposed.
    g = (y_self * valid[..., None].astype(y.dtype) +
         jnp.einsum('bvc,bvw->bwc', y_nbr, adjacency.astype(y.dtype)))
    g = jax.nn.relu(g)   # ReLU inside the GCN and again as the activation: the same as once
    x = self.norm3(x + self.dropout(self.ffn2(self.dropout(g))))
    return x, attn_map


class MLP(nnx.Module):
  """Linear layers with exact GELU between them (none after the last). float32_out: the last
  layer computes in float32 (the keypoint offsets, added to reference logits)."""

  def __init__(self, dims: list[int], *, rngs: nnx.Rngs, zero_last: bool = False,
               float32_out: bool = False):
    inits = ['xavier'] * (len(dims) - 2) + ['zeros' if zero_last else 'xavier']
    self.layers = nnx.List([layers.linear(i, o, rngs=rngs, init=init)
                            for i, o, init in zip(dims[:-1], dims[1:], inits)])
    self.float32_out = float32_out

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers[:-1]:
      x = layers.gelu(layer(x))
    return self.layers[-1](x.astype(jnp.float32) if self.float32_out else x)


# ----------------------------------------------------------------------------- head
class PoseHead(nnx.Module):
  """CapeX pose head; see the module docstring."""

  def __init__(self, config: HeadConfig = HeadConfig(), *, rngs: nnx.Rngs):
    c = config
    if 2 * c.num_feats != c.d_model:
      raise ValueError(f'HeadConfig: num_feats {c.num_feats} must be d_model / 2 ({c.d_model})')
    if c.similarity_proj_dim != c.d_model:
      raise ValueError(f'HeadConfig: similarity_proj_dim {c.similarity_proj_dim} must equal '
                       f'd_model {c.d_model} (dynamic_proj is applied to the projection)')
    self.config = c
    d = c.d_model
    self.input_proj = _xavier_linear(c.img_in_channels, d, rngs=rngs)
    self.text_proj = _xavier_linear(c.text_in_channels, d, rngs=rngs)
    self.encoder_layers = nnx.List(
        [EncoderLayer(c, rngs=rngs) for _ in range(c.num_encoder_layers)])
    self.proposal_generator = ProposalGenerator(c, rngs=rngs)
    self.decoder_layers = nnx.List(
        [GraphDecoderLayer(c, rngs=rngs) for _ in range(c.num_decoder_layers)])
    self.decoder_norm = layers.layer_norm(d, rngs=rngs)
    self.ref_point_head = MLP([d, d, d], rngs=rngs)
    self.kpt_branch = nnx.List([MLP([d, d, d, d, 2], rngs=rngs, zero_last=True,
                                    float32_out=True)
                                for _ in range(c.num_decoder_layers)])
    self.remat = layers.REMAT_NONE   # CapeNextConfig.remat (per encoder / decoder layer)

  def _pe(self, coords: jax.Array, dtype) -> jax.Array:
    """Query position embedding of reference points [B, N, 2], computed in `dtype`."""
    pe = coordinate_pos_embed(coords, self.config.num_feats, self.config.temperature)
    return self.ref_point_head(pe.astype(dtype))

  def __call__(self, feature: jax.Array, text_emb: jax.Array, support_mask: jax.Array,
               adjacency: jax.Array) -> dict[str, jax.Array]:
    """Runs the head.

    Args:
      feature: [B, h, w, C_img] backbone feature map (NHWC).
      text_emb: [B, N, C_text] fused keypoint texts, unmasked (masked here).
      support_mask: [B, N] float or bool, 1 = the slot is a valid keypoint query.
      adjacency: [B, N, N] 0/1 skeleton adjacency (symmetrised and normalised here).
    The head computes in the dtype of `feature`; keypoints, proposals and similarity are
    float32 whatever it is.
    Returns a dict (batch-first; L decoder layers, d = d_model):
      keypoints [L, B, N, 2]: (x, y) in [0, 1] per layer, [-1] is the prediction;
      proposals [B, N, 2]: global soft-argmax (proposal loss);
      similarity [B, N, h, w]: raw similarity logits (heatmap loss);
      input_proj [B, h, w, d]; pos_embed [B, h, w, d] (the same for every sample);
      text_proj [B, N, d]; enc_query_feat [B, h*w, d] (row-major tokens); enc_support_feat
      [B, N, d]; prop_local [B, N, 2] (3x3 local soft-argmax, decoder start);
      dec_outs [L, B, N, d] (after the shared decoder norm); dec_out_points [L+1, B, N, 2]
      (reference points; [0] = prop_local); dec_cross_attn_maps [L, B, N, h*w] (head mean).
    """
    c = self.config
    b, h, w, _ = feature.shape
    n = text_emb.shape[1]
    mask = jnp.asarray(support_mask, jnp.float32)
    padding = mask == 0

    dtype = feature.dtype
    x = self.input_proj(feature)
    pos = feature_map_pos_embed(h, w, c.num_feats, c.temperature).astype(dtype)
    text = self.text_proj((text_emb * mask[..., None]).astype(dtype))

    # Encoder over [image tokens; keypoint tokens]; keypoints get a zero positional encoding.
    pos_img = pos.reshape(h * w, c.d_model)
    pos_full = jnp.concatenate([pos_img, jnp.zeros((n, c.d_model), pos.dtype)], axis=0)
    enc_padding = jnp.concatenate([jnp.zeros((b, h * w), bool), padding], axis=1)
    s = jnp.concatenate([x.reshape(b, h * w, c.d_model), text], axis=1)
    for layer in self.encoder_layers:
      s = layers.run_block(layer, s, pos_full, enc_padding, remat=self.remat)
    img, enc_kpt = s[:, :h * w], s[:, h * w:]

    sim, global_prop, local_prop = self.proposal_generator(img, enc_kpt, h, w)

    # A sample without any valid query would make self-attention all -inf: unmask slot 0.
    tgt_padding = padding.at[:, 0].set(padding[:, 0] & ~padding.all(axis=-1))
    valid = (~tgt_padding).astype(jnp.float32)
    adj = _normalised_adjacency(jnp.asarray(adjacency, jnp.float32), valid)

    kpt = enc_kpt
    ref = jax.lax.stop_gradient(local_prop)
    points = [ref]
    outs, maps = [], []
    for l, layer in enumerate(self.decoder_layers):
      # Layer 0 embeds the non-detached proposals, so gradients reach the proposal generator
      # through the sine encoding; later layers embed the detached reference.
      query_pos = self._pe(local_prop if l == 0 else ref, dtype)
      kpt, attn_map = layers.run_block(layer, kpt, img, query_pos, pos_img, tgt_padding, valid,
                                       adj, remat=self.remat)
      outs.append(self.decoder_norm(kpt))
      maps.append(attn_map)
      new_ref = jax.nn.sigmoid(inverse_sigmoid(ref) + self.kpt_branch[l](kpt))
      points.append(new_ref)              # keeps its gradient for the outputs
      ref = jax.lax.stop_gradient(new_ref)

    keypoints = jnp.stack([
        jax.nn.sigmoid(branch(out) + inverse_sigmoid(p))
        for branch, out, p in zip(self.kpt_branch, outs, points)])
    return dict(
        keypoints=keypoints, proposals=global_prop, similarity=sim,
        input_proj=x, pos_embed=jnp.broadcast_to(pos, (b, h, w, c.d_model)), text_proj=text,
        enc_query_feat=img, enc_support_feat=enc_kpt,
        prop_local=local_prop, dec_outs=jnp.stack(outs), dec_out_points=jnp.stack(points),
        dec_cross_attn_maps=jnp.stack(maps))
