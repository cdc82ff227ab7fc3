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
import os
import warnings

import numpy as np

from capenext_jax.errors import DataWarning
from capenext_jax.mp100.descriptions import (check_descriptions, description_source,
                                             matching_rule, regular_descriptions)
from capenext_jax.mp100.geometry import bbox_to_center_scale, clean_bbox
from capenext_jax.mp100.json_files import read_json

MAX_KPT = 100          # max_kpt_num of the MP-100 configs: every array is padded to this.
VISIBILITIES = (0, 1, 2)   # COCO: 0 not labelled, 1 labelled but hidden, 2 labelled and visible
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
  # Per category: where its descriptions come from (the MP-100 table's rule or its own names).
  description_sources: list | None = None

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
    if not _is_int(ann.get('category_id')):
      continue
    seen = counts.setdefault(ann['category_id'], [])
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


SKELETON_BASES = (0, 1)
_SKELETON_BASE_HINT = ('set the base: --skeleton_base 0 or 1 (split_categories), '
                       'config.data.skeleton_base (train.py / eval.py), or a top-level '
                       '"skeleton_base": 0 or 1 in the file')


def _raw_edges(skel, where: str) -> list[tuple[int, int]]:
  """A category's ``skeleton`` field as integer pairs, in the file's own numbering."""
  if not isinstance(skel, list):
    raise ValueError(f'{where}: field "skeleton" must be a list of [i, j] pairs')
  for e in skel:
    if not (isinstance(e, (list, tuple)) and len(e) == 2 and all(_is_int(i) for i in e)):
      raise ValueError(f'{where}: field "skeleton" has a bad edge {e!r} (want [i, j] integers)')
  return [(int(a), int(b)) for a, b in skel]


def skeleton_base(edges_and_k: list[tuple[list, int]], ann_file: str,
                  base: int | None = None) -> int:
  """The base (0 or 1) a file numbers its skeletons' keypoints from.

  `base` (the option) decides when given. Otherwise the file decides as a whole (COCO-family
  files are 1-based throughout, MP-100's 0-based): 0 when every edge index of every category
  lies in [0, K) and at least one does not lie in [1, K] (an index 0); 1 when every index lies
  in [1, K] and at least one equals its category's K. A file with no edges is 0-based. A file
  whose indices all lie in [1, K - 1] reads either way and is refused, naming the options. One
  that fits neither base is read as 1-based if an index equals its K and none is 0, else as
  0-based, and the categories out of range in that base are errors.
  """
  if base is not None:
    if base not in SKELETON_BASES:
      raise ValueError(f'{ann_file}: skeleton base must be 0 or 1, got {base!r}')
    return base
  indices = [(i, k) for edges, k in edges_and_k if k > 0 for e in edges for i in e]
  if not indices:
    return 0
  fits0 = all(0 <= i < k for i, k in indices)
  fits1 = all(1 <= i <= k for i, k in indices)
  if fits0 and fits1:
    raise ValueError(f'{ann_file}: cannot tell whether the skeletons number keypoints from 0 or '
                     'from 1 (no edge uses index 0 or index K): ' + _SKELETON_BASE_HINT)
  if fits0 or fits1:
    return 1 if fits1 else 0
  return int(any(i == k for i, k in indices) and all(i != 0 for i, _ in indices))


