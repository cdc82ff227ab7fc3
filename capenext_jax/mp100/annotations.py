"""MP-100 / COCO-style keypoint annotations: reader, validator and the instance table.

``load_annotations(ann_file, image_root)`` reproduces the record list ("db") the official
datasets build (docs/MODEL.md §5.1): images in JSON order (``coco.getImgIds()``), their
non-crowd annotations in JSON order, bbox cleaning, the record filters, center/scale with
aspect ratio 1 and padding 1.25. Ids stay Python ints / int64 end to end (MP-100 ids exceed
2**53, where float64 collides).

The result is an :class:`MP100Dataset` of flat numpy arrays (one row per kept instance, db
order) plus the category table. Malformed input raises ``ValueError`` naming the file, the
category / annotation / image id and the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np

from capenext_jax.mp100.descriptions import matching_rule, regular_descriptions
from capenext_jax.mp100.geometry import bbox_to_center_scale, clean_bbox

MAX_KPT = 100          # max_kpt_num of the MP-100 configs: every array is padded to this.
_INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass
class MP100Dataset:
  """Instances (db order) and categories (``getCatIds`` = JSON order) of one annotation file.

  Instance arrays (N rows):
    ann_id, image_id: int64 [N]; file_name: list[str]; image_path: list[str] (image_root joined);
    image_size: int64 [N, 2] (width, height from the json); category_index: int32 [N] (row of the
    category table); bbox: float64 [N, 4] cleaned ``[x1, y1, w', h']``; center, scale: float64
    [N, 2] (scale in units of 200 px, padded by 1.25, aspect ratio 1); joints: float64 [N, 100, 2]
    raw image coordinates (padded rows 0); visible: float32 [N, 100] ``min(1, v)`` (padded 0);
    num_keypoints: int32 [N] (the category's K).
  Category table (C rows):
    category_ids: int64 [C]; category_names: list[str] (``_`` -> space, the prompt name);
    raw_category_names, supercategories: list[str]; descriptions: list[list[str]] (length >= K);
    category_num_keypoints: int32 [C]; skeletons: list[list[tuple[int, int]]] (0-based).
  Dropped by the official record filters (or an image check): ``dropped``, a list of
  (reason, annotation id, category id).
  """
  ann_file: str
  image_root: str
  ann_id: np.ndarray
  image_id: np.ndarray
  file_name: list
  image_path: list
  image_size: np.ndarray
  category_index: np.ndarray
  bbox: np.ndarray
  center: np.ndarray
  scale: np.ndarray
  joints: np.ndarray
  visible: np.ndarray
  num_keypoints: np.ndarray
  category_ids: np.ndarray
  category_names: list
  raw_category_names: list
  supercategories: list
  descriptions: list
  category_num_keypoints: np.ndarray
  skeletons: list
  dropped: list = dataclasses.field(default_factory=list)
  prompt_names: list | None = None   # the names the category prompts use (None: raw names)

  def __len__(self):
    return int(self.ann_id.shape[0])

  @property
  def num_categories(self) -> int:
    return int(self.category_ids.shape[0])

  @property
  def bbox_thr(self) -> np.ndarray:
    """PCK normaliser per instance: max(clean w, clean h), float64 [N]."""
    return np.max(self.bbox[:, 2:], axis=1)

  def cat2obj(self) -> list[np.ndarray]:
    """Per category (table order): db indices of its instances, in db order (int64)."""
    order = np.argsort(self.category_index, kind='stable')
    bounds = np.searchsorted(self.category_index[order], np.arange(self.num_categories + 1))
    return [order[bounds[c]:bounds[c + 1]].astype(np.int64) for c in range(self.num_categories)]

  def category_table(self, num_slots: int = MAX_KPT) -> dict:
    """Per-category arrays ready to become global jax arrays (row = ``category_index``).

    Returns a dict: ``category_ids`` int64 [C]; ``names`` list[str] (prompt name, ``_`` -> space);
    ``descriptions`` numpy str array [C, num_slots] ('' padding; only the first K are used);
    ``num_keypoints`` int32 [C]; ``keypoint_valid`` bool [C, num_slots] (slot < K);
    ``adjacency`` float32 [C, num_slots, num_slots] (0/1, symmetrised skeleton);
    ``skeletons`` list of [E_c, 2] int32 arrays.
    """
    c = self.num_categories
    desc = np.full((c, num_slots), '', dtype=object)
    adj = np.zeros((c, num_slots, num_slots), np.float32)
    for i in range(c):
      k = int(self.category_num_keypoints[i])
      desc[i, :k] = self.descriptions[i][:k]
      for a, b in self.skeletons[i]:
        adj[i, a, b] = 1.0
        adj[i, b, a] = 1.0
    return dict(
        category_ids=self.category_ids.copy(),
        names=list(self.category_names),
        descriptions=desc.astype(str),
        num_keypoints=self.category_num_keypoints.copy(),
        keypoint_valid=np.arange(num_slots)[None, :] < self.category_num_keypoints[:, None],
        adjacency=adj,
        skeletons=[np.asarray(s, np.int32).reshape(-1, 2) for s in self.skeletons],
    )


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
  return (isinstance(x, (int, float)) and not isinstance(x, bool)) and np.isfinite(x)


def _require(obj: dict, fields, where: str):
  for name in fields:
    if name not in obj:
      raise ValueError(f'{where}: missing field "{name}"')


def _check_id(value, where: str, field: str) -> int:
  if not _is_int(value):
    raise ValueError(f'{where}: field "{field}" must be an integer, got {value!r}')
  if not 0 <= value <= _INT64_MAX:
    raise ValueError(f'{where}: field "{field}"={value} does not fit int64')
  return value


def _annotation_keypoint_counts(anns: list) -> dict[int, list[tuple[int, int]]]:
  """category id -> [(K, annotation id), ...]: the distinct keypoint counts its annotations carry,
  each with the first annotation that has it (``keypoints`` arrays of 3K numbers).

  Entries that are malformed are passed over here; the annotation loop reports them by name.
  """
  counts: dict[int, list[tuple[int, int]]] = {}
  for ann in anns:
    if not isinstance(ann, dict) or not isinstance(ann.get('keypoints'), list):
      continue
    k = len(ann['keypoints']) // 3
    seen = counts.setdefault(ann.get('category_id'), [])
    if all(k != known for known, _ in seen):
      seen.append((k, ann.get('id')))
  return counts


def _num_keypoints(names: list, observed: list, where: str) -> int:
  """K of a category as the official code has it: the length of its annotations' keypoint arrays.

  The ``keypoints`` name list only decides K when no annotation carries keypoints; it may be
  empty (both ``face`` categories of the real split-4/5 files) or longer than K (names past K are
  never used).
  """
  if len(observed) > 1:
    (k1, a1), (k2, a2) = observed[:2]
    raise ValueError(f'{where}: annotations disagree on the keypoint count K: annotation id={a1} '
                     f'has {k1} keypoints, annotation id={a2} has {k2}')
  if observed:
    return observed[0][0]
  if names:
    return len(names)
  raise ValueError(f'{where}: field "keypoints" is empty and no annotation of the category has '
                   'keypoints (K unknown)')


def _parse_categories(cats: list, ann_file: str, max_kpt: int, observed_k: dict):
  out = []
  seen = set()
  for pos, cat in enumerate(cats):
    if not isinstance(cat, dict):
      raise ValueError(f'{ann_file}: categories[{pos}] is not an object')
    where = f'{ann_file}: category #{pos} (id={cat.get("id")!r}, name={cat.get("name")!r})'
    _require(cat, ('id', 'name', 'supercategory', 'keypoints', 'skeleton'), where)
    cid = _check_id(cat['id'], where, 'id')
    if cid in seen:
      raise ValueError(f'{where}: duplicate category id {cid} (field "id")')
    seen.add(cid)
    if not isinstance(cat['keypoints'], list):
      raise ValueError(f'{where}: field "keypoints" must be a list of names')
    k = _num_keypoints(cat["keypoints"], observed_k.get(cid, []), where)
    if k == 0:
      raise ValueError(f'{where}: its annotations have 0 keypoints')
    if k > max_kpt:
      raise ValueError(f'{where}: {k} keypoints, more than max_kpt_num={max_kpt}')
    skel = cat['skeleton']
    if not isinstance(skel, list):
      raise ValueError(f'{where}: field "skeleton" must be a list of [i, j] pairs')
    edges = []
    for e in skel:
      if not (isinstance(e, (list, tuple)) and len(e) == 2 and all(_is_int(i) for i in e)):
        raise ValueError(f'{where}: field "skeleton" has a bad edge {e!r} (want [i, j] integers)')
      if not all(0 <= i < k for i in e):
        raise ValueError(f'{where}: field "skeleton" edge {list(e)} out of range [0, {k}) '
                         '(skeletons must be 0-based keypoint indices)')
      edges.append((int(e[0]), int(e[1])))
    if not edges:
      warnings.warn(f'{where}: empty skeleton (the official code would crash; adjacency is all 0)')
    desc = regular_descriptions(cat)
    if len(desc) < k:
      rule = matching_rule(cat)
      source = f'the description table ({rule}) has' if rule else 'field "keypoints" has'
      raise ValueError(f'{where}: {source} only {len(desc)} names for K={k} keypoints')
    out.append(dict(id=cid, name=str(cat['name']), supercategory=str(cat['supercategory']), k=k,
                    skeleton=edges, descriptions=[str(d) for d in desc]))
  return out


def read_categories(data, ann_file: str, max_kpt: int = MAX_KPT, *, require=()) -> list[dict]:
  """The validated category table of a parsed COCO-style json, in JSON order.

  Each entry: ``id``, ``name``, ``supercategory``, ``k`` (K, from the annotations' keypoint
  arrays; see :func:`_num_keypoints`), ``skeleton`` (0-based edges), ``descriptions`` (>= K).
  require: top-level lists needed besides ``annotations`` and ``categories``.
  """
  if not isinstance(data, dict):
    raise ValueError(f'{ann_file}: top level must be an object')
  for key in (*require, 'annotations', 'categories'):
    if not isinstance(data.get(key), list):
      raise ValueError(f'{ann_file}: missing field "{key}" (a list)')
  return _parse_categories(data['categories'], ann_file, max_kpt,
                           _annotation_keypoint_counts(data['annotations']))


def load_annotations(ann_file: str, image_root: str = '', *, drop_missing_images: bool = False,
                     max_kpt: int = MAX_KPT, data: dict | None = None) -> MP100Dataset:
  """Reads and validates one MP-100 / COCO-style keypoint json.

  Args:
    ann_file: the json path (named in errors).
    image_root: prefix joined with ``images[].file_name`` (official MP-100 code: the dataset root;
      CapeX and ``mp100_mini``: ``<root>/images``).
    drop_missing_images: drop records whose image file does not exist (the official train and
      val datasets do this; the official test dataset does not).
    max_kpt: slot count (100); a category with more keypoints is an error.
    data: the parsed json, if already loaded (``ann_file`` is then only used in messages).
  """
  if data is None:
    if not os.path.exists(ann_file):
      raise ValueError(f'{ann_file}: annotation file not found')
    with open(ann_file, encoding='utf-8') as f:
      try:
        data = json.load(f)   # json keeps integers as Python ints (no float64 round trip)
      except json.JSONDecodeError as e:
        raise ValueError(f'{ann_file}: cannot parse json: {e}') from e
  cats = read_categories(data, ann_file, max_kpt, require=('images',))
  cat_row = {c['id']: i for i, c in enumerate(cats)}

  # Images: dict keyed by id in first-seen order (as COCO's index); duplicates are an error.
  images = {}
  for pos, img in enumerate(data['images']):
    where = f'{ann_file}: image #{pos} (id={img.get("id")!r})' if isinstance(img, dict) else None
    if where is None:
      raise ValueError(f'{ann_file}: images[{pos}] is not an object')
    _require(img, ('id', 'file_name', 'width', 'height'), where)
    iid = _check_id(img['id'], where, 'id')
    if iid in images:
      raise ValueError(f'{where}: duplicate image id {iid} (field "id")')
    for field in ('width', 'height'):
      if not _is_num(img[field]) or img[field] <= 0:
        raise ValueError(f'{where}: field "{field}" must be a positive number, got {img[field]!r}')
    images[iid] = img

  # Annotations grouped by image in JSON order (coco.imgToAnns); crowd ones are not records.
  per_image: dict[int, list] = {}
  ann_ids = set()
  for pos, ann in enumerate(data['annotations']):
    if not isinstance(ann, dict):
      raise ValueError(f'{ann_file}: annotations[{pos}] is not an object')
    where = f'{ann_file}: annotation #{pos} (id={ann.get("id")!r})'
    _require(ann, ('id', 'image_id', 'category_id'), where)
    aid = _check_id(ann['id'], where, 'id')
    if aid in ann_ids:
      raise ValueError(f'{where}: duplicate annotation id {aid} (field "id")')
    ann_ids.add(aid)
    _check_id(ann['image_id'], where, 'image_id')
    cid = _check_id(ann['category_id'], where, 'category_id')
    if cid not in cat_row:
      raise ValueError(f'{where}: field "category_id"={cid} is not a category of this file')
    k = cats[cat_row[cid]]['k']
    if 'keypoints' in ann:
      kp = ann['keypoints']
      if not isinstance(kp, list) or not all(_is_num(v) for v in kp):
        raise ValueError(f'{where}: field "keypoints" must be a flat list of numbers')
      if len(kp) != 3 * k:
        raise ValueError(f'{where}: field "keypoints" has {len(kp)} numbers, category {cid} '
                         f'({cats[cat_row[cid]]["name"]}) has K={k} keypoints (want {3 * k})')
    if 'bbox' in ann:
      bb = ann['bbox']
      if not (isinstance(bb, list) and len(bb) == 4 and all(_is_num(v) for v in bb)):
        raise ValueError(f'{where}: field "bbox" must be [x, y, w, h] numbers, got {bb!r}')
    iscrowd = ann.get('iscrowd', 0)
    if iscrowd not in (0, 1, False, True):
      raise ValueError(f'{where}: field "iscrowd" must be 0 or 1, got {iscrowd!r}')
    if iscrowd:
      continue
    per_image.setdefault(ann['image_id'], []).append(ann)

  rows = dict(ann_id=[], image_id=[], file_name=[], image_path=[], image_size=[], cat=[], bbox=[],
              kpts=[])
  dropped: list[tuple[str, int, int]] = []
  exists_cache: dict[str, bool] = {}
  for iid, img in images.items():
    anns = per_image.get(iid)
    if not anns:
      continue
    width, height = img['width'], img['height']
    path = os.path.join(image_root, img['file_name']) if image_root else img['file_name']
    for ann in anns:
      reason = _official_filter(ann, width, height)
      if reason is None and drop_missing_images:
        if path not in exists_cache:
          exists_cache[path] = os.path.exists(path)
        if not exists_cache[path]:
          reason = f'image missing under {image_root!r}'
      if reason is not None:
        dropped.append((reason, ann['id'], ann['category_id']))
        continue
      box = clean_bbox(ann['bbox'], width, height)
      rows['ann_id'].append(ann['id'])
      rows['image_id'].append(iid)
      rows['file_name'].append(img['file_name'])
      rows['image_path'].append(path)
      rows['image_size'].append((width, height))
      rows['cat'].append(cat_row[ann['category_id']])
      rows['bbox'].append(box)
      rows['kpts'].append(ann['keypoints'])
  if dropped:
    warnings.warn(f'{ann_file}: {describe_dropped(dropped)}', stacklevel=2)

  n = len(rows['ann_id'])
  cat_index = np.asarray(rows['cat'], np.int32).reshape(n)
  bbox = np.asarray(rows['bbox'], np.float64).reshape(n, 4)
  joints = np.zeros((n, max_kpt, 2), np.float64)
  visible = np.zeros((n, max_kpt), np.float32)
  for i, kp in enumerate(rows['kpts']):
    arr = np.asarray(kp, np.float64).reshape(-1, 3)
    joints[i, :arr.shape[0]] = arr[:, :2]
    visible[i, :arr.shape[0]] = np.minimum(1.0, arr[:, 2])
  center, scale = bbox_to_center_scale(bbox)
  cat_k = np.asarray([c['k'] for c in cats], np.int32)
  return MP100Dataset(
      ann_file=ann_file, image_root=image_root,
      ann_id=np.asarray(rows['ann_id'], np.int64).reshape(n),
      image_id=np.asarray(rows['image_id'], np.int64).reshape(n),
      file_name=rows['file_name'], image_path=rows['image_path'],
      image_size=np.asarray(rows['image_size'], np.int64).reshape(n, 2),
      category_index=cat_index, bbox=bbox, center=center, scale=scale, joints=joints,
      visible=visible, num_keypoints=cat_k[cat_index] if n else np.zeros(0, np.int32),
      category_ids=np.asarray([c['id'] for c in cats], np.int64),
      category_names=[c['name'].replace('_', ' ') for c in cats],
      raw_category_names=[c['name'] for c in cats],
      supercategories=[c['supercategory'] for c in cats],
      descriptions=[c['descriptions'] for c in cats],
      category_num_keypoints=cat_k,
      skeletons=[c['skeleton'] for c in cats],
      dropped=dropped)


def _official_filter(ann: dict, width: float, height: float) -> str | None:
  """Why the official dataset drops this annotation (docs/MODEL.md §5.1), or None."""
  if 'bbox' not in ann:
    return 'no bbox'
  if clean_bbox(ann['bbox'], width, height) is None:
    return 'a box of zero size inside the image'
  if 'area' in ann and not ann['area'] > 0:
    return 'area 0'
  if 'keypoints' not in ann or max(ann['keypoints']) == 0 or ann.get('num_keypoints', 1) == 0:
    return 'no labelled keypoints'
  return None


def describe_dropped(dropped: list[tuple[str, int, int]]) -> str:
  """'dropped 3 annotations as the official filters do: 2 with no bbox (ids 4, 9), ...'."""
  by_reason: dict[str, list[int]] = {}
  for reason, ann_id, _ in dropped:
    by_reason.setdefault(reason, []).append(ann_id)
  parts = [f'{len(ids)} with {reason} (ids {", ".join(map(str, ids[:5]))}'
           f'{", ..." if len(ids) > 5 else ""})' for reason, ids in by_reason.items()]
  return f'dropped {len(dropped)} annotations as the official filters do: ' + '; '.join(parts)


def check_episode_size(dataset: MP100Dataset, needed: int, what: str = 'episode'):
  """Raises ValueError naming every category with fewer than ``needed`` instances."""
  counts = np.bincount(dataset.category_index, minlength=dataset.num_categories)
  lost = {}
  for _, _, cid in dataset.dropped:
    lost[cid] = lost.get(cid, 0) + 1
  bad = [f'category id={int(cid)} ({dataset.raw_category_names[c]}) has {int(counts[c])} '
         f'instances' + (f' ({lost[int(cid)]} more were dropped, see the warning above)'
                         if lost.get(int(cid)) else '')
         for c, cid in enumerate(dataset.category_ids) if counts[c] < needed]
  if bad:
    raise ValueError(f'{dataset.ann_file}: too few instances for a {what} of {needed} '
                     f'(shots + queries): ' + '; '.join(bad))
