"""Chat templates: rendered strings, token ids and the Eq. 1 loss mask against hand-written expectations; the
next-token shift and truncation of rows."""

import numpy as np
import pytest

from astrea_jax.data import sequence, templates
from astrea_jax.data.templates import TokenizedConversation
import hf_fixtures  # tests/

TURNS = (('human', '<image>\nhow many shapes?'), ('gpt', 'three.'),
         ('human', 'is there a red circle?'), ('gpt', 'yes'))
VISUAL = 3
IMAGE_ID = 317


@pytest.fixture(scope='module')
def tokenizer():
  return hf_fixtures.make_chat_tokenizer()


def runs(tokenizer, ids, mask):
  """The decoded text of each maximal run of positions where mask is set."""
  out, i = [], 0
  while i < len(mask):
    if mask[i]:
      j = i
      while j < len(mask) and mask[j]:
        j += 1
      out.append(tokenizer.decode(ids[i:j]))
      i = j
    else:
      i += 1
  return out


def test_vicuna_v1_renders_like_llava():
  text, spans, instruction = templates.render(templates.TEMPLATES['vicuna_v1'], TURNS)
  assert text == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions. USER: <image>\nhow many shapes? "
                  "ASSISTANT: three.</s>USER: is there a red circle? ASSISTANT: yes</s>")
  assert [text[a:b] for a, b in spans] == ['three.</s>', 'yes</s>']
  assert [text[a:b] for a, b in instruction] == ['how many shapes?']  # the first user message, no placeholder


def test_chatml_renders_like_llava_next():
  text, spans, instruction = templates.render(templates.TEMPLATES['chatml'], TURNS)
  assert [text[a:b] for a, b in instruction] == ['how many shapes?']
  assert text == ('<|im_start|>system\nAnswer the questions.<|im_end|>\n'
                  '<|im_start|>user\n<image>\nhow many shapes?<|im_end|>\n<|im_start|>assistant\nthree.<|im_end|>\n'
                  '<|im_start|>user\nis there a red circle?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n')
  assert [text[a:b] for a, b in spans] == ['three.<|im_end|>', 'yes<|im_end|>']


def test_vicuna_v1_tokens_and_loss_mask(tokenizer):
  tc = templates.tokenize_conversation(tokenizer.backend_tokenizer, templates.TEMPLATES['vicuna_v1'], TURNS,
                                       visual_tokens=VISUAL, image_token_id=IMAGE_ID, bos_id=tokenizer.bos_token_id)
  assert tc.ids[0] == tokenizer.bos_token_id
  assert runs(tokenizer, tc.ids, tc.target_mask) == [' three.</s>', ' yes</s>']
  assert runs(tokenizer, tc.ids, ~tc.target_mask & ~tc.image_mask) == [
      "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the user's questions. USER: ",
      '\nhow many shapes? ASSISTANT:',
      'USER: is there a red circle? ASSISTANT:']
  image_positions = np.nonzero(tc.image_mask)[0]
  assert len(image_positions) == VISUAL and np.all(np.diff(image_positions) == 1)
  assert np.all(tc.ids[image_positions] == IMAGE_ID)
  assert tc.ids[-1] == tokenizer.eos_token_id and tc.target_mask[-1]


def test_chatml_tokens_and_loss_mask(tokenizer):
  tc = templates.tokenize_conversation(tokenizer.backend_tokenizer, templates.TEMPLATES['chatml'], TURNS,
                                       visual_tokens=VISUAL, image_token_id=IMAGE_ID, bos_id=tokenizer.bos_token_id)
  im_start, im_end = tokenizer.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>'])
  assert tc.ids[0] == im_start  # no BOS for chatml
  assert runs(tokenizer, tc.ids, tc.target_mask) == ['three.<|im_end|>', 'yes<|im_end|>']
  assert runs(tokenizer, tc.ids, ~tc.target_mask & ~tc.image_mask) == [
      '<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n',
      '\nhow many shapes?<|im_end|>\n<|im_start|>assistant\n',
      '\n<|im_start|>user\nis there a red circle?<|im_end|>\n<|im_start|>assistant\n',
      '\n']
  assert list(tc.ids[tc.target_mask]).count(im_end) == 2
  assert np.count_nonzero(tc.image_mask) == VISUAL


def test_two_images_fill_their_placeholders_in_order(tokenizer):
  turns = (('human', '<image>\nleft one, <image>\nright one. same?'), ('gpt', 'no'))
  tc = templates.tokenize_conversation(tokenizer.backend_tokenizer, templates.TEMPLATES['chatml'], turns,
                                       visual_tokens=VISUAL, image_token_id=IMAGE_ID, bos_id=None)
  starts = sequence.image_block_starts(tc.image_mask)
  assert len(starts) == 2 and np.count_nonzero(tc.image_mask) == 2 * VISUAL
  assert tokenizer.decode(tc.ids[starts[0] + VISUAL:starts[1]]) == '\nleft one, '


