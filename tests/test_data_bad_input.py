"""Bad input in LLaVA files under both policies: 'error' raises naming the file and record index, 'skip' drops the
record, counts it and logs the count. Over-long sequences are truncated (or dropped when no answer fits), counted
and logged under either policy."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from astrea_jax import config as config_lib
from astrea_jax.data import pipeline
from astrea_jax.data.conversation import BadRecordError
import hf_fixtures  # tests/

BAD_INDEX = 2
NUM_GOOD = 4


def good_record(k):
  return {'id': f'good{k}', 'image': f'good_{k % NUM_GOOD}.png',
          'conversations': [{'from': 'human', 'value': '<image>\nwhat is it?'},
                            {'from': 'gpt', 'value': f'answer {k}'}]}


def with_image(path, **changes):
  return dict({'id': 'bad', 'image': path, 'conversations': good_record(0)['conversations']}, **changes)


# case -> (the bad record, or a raw JSONL line; what the error says)
BAD_CASES = {
    'missing_image': (with_image('nope.png'), r'image file \S+nope.png is missing'),
    'truncated_image': (with_image('truncated.png'), r'image file \S+truncated.png cannot be decoded'),
    'unreadable_image': (with_image('notimage.png'), r'image file \S+notimage.png cannot be decoded'),
    'no_conversations': ({'id': 'bad', 'image': 'good_0.png'}, 'no "conversations" field'),
    'roles_out_of_order': (with_image('good_0.png', conversations=[{'from': 'gpt', 'value': 'hi'},
                                                                   {'from': 'human', 'value': '<image>\nq'}]),
                           "roles out of order: turn 0 is from 'gpt', expected 'human'"),
    'ends_with_a_question': (with_image('good_0.png', conversations=[{'from': 'human', 'value': '<image>\nq'}]),
                             "ends with a 'human' turn"),
    'escapes_root': (with_image('../outside.png'), r"image path '../outside.png' escapes the image root"),
    'absolute_path': (with_image('/etc/hostname'), r"image path '/etc/hostname' is absolute"),
    'placeholder_missing': (with_image('good_0.png', conversations=[{'from': 'human', 'value': 'q'},
                                                                    {'from': 'gpt', 'value': 'a'}]),
                            '0 <image> placeholders for 1 images'),
    'too_many_images': ({'id': 'bad', 'images': ['good_0.png', 'good_1.png'],
                         'conversations': [{'from': 'human', 'value': '<image><image>\nq'},
                                           {'from': 'gpt', 'value': 'a'}]}, r'2 images; config.data.max_images=1'),
    'invalid_json_line': ('{"id": "bad", "image": ', 'not valid JSON'),
}


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  """A folder with images/ (good_k.png, a truncated PNG, a text file named .png), outside.png next to images/, and a
  chat tokenizer."""
  root = tmp_path_factory.mktemp('bad_input')
  images = root / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  for k in range(NUM_GOOD):
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f'good_{k}.png')
  Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / 'outside.png')
  data = (images / 'good_0.png').read_bytes()
  (images / 'truncated.png').write_bytes(data[:len(data) // 2])
  (images / 'notimage.png').write_text('this is not an image')
  hf_fixtures.make_chat_tokenizer().save_pretrained(root / 'tokenizer')
  return root


def write_jsonl(path, records):
  with open(path, 'w') as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
  return str(path)


def make_config(root, path, policy, **data):
  c = config_lib.base_config()
  c.data.update(dict(dataset='llava', image_root=str(root / 'images'), template='chatml', visual_tokens=4,
                     seq_len=96, on_bad_record=policy, **data))
  c.data.files.instruct = path
  config_lib.validate(c)
  return c


def rows(root, config):
  """Every row of one unshuffled pass, one example per row, and the iterator's counts."""
  it = iter(pipeline.make_dataset(config, 'instruct', tokenizer_dir=str(root / 'tokenizer'), shuffle=False,
                                  num_epochs=1, batch_size=1))
  try:
    return list(it), it.counts
  finally:
    it.close()


def answers(root, batches):
  """The decoded loss-masked text of each row."""
  tok = pipeline.load_tokenizer(str(root / 'tokenizer')).backend
  return [tok.decode(b['targets'][0][b['loss_mask'][0] > 0].tolist(), skip_special_tokens=False) for b in batches]


def file_with(root, case, bad):
  records = [good_record(k) for k in range(NUM_GOOD)]
  records.insert(BAD_INDEX, bad)
  return write_jsonl(root / f'{case}.jsonl', records)


