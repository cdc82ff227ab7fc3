"""Parity of our CapeNext against golden outputs of the official PyTorch code.

usage: python -m capenext_jax.tools.check_parity FIXTURE.npz
           [--state-dict SD.npz | --capex RECORD.npz]

FIXTURE.npz has the layout of ../shared/fixtures/tiny_capenext.npz (weights under their
official names, the batch, intermediates, outputs, losses, gradients); a full-size fixture of the
same layout works unchanged. --state-dict takes the weights from another file instead
(official names; .npz or .pth). --capex checks plain CapeX (no fusion module) instead: the
model is FIXTURE's weights without `additional_module.*` (the converter reads the missing fusion
keys as CapeX), run on FIXTURE's batch, against RECORD.npz, what the official CapeXModel with
`module_name=None` computed from them (tests/fixtures/capex_tiny.npz, made by
tests/fixtures/make_capex_fixture.py): outputs, losses, d loss / d query image and parameter
gradients, the largest as sketches `grad [out, n] @ sketch_basis/<n>` (compared norm-wise like
the gradients themselves). Prints max abs / rel error per recorded tensor and exits 1 when
any exceeds its tolerance:
  activations and outputs <= 1e-5 abs (similarity logits <= 1e-4),
  decoded image-space predictions <= 1e-5 of the query box side (pixels are the crop's [0, 1]
    coordinates times scale * 200, so this is the keypoints' 1e-5; an absolute 1e-5 px cannot
    hold in float32 for boxes of hundreds of pixels),
  losses <= 1e-5 rel, gradients of every trainable parameter (and of the query image) <= 1e-4
  rel (norm-wise).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capenext_jax import export
from capenext_jax import losses as losses_lib
from capenext_jax import loading
from capenext_jax import runtime
from capenext_jax.convert import official
from capenext_jax.models.capenext import NUM_SLOTS, CapeNext
from capenext_jax.models.head import adjacency_from_skeleton
from capenext_jax.mp100 import geometry
from capenext_jax.text.cache import category_prompt
from capenext_jax.text.tokenizer import tokenize

ACT_TOL, SIM_TOL, LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4, 1e-5, 1e-4
# Each program of the check runs once, so it is compiled with XLA's cheap backend settings
# (runtime.one_run_compile_options()): the tiny fixture's loss and gradients compile ~3x faster
# on a CPU, and no row moves by more than a tenth of its tolerance (the closest, 0.47 of its
# tolerance instead of 0.41).


@dataclasses.dataclass
class Row:
  name: str
  abs_err: float
  rel_err: float
  kind: str  # which tolerance applies: 'abs', 'rel', 'norm'
  tol: float

  @property
  def ok(self) -> bool:
    err = self.abs_err if self.kind == 'abs' else self.rel_err
    return bool(np.isfinite(err) and err <= self.tol)


def compare(name: str, ours, ref, kind: str, tol: float) -> Row:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f'{name}: shape {ours.shape} != reference {ref.shape}')
  diff = np.abs(ours - ref)
  abs_err = float(diff.max()) if diff.size else 0.0
  if kind == 'norm':
    rel = np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30)
  else:
    rel = abs_err / max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-30)
  return Row(name, abs_err, float(rel), 'rel' if kind in ('norm', 'rel') else kind, tol)


# ----------------------------------------------------------------------------- inputs
def fixture_batch(z) -> dict[str, np.ndarray]:
  """Model inputs and loss targets of the fixture's B episodes (NHWC, batch-first)."""
  b = z['in_img_q'].shape[0]
  adjacency, kpt_tokens, cat_tokens = [], [], []
  for i in range(b):
    adjacency.append(adjacency_from_skeleton(z[f'meta_b{i}_skeleton'], NUM_SLOTS))
    tokens = np.zeros((NUM_SLOTS, 77), np.int32)
    desc = [str(d) for d in z[f'meta_b{i}_point_descriptions']]
    tokens[:len(desc)] = tokenize(desc)
    kpt_tokens.append(tokens)
    cat_tokens.append(tokenize([category_prompt(str(z[f'meta_b{i}_category_name']))])[0])
  return {
      'query_image': np.transpose(z['in_img_q'], (0, 2, 3, 1)),
      'support_mask': z['in_target_weight_s'][..., 0],
      'adjacency': np.stack(adjacency),
      'keypoint_tokens': np.stack(kpt_tokens),
      'category_tokens': np.stack(cat_tokens),
      'query_joints': np.stack([z[f'meta_b{i}_query_joints_3d'][:, :2] for i in range(b)]),
      'query_weight': z['in_target_weight_q'][..., 0],
      'target_heatmaps': z['in_target_q'],
  }