def _category_problems(cat: dict, where: str, k_observed: list, max_kpt: int, edges: list,
                       base: int | None) -> tuple[dict | None, list[str]]:
  """(parsed entry, []) of a valid category, else (None, its problems, each naming `where`).
  base None: the file's base is unknown (already an error); the skeleton is not checked."""
  try:
    k = _num_keypoints(cat['keypoints'], k_observed, where)
  except ValueError as e:
    return None, [str(e)]
  if k == 0:
    return None, [f'{where}: its annotations have 0 keypoints']
  if k > max_kpt:
    return None, [f'{where}: {k} keypoints, more than max_kpt_num={max_kpt}']
  problems = []
  bad = [list(e) for e in edges if base is not None and not all(base <= i < k + base for i in e)]
  if bad:
    problems.append(f'{where}: field "skeleton" edge {bad[0]} out of range [{base}, {k + base}) '
                    f'({len(bad)} such edges; the file\'s skeletons read as {base}-based keypoint '
                    f'indices; if that is wrong, {_SKELETON_BASE_HINT})')
  desc = regular_descriptions(cat)
  source = description_source(cat)
  if len(desc) < k:
    rule = matching_rule(cat)
    what = f'the description table ({rule}) has' if rule else 'field "keypoints" has'
    problems.append(f'{where}: {what} only {len(desc)} names for K={k} keypoints')
  else:
    problems += check_descriptions(desc[:k], f'{where}: {source}')
  if problems:
    return None, problems
  if not edges:
    warnings.warn(f'{where}: empty skeleton (the official code would crash; adjacency is all 0)')
  return dict(id=cat['id'], name=str(cat['name']), supercategory=str(cat.get('supercategory', '')),
              k=k, skeleton=[(a - (base or 0), b - (base or 0)) for a, b in edges],
              descriptions=[str(d) for d in desc], description_source=source), []


def _parse_categories(cats: list, ann_file: str, max_kpt: int, observed_k: dict,
                      base: int | None):
  """Every category checked before any error is raised: one ValueError lists them all."""
  problems, checked = [], []
  seen = set()
  for pos, cat in enumerate(cats):
    if not isinstance(cat, dict):
      problems.append(f'categories[{pos}] is not an object')
      continue
    where = f'category #{pos} (id={cat.get("id")!r}, name={cat.get("name")!r})'
    try:
      _require(cat, ('id', 'name', 'keypoints', 'skeleton'), where)
      cid = _check_id(cat['id'], where, 'id')
      if cid in seen:
        raise ValueError(f'{where}: duplicate category id {cid} (field "id")')
      seen.add(cid)
      if not isinstance(cat['keypoints'], list):
        raise ValueError(f'{where}: field "keypoints" must be a list of names')
      if not isinstance(cat['name'], str) or not cat['name'].strip():
        raise ValueError(f'{where}: field "name" must be a non-empty string')
      checked.append((cat, where, _raw_edges(cat['skeleton'], where)))
    except ValueError as e:
      problems.append(str(e))
  try:
    base = skeleton_base([(edges, _k_for_base(cat, observed_k)) for cat, _, edges in checked],
                         ann_file, base)
  except ValueError as e:
    problems.append(str(e).removeprefix(f'{ann_file}: '))
    base = None   # the skeletons' ranges are not checked
  out = []
  for cat, where, edges in checked:
    entry, found = _category_problems(cat, where, observed_k.get(cat['id'], []), max_kpt, edges,
                                      base)
    problems += found
    out.append(entry)
  if problems:
    count = '' if len(problems) == 1 else f'{len(problems)} problems: '
    raise ValueError(f'{ann_file}: {count}' + '; '.join(problems[:8])
                     + (f'; ... ({len(problems) - 8} more)' if len(problems) > 8 else ''))
  return out


def _k_for_base(cat: dict, observed_k: dict) -> int:
  """K as `_num_keypoints` finds it (0 where it cannot: that category errs on its own)."""
  try:
    return _num_keypoints(cat['keypoints'], observed_k.get(cat['id'], []), '')
  except ValueError:
    return 0


