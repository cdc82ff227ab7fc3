"""benchmarks/profile_step.py, the prepared GPU capture, at the CPU test size (`--tiny`): every
phase runs and writes its part, so the capture a lent GPU gets is known to work end to end."""
import json
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
import profile_step  # noqa: E402

PATHS = ('swin_window', 'swin_shifted_window', 'vit_clip_self_attention',
         'head_key_padded_attention')
COMPONENTS = ('backbone_fwd', 'backbone_fwd_bwd', 'clip_image_tower_fwd', 'head_fwd',
              'head_fwd_bwd', 'optimizer_update')


def test_tiny_capture_runs_every_phase_and_writes_its_files(tmp_path):
  out = tmp_path / 'capture'
  # One batch size (64 // 64 = 1 at --tiny) and one attention setting: on a CPU 'xla' compiles
  # a second step for the same wiring.
  status = profile_step.main(['--tiny', '--out', str(out), '--batches', '64',
                              '--attentions', 'auto', '--budget', '3600'])
  summary = json.loads((out / 'summary.json').read_text())
  assert status == 0 and summary['errors'] == {} and summary['skipped'] == []
  assert set(summary['phase_s']) == {'numerics', 'step_auto_b1', 'components'}
  env = json.loads((out / 'env.json').read_text())
  assert env['jax'] == jax.__version__ and env['kernel_platform'] == 'cpu'

  # Every fused path, both dtypes, against the float32 explicit attention. On a CPU the fused
  # call is jax's XLA attention: float32 agrees to round-off (seen: <= 3e-7 of the largest
  # value), bfloat16 to its rounding (seen: <= 1.2e-2; bfloat16 keeps 8 bits, 2^-8 = 3.9e-3
  # per rounding, a few roundings per value); a lost bias, mask or padding errs by O(1).
  for path in PATHS:
    for dtype, bound in (('float32', 1e-5), ('bfloat16', 5e-2)):
      record = summary['numerics'][f'{path}/{dtype}']
      assert record['kernel'] == 'xla', (path, dtype)
      errors = [record['out_rel_err'], *record['grad_rel_err'].values()]
      assert max(errors) <= bound, (path, dtype, record)
  assert set(summary['numerics']['swin_window/float32']['grad_rel_err']) == {'q', 'k', 'v',
                                                                              'bias'}

  step = summary['steps']['auto_b1']
  assert step['finite'] and step['step_ms'] > 0 and step['samples_per_s'] > 0
  census = step['census']
  assert census['ops']['fusion'] > 0 and census['cudnn_attention_calls'] == 0
  assert json.loads((out / 'hlo' / 'auto_b1.ops.json').read_text()) == census
  assert (out / 'hlo' / 'auto_b1.txt').read_text().startswith('HloModule')
  # The 3-step trace, summarised: a header and at most 30 kernels, each with its time.
  header, *rows = (out / 'top_kernels_auto_b1.txt').read_text().splitlines()
  assert header.split()[:4] == ['ms/step', '%', 'calls', 'HLO'] and 0 < len(rows) <= 30
  assert all(float(row.split()[0]) >= 0 for row in rows)
  assert step['trace']['kernels_per_step'] > 0
  assert any((out / 'trace' / 'auto_b1').rglob('*.json.gz'))
  assert set(summary['components_ms']) == set(COMPONENTS)
  assert all(ms > 0 for ms in summary['components_ms'].values())


def test_a_spent_budget_skips_the_phases_and_still_writes_the_summary(tmp_path):
  status = profile_step.main(['--tiny', '--out', str(tmp_path), '--budget', '0'])
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert status == 0 and summary['errors'] == {}
  assert summary['skipped'] == ['numerics', 'step_auto_b2', 'step_xla_b2', 'step_auto_b4',
                                'step_xla_b4', 'components']
  assert 'steps' not in summary or summary['steps'] == {}