def loss_fn(model: CapeNext, batch) -> tuple[jax.Array, tuple[dict, dict]]:
  out = model(batch['query_image'], batch['support_mask'], batch['adjacency'],
              keypoint_tokens=batch['keypoint_tokens'], category_tokens=batch['category_tokens'])
  terms = losses_lib.capenext_losses(
      out, batch['query_joints'], batch['query_weight'], batch['support_mask'],
      image_size=model.config.image_size, heatmap_size=batch['target_heatmaps'].shape[-1],
      target_heatmaps=batch['target_heatmaps'])
  return terms['loss'], (out, terms)


# ----------------------------------------------------------------------------- checks
def capex_model(z) -> CapeNext:
  """Our CapeX (eval mode) holding fixture `z`'s weights without its fusion module."""
  state_dict = {str(k): z[str(k)] for k in z['state_dict_keys']
                if not str(k).startswith('additional_module.')}
  params = official.capenext_from_official(state_dict)
  return export.build_model(official.config_from_fixture(_capex_sizes(z)), params)


def _capex_sizes(z) -> dict:
  """Fixture `z`'s config_json without its fusion module: the sizes of its CapeX."""
  return {k: v for k, v in json.loads(str(z['config_json'])).items() if k != 'additional_module'}


def run_checks(z, model: CapeNext, record=None) -> list[Row]:
  """Every recorded tensor of fixture `z` against `model` (eval mode) on the fixture's batch.

  record: the golden record to compare with, of `z`'s batch (default `z` itself, which must
  record everything; a CapeX record holds a subset and only that is compared).
  """
  ref = z if record is None else record
  batch = {k: jnp.asarray(v) for k, v in fixture_batch(z).items()}
  rows = [compare('in_text_tokens_category', batch['category_tokens'],
                  z['in_text_tokens_category'], 'abs', 0.0)]
  mask = np.asarray(batch['support_mask']) > 0
  rows.append(compare('in_text_tokens_points', np.asarray(batch['keypoint_tokens'])[mask],
                      z['in_text_tokens_points'], 'abs', 0.0))

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  wrt = (0, 1) if 'gin_img_q' in ref.files else (0,)   # the query image too, where recorded

  @jax.jit
  def value_and_grad(params, image, batch):
    def f(p, x):
      return loss_fn(nnx.merge(graphdef, p, rest), {**batch, 'query_image': x})
    return jax.value_and_grad(f, argnums=wrt, has_aux=True)(params, image)

  (_, (out, terms)), (grads, *d_image) = run_once(value_and_grad, params,
                                                  batch['query_image'], batch)
  rows += _activation_rows(model, batch, out, z, ref, required=record is None)
  rows += [compare(f'loss_{k}', terms[k], ref[f'loss_{k}'], 'rel', LOSS_RTOL)
           for k in ('heatmap_loss', 'proposal_loss', 'l1_loss_layer0', 'l1_loss_layer1',
                     'l1_loss_layer2', 'loss')]
  rows.append(compare('loss_acc_pose', terms['acc_pose'], ref['loss_acc_pose'], 'abs', ACT_TOL))
  if d_image:
    rows.append(compare('gin_img_q', np.transpose(np.asarray(d_image[0]), (0, 3, 1, 2)),
                        ref['gin_img_q'], 'norm', GRAD_RTOL))
  rows += _gradient_rows(grads, ref)
  return rows


