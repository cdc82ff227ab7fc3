"""configs/mp100.py's training input: TFDS records + device warp for accelerator (bfloat16)
runs, json + host warp otherwise; `splits.train_source` builds the records from the run's files."""
import pytest

from configs import mp100
from conftest import MP100_MINI


def test_mp100_config_picks_records_for_bfloat16_and_json_otherwise():
  for arg in ('', 'dtype=float32', 'dtype=bfloat16,pipeline=json', 'dtype=bfloat16,mask',
              'dtype=bfloat16,runlocal'):
    c = mp100.get_config(arg)
    assert 'train_records' not in c.data and c.data.warp == 'host', arg
  for arg in ('dtype=bfloat16', 'pipeline=records,root=/data/mp100'):
    c = mp100.get_config(arg)
    assert c.data.train_records == f'{c.data.root}/tfds' and c.data.warp == 'device', arg
  with pytest.raises(ValueError, match='pipeline'):
    mp100.get_config('pipeline=tfrecords')


def test_train_source_builds_records_of_the_same_instances(tmp_path):
  from data_pipeline import splits
  c = mp100.get_config(f'dtype=bfloat16,root={MP100_MINI}')
  c.data.train_records = str(tmp_path / 'tfds')
  files = dict(train=str(MP100_MINI / 'annotations' / 'mini_train.json'),
               image_root=str(MP100_MINI / 'images'))
  records = splits.train_source(c, files)
  del c.data.train_records
  json = splits.train_source(c, files)
  assert (records.kind, json.kind) == ('records', 'json')
  assert len(json.dataset) > 0
  assert records.dataset.ann_id.tolist() == json.dataset.ann_id.tolist()