def read_categories(data, ann_file: str, max_kpt: int = MAX_KPT, *, require=(),
                    skeleton_base: int | None = None) -> list[dict]:
  """The validated category table of a parsed COCO-style json, in JSON order.

  Each entry: ``id``, ``name``, ``supercategory`` ('' when absent), ``k`` (K, from the
  annotations' keypoint arrays; see :func:`_num_keypoints`), ``skeleton`` (0-based edges),
  ``descriptions`` (>= K), ``description_source`` (the MP-100 table's rule or the category's
  own names). require: top-level lists needed besides ``annotations`` and ``categories``.
  skeleton_base: 0 or 1 for the file's skeleton numbering (a file's top-level
  ``skeleton_base`` field decides, and must agree); None: detected (:func:`skeleton_base`). Every invalid category is
  named in one ValueError.
  """
  if not isinstance(data, dict):
    raise ValueError(f'{ann_file}: top level must be an object')
  for key in (*require, 'annotations', 'categories'):
    if not isinstance(data.get(key), list):
      raise ValueError(f'{ann_file}: missing field "{key}" (a list)')
  if 'skeleton_base' in data:   # written by split_categories: the file says how it numbers
    stated = data['skeleton_base']
    if stated not in SKELETON_BASES or isinstance(stated, bool):
      raise ValueError(f'{ann_file}: field "skeleton_base" must be 0 or 1, got {stated!r}')
    if skeleton_base is not None and skeleton_base != stated:
      raise ValueError(f'{ann_file}: the skeleton base set ({skeleton_base}) contradicts the '
                       f'file\'s field "skeleton_base" ({stated}): leave the option unset')
    skeleton_base = stated
  return _parse_categories(data['categories'], ann_file, max_kpt,
                           _annotation_keypoint_counts(data['annotations']), skeleton_base)


def load_annotations(ann_file: str, image_root: str = '', *, drop_missing_images: bool = False,
                     max_kpt: int = MAX_KPT, data: dict | None = None,
                     skeleton_base: int | None = None) -> MP100Dataset:
  """Reads and validates one MP-100 / COCO-style keypoint json.

  Args:
    ann_file: the json path (named in errors).
    image_root: prefix joined with ``images[].file_name`` (official MP-100 code: the dataset root;
      CapeX and ``mp100_mini``: ``<root>/images``).
    drop_missing_images: drop records whose image file does not exist (the official train and
      val datasets do this; the official test dataset does not).
    max_kpt: slot count (100); a category with more keypoints is an error.
    data: the parsed json, if already loaded (``ann_file`` is then only used in messages).
    skeleton_base: 0 or 1, how the file numbers its skeletons' keypoints; None: the file's
      ``skeleton_base`` field, else detected (see :func:`skeleton_base`).
  """
  if data is None:
    data = read_json(ann_file, 'annotation file')   # UTF-8 / UTF-16 with BOM; ints stay ints (no float64 round trip)
  cats = read_categories(data, ann_file, max_kpt, require=('images',), skeleton_base=skeleton_base)
  cat_row = {c['id']: i for i, c in enumerate(cats)}
  images = _read_images(data['images'], ann_file)
  per_image = _read_annotations(data['annotations'], ann_file, cats, cat_row)
  rows, dropped = _records(images, per_image, cat_row, image_root, drop_missing_images)
  if dropped:
    warnings.warn(f'{ann_file}: {describe_dropped(dropped)}', DataWarning, stacklevel=2)
  return _dataset(rows, cats, dropped, ann_file, image_root, max_kpt)


def _read_images(images_field: list, ann_file: str) -> dict[int, dict]:
  """The images by id in first-seen order (as COCO's index), each checked; a duplicate id is
  an error."""
  images = {}
  for pos, img in enumerate(images_field):
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
  return images


def _read_annotations(anns: list, ann_file: str, cats: list[dict], cat_row: dict[int, int]
                      ) -> dict[int, list[dict]]:
  """The annotations grouped by image id in JSON order (coco.imgToAnns), each checked; crowd
  ones are not records. Bad visibility values are reported after every other check, the
  first one named and the rest counted."""
  per_image: dict[int, list] = {}
  ann_ids = set()
  bad_visibility = []   # (where, keypoint index, value) of each annotation with a bad v
  for pos, ann in enumerate(anns):
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
    bad_v = _check_keypoints_and_box(ann, where, cats[cat_row[cid]])
    if bad_v is not None:
      bad_visibility.append((where, *bad_v))
    iscrowd = ann.get('iscrowd', 0)
    if iscrowd not in (0, 1, False, True):
      raise ValueError(f'{where}: field "iscrowd" must be 0 or 1, got {iscrowd!r}')
    if iscrowd:
      continue
    per_image.setdefault(ann['image_id'], []).append(ann)
  if bad_visibility:
    where, index, v = bad_visibility[0]
    more = (f' ({len(bad_visibility) - 1} more annotations have such values)'
            if len(bad_visibility) > 1 else '')
    raise ValueError(f'{where}: keypoint {index} has visibility v={v!r} in field "keypoints" '
                     f'(want 0: not labelled, 1 or 2: labelled){more}')
  return per_image


