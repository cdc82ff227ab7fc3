"""capenext-demo: a web page (Gradio) that predicts keypoints of a described category.

  capenext-demo --checkpoint my_capenext/ [--categories mp100_split1_test.json] [--port 7860]

Upload a photo; optionally give the object's box (type x,y,w,h, or click its top-left and then
its bottom-right corner on the photo, which then shows it); pick a category from the annotation
files given with `--categories` (its keypoint descriptions, by the official renaming, and its
skeleton fill in; the page opens with the first one picked) or type a category name, the
keypoint names and a skeleton ("0-1,1-2"); get the overlay and the keypoints as JSON (image
pixels), or what is wrong with the input in the message box. It runs on CPU. Needs the `[demo]`
extra (Gradio).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Sequence

import numpy as np

from capenext_jax import cli, loading
from capenext_jax.evaluation.visualize import draw_box
from capenext_jax.extras import require
from capenext_jax.mp100.annotations import read_categories
from capenext_jax.mp100.json_files import read_text
from capenext_jax.predict import (check_finite, overlay, parse_bbox, parse_descriptions,
                                  parse_skeleton, result_record)
from capenext_jax.predictor import Predictor, Query, clean_bbox


def read_category_presets(files: Sequence[str]) -> dict[str, dict]:
  """{category name: {'descriptions', 'skeleton'}} from MP-100 / COCO keypoint files (the
  annotation reader's validation; descriptions by the official renaming). A name that two
  files give different keypoints or skeletons is refused: neither would be right to pick."""
  presets, source = {}, {}
  for path in files:
    try:
      coco = json.loads(read_text(path, 'category file'))
    except json.JSONDecodeError as e:
      raise ValueError(f'--categories {path}: not valid JSON: {e}') from None
    for cat in read_categories(coco, path):
      name = cat['name']
      preset = {'descriptions': list(cat['descriptions'][:cat['k']]),
                'skeleton': [list(e) for e in cat['skeleton']]}
      if name in presets and presets[name] != preset:
        raise ValueError(f'--categories: category {name!r} has other keypoints or another '
                         f'skeleton in {path} than in {source[name]}: give one of the files, '
                         f'or rename the category in one')
      presets[name] = preset
      source.setdefault(name, path)
  return dict(sorted(presets.items()))


def preset_fields(preset: dict | None) -> tuple[str, str]:
  """(names box, skeleton box) text of a category preset; ('', '') for none."""
  if preset is None:
    return '', ''
  return (', '.join(preset['descriptions']),
          ','.join(f'{i}-{j}' for i, j in preset['skeleton']))


def box_from_clicks(clicks: list, x: float, y: float) -> tuple[str, list]:
  """Two clicks on the photo make a box: returns (box text or '', the clicks kept)."""
  clicks = [*clicks, (x, y)][-2:]
  if len(clicks) < 2:
    return '', clicks
  (x0, y0), (x1, y1) = clicks
  box = (min(x0, x1), min(y0, y1), abs(x1 - x0), abs(y1 - y0))
  return ','.join(f'{v:g}' for v in box), []


def photo_with_box(photo: np.ndarray, box: str, corners=()):
  """The photo with the box text's box (when it parses) and pending corner clicks drawn."""
  try:
    given = parse_bbox((box or '').strip() or None)
  except ValueError:
    given = None   # still being typed: Predict names what is wrong
  return draw_box(photo, given, corners)


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
    descriptions = parse_descriptions(names or '', None, flag='keypoint names')
    given = parse_bbox(box.strip() or None)
    query = Query(image=image, bbox=clean_bbox(given, image.shape[1], image.shape[0]),
                  category=category.strip(), descriptions=descriptions,
                  skeleton=parse_skeleton((skeleton or '').strip(), len(descriptions),
                                          flag='skeleton'))
    points = self.predictor([query])[0]
    check_finite(points, 'the photo', self.checkpoint)
    return overlay(query, points), result_record(query, points, given, self.checkpoint)


def build_app(model: DemoModel, presets: dict[str, dict]):
  """The Gradio Blocks page around `model`. It opens with the first preset category picked
  and its names and skeleton filled in. A mistake is shown in the message box under Predict
  until the next press (not only as a toast that fades), and is not logged as a traceback."""
  gr = require('gradio', 'demo', 'the web demo')
  initial = next(iter(presets), None)
  initial_names, initial_skeleton = preset_fields(presets.get(initial))

  def run(image, photo, box, category, names, skeleton):
    try:
      drawn, result = model(photo if photo is not None else image, box, category, names,
                            skeleton)
    except ValueError as e:
      return None, None, f'Error: {cli.one_line(e)}'
    return drawn, result, f'{len(result["keypoints"])} keypoints predicted.'

  def fill(category):
    preset = presets.get(category)
    return (gr.update(), gr.update()) if preset is None else preset_fields(preset)

  def uploaded(image):
    """A new photo: kept unmarked (predictions and drawings start from it); box cleared."""
    return image, [], ''

  def clicked(image, photo, box, clicks, evt):
    photo = image if photo is None else photo   # a photo that came without an upload event
    new_box, clicks = box_from_clicks(clicks, *evt.index)
    box = new_box or box
    return box, clicks, photo_with_box(photo, '' if clicks else box, clicks), photo

  def box_typed(photo, box, clicks):
    return gr.update() if photo is None else photo_with_box(photo, box, clicks)

  # Gradio passes the click's coordinates to a parameter annotated with the class itself (this
  # module's annotations are strings, which it does not resolve).
  clicked.__annotations__['evt'] = gr.SelectData

  with gr.Blocks(title='CapeNext keypoints') as app:
    gr.Markdown('# CapeNext: keypoints of any category\nUpload a photo, describe the '
                'keypoints (or pick a category), and press **Predict**. Click two corners on '
                'the photo to set the box.')
    clicks = gr.State([])
    photo = gr.State(None)   # the upload without the box drawn on it
    with gr.Row():
      with gr.Column():
        image = gr.Image(label='photo', type='numpy', elem_id='photo')
        box = gr.Textbox(label='box x,y,w,h (empty: the whole photo)', elem_id='box')
        category = gr.Dropdown(choices=list(presets), value=initial, label='category',
                               allow_custom_value=True, elem_id='category')
        names = gr.Textbox(label='keypoint names, comma-separated', lines=3,
                           value=initial_names, elem_id='names')
        skeleton = gr.Textbox(label='skeleton, 0-based pairs "0-1,1-2" (optional)',
                              value=initial_skeleton, elem_id='skeleton')
        button = gr.Button('Predict', variant='primary', elem_id='predict')
        message = gr.Textbox(label='message', interactive=False, elem_id='message')
      with gr.Column():
        result_image = gr.Image(label='overlay', type='pil', elem_id='overlay')
        result_json = gr.JSON(label='keypoints (image pixels)', elem_id='result')
    category.change(fill, inputs=[category], outputs=[names, skeleton])
    image.upload(uploaded, inputs=[image], outputs=[photo, clicks, box])
    image.clear(lambda: (None, []), outputs=[photo, clicks])
    image.select(clicked, inputs=[image, photo, box, clicks], outputs=[box, clicks, image, photo])
    box.submit(box_typed, inputs=[photo, box, clicks], outputs=[image])
    box.blur(box_typed, inputs=[photo, box, clicks], outputs=[image])
    button.click(run, inputs=[image, photo, box, category, names, skeleton],
                 outputs=[result_image, result_json, message])
  return app


def launch(app, **kwargs) -> None:
  """Serve `app` (kwargs: Gradio's `launch`, e.g. server_name, server_port) with system fonts:
  the default theme's web fonts would be fetched from the internet. Quiet unless asked: the
  command line prints its own address, not Gradio's hint about public share links."""
  gr = require('gradio', 'demo', 'the web demo')
  theme = gr.themes.Default(font=['system-ui', 'sans-serif'], font_mono=['monospace'])
  kwargs.setdefault('quiet', True)
  app.launch(theme=theme, **kwargs)


def _port(text: str) -> int:
  value = int(text)
  if not 1 <= value <= 65535:
    raise argparse.ArgumentTypeError(f'{value}: a port is 1..65535')
  return value


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='capenext-demo', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True,
                 help='export, train.py workdir, official .pth / .npz, or parity fixture')
  p.add_argument('--config', help='model config JSON for official checkpoints (default: headline)')
  p.add_argument('--categories', action='append', default=[],
                 help='MP-100 / COCO keypoint json whose categories fill the picker (repeatable; '
                 'a category two files define differently is refused)')
  p.add_argument('--host', default='127.0.0.1', help='address to serve on (0.0.0.0: everyone)')
  p.add_argument('--port', type=_port, default=7860)
  p.add_argument('-v', '--verbose', action='store_true', help='tracebacks for errors')
  return p