def run_once(jitted, *args):
  """`jitted(*args)`, compiled with `runtime.one_run_compile_options()`."""
  return jitted.lower(*args).compile(runtime.one_run_compile_options())(*args)


def _activation_rows(model, batch, out, z, ref, required: bool) -> list[Row]:
  """Every intermediate we produce that `ref` records, in the fixture's layouts (metas from
  fixture `z`). required: `ref` must record every one."""
  nchw = lambda x: np.transpose(np.asarray(x), (0, 3, 1, 2))
  seq_first = lambda x: np.swapaxes(np.asarray(x), 0, 1)
  mask = np.asarray(batch['support_mask']) > 0
  ours = {
      'point_text_embeddings': out['joint_text'],
      'mm_in_joint_text_embedding': out['joint_text'],
      'mm_in_image_embedding': out.get('image_embedding'),
      'mm_in_category_embedding': out.get('category_embedding'),
      'mm_out_text_embeddings': out['fused_text'],
      'backbone_feature': nchw(out['backbone_feature']),
      'head_input_proj': nchw(out['input_proj']),
      'head_pos_embed': nchw(out['pos_embed']),
      'head_text_proj': out['text_proj'],
      'enc_query_feat': seq_first(out['enc_query_feat']),
      'enc_support_feat': seq_first(out['enc_support_feat']),
      'prop_for_loss': out['proposals'],
      'out_initial_proposals': out['proposals'],
      'prop_similarity': out['similarity'],
      'out_similarity_map': out['similarity'],
      'prop_local': out['prop_local'],
      'dec_outs': np.swapaxes(np.asarray(out['dec_outs']), 1, 2),
      'dec_out_points': out['dec_out_points'],
      'dec_cross_attn_maps': out['dec_cross_attn_maps'],
      'out_kpts': out['keypoints'],
  }
  # The CLIP towers and the Swin stages run again, in one more program, only where recorded.
  ours.update(_tower_activations(
      model, batch, mask,
      clip=required or any(k.startswith(('clip_', 'in_img_q_224')) for k in ref.files),
      swin=required or any(k.startswith('swin_') for k in ref.files)))
  rows = []
  for name, value in ours.items():
    if not required and name not in ref.files:
      continue
    tol = SIM_TOL if 'similarity' in name else ACT_TOL
    rows.append(compare(name, value, ref[name], 'abs', tol))
  size = model.config.image_size
  for i in range(mask.shape[0]):
    scale = z[f'meta_b{i}_query_scale'][None]
    preds = geometry.transform_preds(np.asarray(out['keypoints'][-1, i:i + 1]) * size,
                                     z[f'meta_b{i}_query_center'][None], scale, image_size=size)
    # Image pixels are the crop's [0, 1] coordinates times the box side (scale * 200), so
    # compare in units of the box: the same 1e-5 as for the normalised keypoints.
    box = scale[:, None, :] * 200.0
    rows.append(compare(f'test_b{i}_preds / box side', preds / box,
                        ref[f'test_b{i}_preds'][..., :2] / box, 'abs', ACT_TOL))
  return rows


def _tower_activations(model, batch, mask, *, clip: bool, swin: bool) -> dict[str, jax.Array]:
  """clip: CLIP's raw (not normalised) text and image features of the batch, and its image
  input; swin: the backbone's patch embedding and stages. Jitted together (`run_once`)."""
  if not (clip or swin):
    return {}
  graphdef, state = nnx.split(model)
  point_tokens = jnp.asarray(np.asarray(batch['keypoint_tokens'])[mask])

  @jax.jit
  def towers(state, image, point_tokens, category_tokens):
    model = nnx.merge(graphdef, state)
    ours = {}
    if clip:
      r = model.config.clip.image_resolution
      img224 = jax.image.resize(image, (image.shape[0], r, r, 3), 'bilinear', antialias=False)
      ours.update({'clip_text_points_raw': model.clip.encode_text(point_tokens),
                   'clip_text_category_raw': model.clip.encode_text(category_tokens),
                   'in_img_q_224': jnp.transpose(img224, (0, 3, 1, 2)),
                   'clip_image_raw': model.clip.encode_image(img224)})
    if swin:
      stages = model.backbone.forward_with_intermediates(image)
      ours['swin_patch_embed'] = stages['patch_embed']
      ours.update({f'swin_stage{i}': stage for i, stage in enumerate(stages['stages'])})
    return ours

  return run_once(towers, state, batch['query_image'], point_tokens, batch['category_tokens'])