@pytest.mark.parametrize('case', sorted(BAD_CASES))
def test_error_policy_names_the_file_and_record(root, case):
  bad, message = BAD_CASES[case]
  path = file_with(root, case, bad)
  with pytest.raises(BadRecordError, match=f'^{path} record {BAD_INDEX}: .*{message}'):
    rows(root, make_config(root, path, 'error'))


@pytest.mark.parametrize('case', sorted(BAD_CASES))
def test_skip_policy_drops_counts_and_logs(root, case, caplog):
  bad, _ = BAD_CASES[case]
  path = file_with(root, case, bad)
  with caplog.at_level(logging.WARNING):
    batches, counts = rows(root, make_config(root, path, 'skip'))
  assert answers(root, batches) == [f'answer {k}<|im_end|>' for k in range(NUM_GOOD)]
  assert counts == {'skipped': 1, 'truncated': 0, 'too_long': 0}
  assert f'{path}: skipped 1 bad records so far' in caplog.text
  assert f'{path} record {BAD_INDEX}' in caplog.text  # the record itself is named in the log


def test_kept_examples_skip_and_count_a_bad_record_every_epoch(root):
  path = file_with(root, 'kept', with_image('nope.png'))
  got = {}
  for cache in (False, True):
    it = iter(pipeline.make_dataset(make_config(root, path, 'skip', cache_examples=cache), 'instruct',
                                    tokenizer_dir=str(root / 'tokenizer'), shuffle=False, num_epochs=2, batch_size=1))
    got[cache] = answers(root, list(it)), it.counts
    it.close()
  assert got[True] == got[False] == ([f'answer {k}<|im_end|>' for k in range(NUM_GOOD)] * 2,
                                     {'skipped': 2, 'truncated': 0, 'too_long': 0})


@pytest.mark.parametrize('policy', ['error', 'skip'])
def test_long_sequences_are_truncated_or_dropped_and_counted(root, policy, caplog):
  long_answer = good_record(9)
  long_answer['conversations'][1]['value'] = 'yes ' * 100
  long_question = good_record(8)
  long_question['conversations'][0]['value'] = '<image>\n' + 'why ' * 100
  path = write_jsonl(root / f'long_{policy}.jsonl', [good_record(0), long_answer, long_question, good_record(1)])
  with caplog.at_level(logging.WARNING):
    batches, counts = rows(root, make_config(root, path, policy))
  got = answers(root, batches)
  assert got[0] == 'answer 0<|im_end|>' and got[2] == 'answer 1<|im_end|>' and len(got) == 3
  assert got[1].startswith('yes yes') and not got[1].endswith('<|im_end|>')  # cut at seq_len
  assert counts == {'skipped': 0, 'truncated': 1, 'too_long': 1}
  assert f'{path}: truncated 1 sequences longer than config.data.seq_len' in caplog.text
  assert f'{path}: dropped 1 sequences with no answer token within config.data.seq_len' in caplog.text
  assert f'{path} record 2: no answer token within the first 96 tokens' in caplog.text


def test_error_from_a_worker_process_names_the_record(root):
  path = file_with(root, 'worker_missing', BAD_CASES['missing_image'][0])
  with pytest.raises(BadRecordError, match=f'{path} record {BAD_INDEX}: image file .*nope.png is missing'):
    rows(root, make_config(root, path, 'error', num_workers=2))


def test_a_broken_json_array_is_an_error_of_the_file(root):
  path = root / 'broken.json'
  path.write_text(json.dumps([good_record(0), good_record(1)], indent=1)[:-20] + ',]')
  with pytest.raises(ValueError, match=rf'{path}: not a valid JSON array of records at line \d+ column \d+'):
    rows(root, make_config(root, str(path), 'skip'))


def test_json_array_and_jsonl_read_the_same(root):
  records = [good_record(k) for k in range(NUM_GOOD)]
  array = root / 'records.json'
  array.write_text(json.dumps(records, indent=2, ensure_ascii=False))
  lines = write_jsonl(root / 'records.jsonl', records)
  a, _ = rows(root, make_config(root, str(array), 'error'))
  b, _ = rows(root, make_config(root, lines, 'error'))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_equal(x, y)