def check_port(host: str, port: int) -> None:
  """ValueError naming --port when `host:port` cannot be served (in use, not this machine's),
  before the model loads."""
  try:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds
      s.bind((host, port))
  except OSError as e:
    raise ValueError(f'--port {port}: cannot serve on {host}:{port} '
                     f'({e.strerror or e}); pick another --port or --host') from None


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  status, app = cli.run_parsed(parser.prog, build, args)
  if status:
    return status
  return cli.run_parsed(parser.prog, lambda a: serve(app, a), args)[0]


def build(args):
  """The page for the command line's checkpoint and category files."""
  require('gradio', 'demo', 'the web demo')   # before the model loads
  check_port(args.host, args.port)
  presets = read_category_presets(args.categories)
  config = loading.read_config(args.config) if args.config else None
  model = DemoModel(Predictor(loading.load_model(args.checkpoint, config), batch_size=1),
                    args.checkpoint)
  return build_app(model, presets)


def serve(app, args) -> None:
  """Serve until Ctrl-C; the port taken meanwhile is one line naming --port."""
  try:
    launch(app, server_name=args.host, server_port=args.port, prevent_thread_lock=True)
  except OSError as e:
    raise ValueError(f'--port {args.port}: cannot serve on {args.host}:{args.port} '
                     f'({cli.one_line(e).split(". ")[0]}); pick another --port') from None
  print(f'capenext-demo: serving {app.local_url} (Ctrl-C stops it)', flush=True)
  app.block_thread()


if __name__ == '__main__':
  sys.exit(main())