def _gradient_rows(grads, z) -> list[Row]:
  """d loss / d parameter under official names, for every parameter the fixture records
  (in full as `grad/<name>`, or as `grad_sketch/<name>`: see the module docstring).

  Parameters with no recorded gradient (frozen CLIP, unused modules) must get exactly zero.
  """
  ours = official.capenext_to_official(nnx.to_pure_dict(grads))
  recorded = {k[len('grad/'):] for k in z.files if k.startswith('grad/')}
  sketched = {k[len('grad_sketch/'):] for k in z.files if k.startswith('grad_sketch/')}
  rows = []
  for name in sorted(ours):
    if name in recorded:
      rows.append(compare(f'grad/{name}', ours[name], z[f'grad/{name}'], 'norm', GRAD_RTOL))
    elif name in sketched:
      flat = np.asarray(ours[name], np.float64).reshape(ours[name].shape[0], -1)
      basis = np.asarray(z[f'sketch_basis/{flat.shape[1]}'], np.float64)
      rows.append(compare(f'grad_sketch/{name}', flat @ basis, z[f'grad_sketch/{name}'], 'norm',
                          GRAD_RTOL))
    elif np.any(ours[name] != 0):
      rows.append(Row(f'grad/{name} (must be 0)', float(np.abs(ours[name]).max()), np.inf,
                      'abs', 0.0))
  missing = (recorded | sketched) - set(ours) - set(official.KNOWN_UNUSED_GRADS)
  for name in sorted(missing):
    rows.append(Row(f'grad/{name} (not produced)', np.inf, np.inf, 'abs', 0.0))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('fixture')
  group = parser.add_mutually_exclusive_group()
  group.add_argument('--state-dict', help='official weights (.npz/.pth) to use instead')
  group.add_argument('--capex', help='a record of the official CapeX (no fusion) on FIXTURE')
  args = parser.parse_args(argv)
  if loading.kind_of(args.fixture) != 'fixture':
    print(f'{args.fixture}: not a whole-model parity fixture (needs state_dict_keys and '
          'config_json); the unit_*.npz fixtures are checked by the tests of their module',
          file=sys.stderr)
    return 2
  z = np.load(args.fixture, allow_pickle=False)
  record = None
  if args.capex:
    record = np.load(args.capex, allow_pickle=False)
    sizes = _capex_sizes(z)
    recorded = json.loads(str(record['config_json']))
    if {k: recorded.get(k) for k in sizes} != sizes:
      print(f'{args.capex}: recorded at other model sizes than {args.fixture} has (config_json '
            'differs beyond additional_module)', file=sys.stderr)
      return 2
    model = capex_model(z)
  elif args.state_dict:   # other official weights at the fixture's sizes
    model = loading.load_model(args.state_dict, loading.load(args.fixture).config)
  else:
    model = loading.load_model(args.fixture)
  with jax.default_matmul_precision('highest'):  # GPUs would otherwise use TF32
    rows = run_checks(z, model, record)
  width = max(len(r.name) for r in rows)
  for r in rows:
    print(f'{"ok " if r.ok else "BAD"} {r.name:<{width}}  max|abs| {r.abs_err:9.2e}  '
          f'rel {r.rel_err:9.2e}  ({r.kind} tol {r.tol:g})')
  bad = [r.name for r in rows if not r.ok]
  print(f'{len(rows) - len(bad)} passed, {len(bad)} failed')
  return 1 if bad else 0


if __name__ == '__main__':
  runtime.allow_one_run_compile()   # before jax's backend starts: nothing above started it
  sys.exit(main())
