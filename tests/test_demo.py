"""capenext-demo end to end in a real headless browser: Debian's chromium driven by Playwright
(`executable_path`, no browser download). The page opens with a category picked and its names
filled in; a photo is uploaded, two clicks set the box (drawn on the photo) and Predict works at
once; a bad skeleton shows its error on the page; another category is picked (its names and
skeleton fill in), Predict pressed; the overlay must show and the keypoints must be the
model's. A screenshot is kept in test-artifacts/demo.png.

The model is the tiny parity fixture (official weights, 64 px input): seconds on a CPU.
"""
from __future__ import annotations

import json
import os
import re
import socket

import numpy as np

from capenext_jax import loading
from capenext_jax.demo import (DemoModel, box_from_clicks, build_app, launch, main,
                               preset_fields, read_category_presets)
from capenext_jax.mp100.images import load_rgb
from capenext_jax.predictor import Predictor
from conftest import FIXTURES, MP100_MINI, REPO

CHROMIUM = os.environ.get('CAPENEXT_CHROMIUM', '/usr/bin/chromium')
ARTIFACTS = REPO / 'test-artifacts'
PHOTO = MP100_MINI / 'images' / 'tiger_body' / '003464.jpg'
ANNOTATIONS = MP100_MINI / 'annotations' / 'mini_test.json'


class Recording(DemoModel):
  """The demo's model, remembering what the page asked and what it answered."""

  def __call__(self, *inputs):
    self.inputs = inputs
    self.answer = super().__call__(*inputs)
    return self.answer


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# True when the #photo image's pixel [x, y] is white (the drawn box's inner line).
PIXEL_IS_WHITE = """([x, y]) => {
  const im = document.querySelector('#photo img');
  if (!im || !im.complete || !im.naturalWidth) return false;
  const c = document.createElement('canvas');
  c.width = im.naturalWidth; c.height = im.naturalHeight;
  const g = c.getContext('2d');
  g.drawImage(im, 0, 0);
  const d = g.getImageData(x, y, 1, 1).data;
  return d[0] > 220 && d[1] > 220 && d[2] > 220;
}"""


def test_box_from_clicks():
  box, kept = box_from_clicks([], 30, 40)
  assert box == '' and kept == [(30, 40)]
  assert box_from_clicks(kept, 10, 90) == ('10,40,20,50', [])