def test_multi_image_and_text_only_records(root):
  two = {'id': 'two', 'images': ['good_1.png', 'good_2.png'],
         'conversations': [{'from': 'human', 'value': '<image>\nand <image>\nsame?'}, {'from': 'gpt', 'value': 'no'}]}
  text_only = {'id': 'text', 'conversations': [{'from': 'human', 'value': 'hi?'}, {'from': 'gpt', 'value': 'hello'}]}
  path = write_jsonl(root / 'mixed.jsonl', [good_record(0), two, text_only, good_record(3)])
  batches, counts = rows(root, make_config(root, path, 'error', max_images=2))
  assert [b['image_ids'][0].tolist() for b in batches] == [[0, -1], [1, 2], [-1, -1], [3, -1]]
  assert [int(b['image_mask'].sum()) for b in batches] == [4, 8, 0, 4]
  assert answers(root, batches) == ['answer 0<|im_end|>', 'no<|im_end|>', 'hello<|im_end|>', 'answer 3<|im_end|>']
  assert counts == {'skipped': 0, 'truncated': 0, 'too_long': 0}
  caption = [b['images']['caption'][0] for b in batches]  # [2 slots, 64, 64, 3] per row
  assert np.all(caption[2] == 0)  # a text-only record leaves its slots empty
  padded = np.full((24, 24, 3), 128, np.uint8)  # LLaVA-1.5: pad to a square with the mean colour, then resize
  padded[2:22] = np.asarray(Image.open(root / 'images' / 'good_2.png').convert('RGB'))
  reference = np.asarray(Image.fromarray(padded).resize((64, 64), Image.BICUBIC), np.float32) / 255
  np.testing.assert_allclose(caption[1][1], reference, atol=1e-6)  # [0, 1]; the expert normalises


@pytest.mark.parametrize('policy', ['error', 'skip'])
def test_a_file_whose_records_are_all_dropped_stops_with_an_error(root, policy):
  """Every record dropped (bad and skipped, or no answer within seq_len): the pipeline used to read the repeated
  stream forever; it stops after config.data.max_consecutive_drops drops in a row, naming the file and the reasons."""
  long_question = good_record(8)
  long_question['conversations'][0]['value'] = '<image>\n' + 'why ' * 100
  records = [long_question] * 3 + [with_image('nope.png')] * (2 if policy == 'skip' else 0)
  path = write_jsonl(root / f'all_dropped_{policy}.jsonl', records)
  config = make_config(root, path, policy, max_consecutive_drops=7)
  it = iter(pipeline.make_dataset(config, 'instruct', tokenizer_dir=str(root / 'tokenizer'), shuffle=False,
                                  batch_size=1))  # repeats forever (num_epochs=0)
  skipped = 'bad records skipped' if policy == 'skip' else ''
  with pytest.raises(pipeline.DroppedEverythingError,
                     match=rf'^{path}: the last 7 records were all dropped \(\d+ {skipped}.*no answer token'):
    next(it)
  it.close()


def test_single_turn_rows_hold_one_exchange_each_with_the_image_in_front(root):
  three = {'id': 'three', 'image': 'good_1.png', 'conversations': [
      {'from': 'human', 'value': '<image>\nfirst?'}, {'from': 'gpt', 'value': 'one'},
      {'from': 'human', 'value': 'second?'}, {'from': 'gpt', 'value': 'two'},
      {'from': 'human', 'value': 'third?'}, {'from': 'gpt', 'value': 'three'}]}
  path = write_jsonl(root / 'single_turn.jsonl', [good_record(0), with_image('nope.png'), three])
  config = make_config(root, path, 'skip')
  it = iter(pipeline.make_dataset(config, 'instruct', tokenizer_dir=str(root / 'tokenizer'), shuffle=False,
                                  num_epochs=1, batch_size=1, single_turn=True))
  batches, counts = list(it), it.counts
  assert answers(root, batches) == ['answer 0<|im_end|>', 'one<|im_end|>', 'two<|im_end|>', 'three<|im_end|>']
  assert [b['image_ids'][0].tolist() for b in batches] == [[0], [2], [2], [2]]  # the same image for each exchange
  assert all(int(b['image_mask'].sum()) == 4 for b in batches)
  tok = pipeline.load_tokenizer(str(root / 'tokenizer')).backend
  questions = [tok.decode(b['inputs'][0][b['instruction_mask'][0] > 0].tolist()) for b in batches]
  assert questions == ['what is it?', 'first?', 'second?', 'third?']  # the instruction being answered
  assert counts['skipped'] == 1
