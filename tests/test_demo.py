"""capenext-demo end to end in a real headless browser: Debian's chromium driven by Playwright
(`executable_path`, no browser download). The page is loaded, a photo uploaded, a category
picked (its names and skeleton fill in), Predict pressed; the overlay must show and the
keypoints must be the model's. A screenshot is kept in test-artifacts/demo.png.

The model is the tiny parity fixture (official weights, 64 px input): seconds on a CPU.
"""
from __future__ import annotations

import json
import os
import socket

import numpy as np

from capenext_jax import loading
from capenext_jax.demo import (DemoModel, box_from_clicks, build_app, launch, main,
                               read_category_presets)
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
  launch(app, server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True)
  ARTIFACTS.mkdir(exist_ok=True)
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                  args=['--no-sandbox', '--disable-gpu'])
      page = browser.new_page(viewport={'width': 1400, 'height': 1100})
      page.goto(f'http://127.0.0.1:{port}/')
      expect(page.locator('#predict')).to_be_visible(timeout=30_000)
      page.locator('#photo input[type=file]').set_input_files(str(PHOTO))
      expect(page.locator('#photo img')).to_be_visible(timeout=30_000)
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