def test_demo_in_headless_chromium(tmp_path):
  from playwright.sync_api import expect, sync_playwright
  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
  model = Recording(Predictor(loading.load_model(FIXTURES / 'tiny_capenext.npz'), batch_size=1),
                    'tiny_capenext.npz')
  presets = read_category_presets([str(ANNOTATIONS)])
  tiger = presets['tiger_body']
  app = build_app(model, presets)
  port = _free_port()
  launch(app, server_name='127.0.0.1', server_port=port, prevent_thread_lock=True)
  ARTIFACTS.mkdir(exist_ok=True)
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                  args=['--no-sandbox', '--disable-gpu'])
      page = browser.new_page(viewport={'width': 1400, 'height': 1100})
      page.goto(f'http://127.0.0.1:{port}/')
      expect(page.locator('#predict')).to_be_visible(timeout=30_000)
      # Opens ready to predict: the first category picked, its names and skeleton filled in.
      first = next(iter(presets))
      expect(page.locator('#category input')).to_have_value(first, timeout=30_000)
      expect(page.locator('#names textarea')).to_have_value(preset_fields(presets[first])[0],
                                                            timeout=30_000)
      page.locator('#photo input[type=file]').set_input_files(str(PHOTO))
      expect(page.locator('#photo img')).to_be_visible(timeout=30_000)
      # Two clicks set the box, and the photo shows it (a white line inside a dark casing).
      img = page.locator('#photo img')
      shown = img.bounding_box()
      photo_size = img.evaluate('im => [im.naturalWidth, im.naturalHeight]')
      img.click(position={'x': shown['width'] * 0.25, 'y': shown['height'] * 0.3})
      # the first corner is marked (a white cross) before the second click
      page.wait_for_function(PIXEL_IS_WHITE, arg=[round(photo_size[0] * 0.25),
                                                  round(photo_size[1] * 0.3)], timeout=30_000)
      img.click(position={'x': shown['width'] * 0.7, 'y': shown['height'] * 0.8})
      box_field = page.locator('#box input, #box textarea').first
      expect(box_field).to_have_value(re.compile(r'^\d+,\d+,\d+,\d+$'), timeout=30_000)
      x, y, w, h = map(int, box_field.input_value().split(','))
      edge = (x + w // 2, y + 2)
      assert load_rgb(PHOTO)[edge[1], edge[0]].max() < 200   # not white before
      drawn = page.wait_for_function(PIXEL_IS_WHITE, arg=list(edge), timeout=30_000)
      assert drawn.json_value()
      page.locator('#predict').click()
      expect(page.locator('#result')).to_contain_text(presets[first]['descriptions'][0],
                                                      timeout=60_000)
      clicked_box = model.inputs[1]
      # A mistake stays on the page, in words, until the next Predict.
      page.locator('#skeleton textarea, #skeleton input').first.fill('0-99')
      page.locator('#predict').click()
      message = page.locator('#message textarea, #message input').first
      expect(message).to_have_value(re.compile(r'^Error: skeleton: edges \[\(0, 99\)\] index '
                                               r'past the \d+ keypoints'), timeout=30_000)
      page.locator('#category input').click()
      page.get_by_role('option', name='tiger_body').click()
      expect(page.locator('#names textarea')).to_have_value(', '.join(tiger['descriptions']),
                                                            timeout=30_000)
      page.locator('#box input, #box textarea').first.fill('100,50,900,600')
      page.locator('#predict').click()
      expect(page.locator('#overlay img')).to_be_visible(timeout=60_000)
      expect(page.locator('#result')).to_contain_text(tiger['descriptions'][0], timeout=30_000)
      natural = page.locator('#overlay img').evaluate('im => [im.naturalWidth, im.naturalHeight]')
      page.screenshot(path=str(ARTIFACTS / 'demo.png'), full_page=True)
      browser.close()
  finally:
    app.close()
  assert clicked_box == f'{x},{y},{w},{h}'
  # What the page sent is what the user gave, and the answer is the model's own.
  image, box, category, names, skeleton = model.inputs
  photo = load_rgb(PHOTO)
  assert image.shape == photo.shape and box == '100,50,900,600' and category == 'tiger_body'
  assert skeleton == ','.join(f'{i}-{j}' for i, j in tiger['skeleton'])
  overlay, result = model.answer
  assert natural == [overlay.width, overlay.height]
  direct = DemoModel(model.predictor, 'x')(photo, box, category, names, skeleton)[1]
  np.testing.assert_allclose([(k['x'], k['y']) for k in result['keypoints']],
                             [(k['x'], k['y']) for k in direct['keypoints']], atol=1e-3)
  assert len(result['keypoints']) == len(tiger['descriptions'])
  assert result['bbox'] == direct['bbox'] == [100, 50, 899, 599]   # the reader's cleaning (w - 1)
  (ARTIFACTS / 'demo_result.json').write_text(json.dumps(result, indent=1))


def test_demo_without_gradio_names_the_extra(monkeypatch, capsys):
  import sys
  monkeypatch.setitem(sys.modules, 'gradio', None)
  assert main(['--checkpoint', str(FIXTURES / 'tiny_capenext.npz')]) == 2
  assert 'pip install "capenext-jax[demo]"' in capsys.readouterr().err


def test_launch_prints_no_share_hint():
  """Gradio's "set `share=True`" hint is for notebook users; the CLI prints its own address."""
  class App:
    def launch(self, **kwargs):
      self.kwargs = kwargs
  app = App()
  launch(app, server_port=1)
  assert app.kwargs['quiet'] is True and app.kwargs['server_port'] == 1


def test_demo_cli_refuses_bad_category_files_and_a_taken_port(tmp_path, capsys):
  """Before the model loads (the checkpoint named does not exist): one line naming the file or
  --port, exit status 2, no traceback."""
  bad = tmp_path / 'bad.json'
  bad.write_text('{"categories": [,]}')
  other = json.loads(ANNOTATIONS.read_text())
  tiger = next(c for c in other['categories'] if c['name'] == 'tiger_body')
  tiger['skeleton'] = tiger['skeleton'][:-1]
  (tmp_path / 'other.json').write_text(json.dumps(other))
  base = ['--checkpoint', str(tmp_path / 'never_loaded.pth'), '--port', str(_free_port())]
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    for argv, line in [
        (['--categories', str(bad)], f'--categories {bad}: not valid JSON: Expecting value: '
         'line 1 column 17'),
        (['--categories', str(ANNOTATIONS), '--categories', str(tmp_path / 'other.json')],
         f"--categories: category 'tiger_body' has other keypoints or another skeleton in "
         f"{tmp_path / 'other.json'} than in {ANNOTATIONS}"),
        (['--port', str(port)], f'--port {port}: cannot serve on 127.0.0.1:{port} (Address '
         'already in use)')]:
      assert main(base + argv) == 2
      err = capsys.readouterr().err
      assert err.startswith(f'capenext-demo: error: {line}'), err
      assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    # Taken between that check and the launch: the same one line.
    import argparse

    import gradio as gr

    from capenext_jax import cli, demo
    with gr.Blocks() as app:
      gr.Markdown('page')
    args = argparse.Namespace(host='127.0.0.1', port=port, verbose=False)
    assert cli.run_parsed('capenext-demo', lambda a: demo.serve(app, a), args)[0] == 2
    err = capsys.readouterr().err
    assert err.startswith(f'capenext-demo: error: --port {port}: cannot serve on '
                          f'127.0.0.1:{port}') and len(err.strip().splitlines()) == 1, err
  # The same category in two files, identical: nothing to choose, so it is taken.
  assert read_category_presets([str(ANNOTATIONS), str(ANNOTATIONS)]) == read_category_presets(
      [str(ANNOTATIONS)])