def _check_keypoints_and_box(ann: dict, where: str, cat: dict) -> tuple[int, object] | None:
  """Checks an annotation's optional ``keypoints`` (3K numbers for its category `cat`) and
  ``bbox``; returns (keypoint index, value) of its first bad visibility, else None."""
  bad = None
  if 'keypoints' in ann:
    kp, k = ann['keypoints'], cat['k']
    if not isinstance(kp, list) or not all(_is_num(v) for v in kp):
      raise ValueError(f'{where}: field "keypoints" must be a flat list of numbers')
    if len(kp) != 3 * k:
      raise ValueError(f'{where}: field "keypoints" has {len(kp)} numbers, category {cat["id"]} '
                       f'({cat["name"]}) has K={k} keypoints (want {3 * k})')
    bad_v = [j for j, v in enumerate(kp[2::3]) if v not in VISIBILITIES]
    if bad_v:
      bad = (bad_v[0], kp[3 * bad_v[0] + 2])
  if 'bbox' in ann:
    bb = ann['bbox']
    if not (isinstance(bb, list) and len(bb) == 4 and all(_is_num(v) for v in bb)):
      raise ValueError(f'{where}: field "bbox" must be [x, y, w, h] numbers, got {bb!r}')
  if 'area' in ann and not _is_num(ann['area']):   # the official filter compares it with 0
    raise ValueError(f'{where}: field "area" must be a number, got {ann["area"]!r}')
  return bad


def _records(images: dict[int, dict], per_image: dict[int, list[dict]], cat_row: dict[int, int],
             image_root: str, drop_missing_images: bool) -> tuple[dict[str, list], list]:
  """(the records' columns in image order, then JSON order within an image; the dropped
  annotations as (reason, annotation id, category id)): the official filters, annotations of
  an image the file lacks and, when asked, of a missing image file are dropped."""
  rows = dict(ann_id=[], image_id=[], file_name=[], image_path=[], image_size=[], cat=[], bbox=[],
              kpts=[])
  dropped: list[tuple[str, int, int]] = [
      ('an image_id that is not in "images"', ann['id'], ann['category_id'])
      for iid, anns in per_image.items() if iid not in images for ann in anns]
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
  return rows, dropped


def _dataset(rows: dict[str, list], cats: list[dict], dropped: list, ann_file: str,
             image_root: str, max_kpt: int) -> MP100Dataset:
  """The MP100Dataset of the records' columns (N of them) and the category table: keypoints
  padded to [N, max_kpt], boxes [N, 4] with their center / scale."""
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
      dropped=dropped,
      description_sources=[c['description_source'] for c in cats])


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
  if far_outside(ann['keypoints'], width, height):
    return 'a labelled keypoint far outside its image'
  return None


def far_outside(keypoints: list, width: float, height: float) -> bool:
  """Whether a labelled keypoint (v > 0) lies more than the image's own width (height) left or
  right of (above or below) the image: a typo or a swapped file, not an estimate of an occluded
  point (real MP-100 files have labelled points slightly outside their image; those stay)."""
  kp = np.asarray(keypoints, np.float64).reshape(-1, 3)
  x, y = kp[kp[:, 2] > 0, 0], kp[kp[:, 2] > 0, 1]
  return bool(np.any((x < -width) | (x > 2 * width) | (y < -height) | (y > 2 * height)))


def describe_dropped(dropped: list[tuple[str, int, int]]) -> str:
  """'dropped 3 annotations as the official filters do: 2 with no bbox (ids 4, 9), ...'."""
  by_reason: dict[str, list[int]] = {}
  for reason, ann_id, _ in dropped:
    by_reason.setdefault(reason, []).append(ann_id)
  parts = [f'{len(ids)} with {reason} (ids {", ".join(map(str, ids[:5]))}'
           f'{", ..." if len(ids) > 5 else ""})' for reason, ids in by_reason.items()]
  return (f'dropped {len(dropped)} annotations (the official filters and the reader\'s checks): '
          + '; '.join(parts))


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
