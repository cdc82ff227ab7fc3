"""capenext-demo: a web page (Gradio) that predicts keypoints of a described category.

  capenext-demo --checkpoint my_capenext/ [--categories mp100_split1_test.json] [--port 7860]

Upload a photo; optionally give the object's box (type x,y,w,h, or click its top-left and then
its bottom-right corner on the photo); pick a category from the annotation files given with
`--categories` (its keypoint descriptions, by the official renaming, and its skeleton fill in)
or type a category name, the keypoint names and a skeleton ("0-1,1-2"); get the overlay and
the keypoints as JSON (image pixels). It runs on CPU. Needs the `[demo]` extra (Gradio).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from capenext_jax import cli, loading
from capenext_jax.extras import require
from capenext_jax.predict import (keypoints_record, overlay, parse_bbox, parse_descriptions,
                                  parse_skeleton)
from capenext_jax.predictor import Predictor, Query, clean_bbox


def read_category_presets(files: Sequence[str]) -> dict[str, dict]:
  """{category name: {'descriptions', 'skeleton'}} from MP-100 / COCO keypoint files (the
  annotation reader's validation; descriptions by the official renaming)."""
  from capenext_jax.mp100.annotations import read_categories
  presets = {}
  for path in files:
    with open(path, encoding='utf-8') as f:
      coco = json.load(f)
    for cat in read_categories(coco, path):
      presets[cat['name']] = {'descriptions': list(cat['descriptions'][:cat['k']]),
                              'skeleton': [list(e) for e in cat['skeleton']]}
  return dict(sorted(presets.items()))


def box_from_clicks(clicks: list, x: float, y: float) -> tuple[str, list]:
  """Two clicks on the photo make a box: returns (box text or '', the clicks kept)."""
  clicks = [*clicks, (x, y)][-2:]
  if len(clicks) < 2:
    return '', clicks
  (x0, y0), (x1, y1) = clicks
  box = (min(x0, x1), min(y0, y1), abs(x1 - x0), abs(y1 - y0))
  return ','.join(f'{v:g}' for v in box), []


class DemoModel:
  """What one request runs: the parsing of the page's fields and the predictor."""

  def __init__(self, predictor: Predictor, checkpoint: str):
    self.predictor, self.checkpoint = predictor, checkpoint

  def __call__(self, image: np.ndarray, box: str, category: str, names: str, skeleton: str):
    """-> (overlay PIL image, result dict). ValueError for an input it cannot use."""
    if image is None:
      raise ValueError('upload a photo first')
    image = np.asarray(image, np.uint8)[..., :3]
    if not (category or '').strip():
      raise ValueError('give a category name (e.g. "tiger")')
    descriptions = parse_descriptions(names or '', None)
    query = Query(image=image,
                  bbox=clean_bbox(parse_bbox(box.strip() or None), image.shape[1],
                                  image.shape[0]),
                  category=category.strip(), descriptions=descriptions,
                  skeleton=parse_skeleton((skeleton or '').strip(), len(descriptions)))
    points = self.predictor([query])[0]
    result = {'width': image.shape[1], 'height': image.shape[0], 'bbox': query.bbox.tolist(),
              'category': query.category, 'keypoints': keypoints_record(points, query),
              'skeleton': [list(e) for e in query.skeleton], 'checkpoint': self.checkpoint}
    return overlay(query, points), result


def build_app(model: DemoModel, presets: dict[str, dict]):
  """The Gradio Blocks page around `model`."""
  gr = require('gradio', 'demo', 'the web demo')

  def run(image, box, category, names, skeleton):
    try:
      return model(image, box, category, names, skeleton)
    except ValueError as e:
      raise gr.Error(str(e)) from e

  def fill(category):
    preset = presets.get(category)
    if preset is None:
      return gr.update(), gr.update()
    return (', '.join(preset['descriptions']),
            ','.join(f'{i}-{j}' for i, j in preset['skeleton']))

  def clicked(clicks, evt):
    box, clicks = box_from_clicks(clicks, *evt.index)
    return (box if box else gr.update()), clicks

  # Gradio passes the click's coordinates to a parameter annotated with the class itself (this
  # module's annotations are strings, which it does not resolve).
  clicked.__annotations__['evt'] = gr.SelectData

  with gr.Blocks(title='CapeNext keypoints') as app:
    gr.Markdown('# CapeNext: keypoints of any category\nUpload a photo, describe the '
                'keypoints (or pick a category), and press **Predict**. Click two corners on '
                'the photo to set the box.')
    clicks = gr.State([])
    with gr.Row():
      with gr.Column():
        image = gr.Image(label='photo', type='numpy', elem_id='photo')
        box = gr.Textbox(label='box x,y,w,h (empty: the whole photo)', elem_id='box')
        category = gr.Dropdown(choices=list(presets), label='category', allow_custom_value=True,
                               elem_id='category')
        names = gr.Textbox(label='keypoint names, comma-separated', lines=3, elem_id='names')
        skeleton = gr.Textbox(label='skeleton, 0-based pairs "0-1,1-2" (optional)',
                              elem_id='skeleton')
        button = gr.Button('Predict', variant='primary', elem_id='predict')
      with gr.Column():
        result_image = gr.Image(label='overlay', type='pil', elem_id='overlay')
        result_json = gr.JSON(label='keypoints (image pixels)', elem_id='result')
    category.change(fill, inputs=[category], outputs=[names, skeleton])
    image.select(clicked, inputs=[clicks], outputs=[box, clicks])
    button.click(run, inputs=[image, box, category, names, skeleton],
                 outputs=[result_image, result_json])
  return app


def launch(app, **kwargs) -> None:
  """Serve `app` (kwargs: Gradio's `launch`, e.g. server_name, server_port) with system fonts:
  the default theme's web fonts would be fetched from the internet."""
  gr = require('gradio', 'demo', 'the web demo')
  theme = gr.themes.Default(font=['system-ui', 'sans-serif'], font_mono=['monospace'])
  app.launch(theme=theme, **kwargs)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='capenext-demo', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True,
                 help='export, train.py workdir, official .pth / .npz, or parity fixture')
  p.add_argument('--config', help='model config JSON for official checkpoints (default: headline)')
  p.add_argument('--categories', action='append', default=[],
                 help='MP-100 / COCO keypoint json whose categories fill the picker (repeatable)')
  p.add_argument('--host', default='127.0.0.1', help='address to serve on (0.0.0.0: everyone)')
  p.add_argument('--port', type=int, default=7860)
  p.add_argument('-v', '--verbose', action='store_true', help='tracebacks for errors')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  status, app = cli.run_parsed(parser.prog, build, args)
  if status:
    return status
  launch(app, server_name=args.host, server_port=args.port)
  return 0


def build(args):
  """The page for the command line's checkpoint and category files."""
  require('gradio', 'demo', 'the web demo')   # before the model loads
  config = loading.read_config(args.config) if args.config else None
  model = DemoModel(Predictor(loading.load_model(args.checkpoint, config), batch_size=1),
                    args.checkpoint)
  return build_app(model, read_category_presets(args.categories))


if __name__ == '__main__':
  sys.exit(main())