def test_each_image_may_have_its_own_token_count(tokenizer):
  """AnyRes images of different sizes: the k-th placeholder becomes visual_tokens[k] image tokens."""
  turns = (('human', '<image>\nleft one, <image>\nright one. same?'), ('gpt', 'no'))
  tc = templates.tokenize_conversation(tokenizer.backend_tokenizer, templates.TEMPLATES['chatml'], turns,
                                       visual_tokens=(2, 5), image_token_id=IMAGE_ID, bos_id=None)
  starts = sequence.image_block_starts(tc.image_mask)
  assert np.count_nonzero(tc.image_mask) == 7 and tokenizer.decode(tc.ids[starts[0] + 2:starts[1]]) == '\nleft one, '
  with pytest.raises(ValueError, match=r'1 visual token counts for 2 <image> placeholders'):
    templates.tokenize_conversation(tokenizer.backend_tokenizer, templates.TEMPLATES['chatml'], turns,
                                    visual_tokens=(2,), image_token_id=IMAGE_ID, bos_id=None)


def test_missing_template_marker_is_named(tokenizer):
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers
  plain = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))  # a BPE tokenizer without the chat markers
  plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  plain.train_from_iterator(list(hf_fixtures.TOKENIZER_CORPUS), trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<unk>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  with pytest.raises(ValueError, match=r"tokenizer TOKDIR: the chatml template needs '<\|im_start\|>' as one token"):
    templates.check_special_tokens(plain, templates.TEMPLATES['chatml'], 'TOKDIR')
  templates.check_special_tokens(tokenizer.backend_tokenizer, templates.TEMPLATES['chatml'], 'TOKDIR')
  with pytest.raises(ValueError, match="unknown chat template 'llama3'"):
    templates.get_template('llama3')


def conversation(ids, target, image):
  return TokenizedConversation(np.asarray(ids, np.int32), np.asarray(target, bool), np.asarray(image, bool),
                               np.zeros(len(ids), bool))


def test_next_token_shift_puts_the_loss_on_answer_targets():
  tc = conversation([1, 5, 9, 9, 6, 7, 2], [0, 0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0, 0])
  fields = sequence.next_token_fields(tc)
  np.testing.assert_array_equal(fields['inputs'], [1, 5, 9, 9, 6, 7])
  np.testing.assert_array_equal(fields['targets'], [5, 9, 9, 6, 7, 2])
  np.testing.assert_array_equal(fields['loss_mask'], [0, 0, 0, 0, 1, 1])  # predicting 7 and 2 (Eq. 1)
  np.testing.assert_array_equal(fields['image_mask'], [0, 0, 1, 1, 0, 0])


def test_truncation_never_cuts_through_an_image():
  tc = conversation([1, 5, 9, 9, 9, 6, 7, 2], [0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0])
  same, cut = sequence.truncate(tc, 7)
  assert not cut and same is tc
  kept, cut = sequence.truncate(tc, 6)  # inputs [1 5 9 9 9 6]: the image fits whole
  assert cut and list(kept.ids) == [1, 5, 9, 9, 9, 6, 7]
  kept, cut = sequence.truncate(tc, 3)  # inputs would end inside the image: it is dropped
  assert cut and list(kept.ids) == [1, 5, 9] and len(sequence.image_block_starts(kept.image_mask[:-1])) == 0


def test_instruction_tokens_are_the_same_in_a_training_row_and_an_evaluation_prompt(tokenizer):
  """The router's text context ('visual+text') pools the tokens of the question being answered: the same ids in a
  single-turn training conversation and in the generation prompt the evaluation builds."""
  from astrea_jax.eval import prompting
  template = templates.TEMPLATES['chatml']
  question = 'what colour is the small circle?'
  train = templates.tokenize_conversation(tokenizer.backend_tokenizer, template,
                                          [('human', f'<image>\n{question}'), ('gpt', 'red')], visual_tokens=3,
                                          image_token_id=5, bos_id=None)
  prompt = templates.tokenize_conversation(tokenizer.backend_tokenizer, prompting.generation_template(template),
                                           [('human', f'<image>\n{question}')], visual_tokens=3, image_token_id=5,
                                           bos_id=None)
  assert list(train.ids[train.instruction_mask]) == list(prompt.ids[prompt.instruction_mask])
  assert tokenizer.decode(list(train.ids[train.instruction_mask])) == question


def test_caption_tokens_are_the_caption_and_the_end_marker(tokenizer):
  template = templates.TEMPLATES['chatml']
  ids, mask = templates.caption_tokens(tokenizer.backend_tokenizer, template, 'a red circle', 12, pad_id=0)
  assert tokenizer.decode(list(ids[mask])) == 'a red circle<|im_end|>' and not ids[~mask].any()
  short, short_mask = templates.caption_tokens(tokenizer.backend_tokenizer, template, 'a red circle', 2, pad_id=0)
  assert short_mask.all() and list(short) == list(ids[:2])
