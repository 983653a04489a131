"""Chat template: literal expected renders, tokens == encoding of the render, masks == assistant spans."""

import numpy as np
import pytest

from ovjax.data import chat
from tests.data._make_inputs import make_tokenizer

PAD = "<|image_pad|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def tpl(tok):
    return chat.ChatTemplate(tok)


CONV = [
    {"from": "human", "value": "<image>\nWhat is in the image?"},
    {"from": "gpt", "value": "A cat sits on a red mat."},
    {"from": "human", "value": "And the dog?"},
    {"from": "gpt", "value": "It is small."},
]

EXPECTED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|>" + PAD * 6 + "<|vision_end|>\nWhat is in the image?<|im_end|>\n"
    "<|im_start|>assistant\nA cat sits on a red mat.<|im_end|>\n"
    "<|im_start|>user\nAnd the dog?<|im_end|>\n"
    "<|im_start|>assistant\nIt is small.<|im_end|>\n"
)


def test_render_tokens_and_mask(tok, tpl):
    grid = (1, 4, 6)  # 24 patches -> 6 merged tokens
    assert tpl.render(CONV, [grid]) == EXPECTED
    tokens, mask = tpl.encode(CONV, [grid])
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape
    assert tokens.tolist() == tok.encode(EXPECTED, add_special_tokens=False)
    assert tok.decode(tokens[mask]) == "A cat sits on a red mat.<|im_end|>It is small.<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = np.flatnonzero(tokens == im_end)
    assert mask[ends].tolist() == [False, False, True, False, True]
    # the token after a supervised <|im_end|> is the unsupervised newline; the header before is unsupervised
    for e in ends[mask[ends]]:
        assert tok.decode(tokens[e + 1:e + 2]) == "\n" and not mask[e + 1]
    starts = np.flatnonzero(np.diff(mask.astype(int)) == 1) + 1
    im_starts = np.flatnonzero(tokens == tok.convert_tokens_to_ids("<|im_start|>"))
    assert len(starts) == 2
    for s in starts:
        h = im_starts[im_starts < s].max()
        assert tok.decode(tokens[h:s]) == "<|im_start|>assistant\n" and not mask[h:s].any()
    assert (tokens == tok.convert_tokens_to_ids(PAD)).sum() == 6


def test_roles_content_parts_and_system(tok, tpl):
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A photo."}]}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\n<|vision_start|>" + PAD * 2 + "<|vision_end|>Describe.<|im_end|>\n"
                "<|im_start|>assistant\nA photo.<|im_end|>\n")
    assert tpl.render(conv, [(1, 2, 4)]) == expected
    tokens, mask = tpl.encode(conv, [(1, 2, 4)])
    assert tokens.tolist() == tok.encode(expected, add_special_tokens=False)
    assert tok.decode(tokens[mask]) == "A photo.<|im_end|>"


def test_images_without_placeholder_go_first_in_first_user_turn(tpl):
    conv = [{"from": "human", "value": "Compare them."}, {"from": "gpt", "value": "The left one."}]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n<|vision_start|>" + PAD + "<|vision_end|>\n"
                "<|vision_start|>" + PAD * 2 + "<|vision_end|>\nCompare them.<|im_end|>\n"
                "<|im_start|>assistant\nThe left one.<|im_end|>\n")
    assert tpl.render(conv, np.array([[1, 2, 2], [1, 2, 4]])) == expected


def test_text_only_and_generation_prompt(tok, tpl):
    conv = [{"role": "user", "content": "Hi"}]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tpl.render(conv, add_generation_prompt=True) == expected
    tokens, mask = tpl.encode(conv, add_generation_prompt=True)
    assert tokens.tolist() == tok.encode(expected, add_special_tokens=False) and not mask.any()


@pytest.mark.parametrize("conv,grids,reason", [
    (CONV, [], "placeholder_mismatch"),                                   # placeholder, no image
    (CONV, [(1, 2, 2), (1, 2, 2)], "placeholder_mismatch"),               # 1 placeholder, 2 images
    ([{"from": "human", "value": "<image><image>x"}, {"from": "gpt", "value": "y"}], [(1, 2, 2)],
     "placeholder_mismatch"),
    ([{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "  \n"}], [(1, 2, 2)], "empty_assistant"),
    ([{"from": "human", "value": "<image>x"}], [(1, 2, 2)], "no_assistant"),
    ([{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}], [], "unknown_role"),
    ([{"from": "human", "value": "x"}, {"from": "system", "value": "s"}, {"from": "gpt", "value": "y"}], [],
     "misplaced_system"),
    ([{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image> y"}], [(1, 2, 2)], "image_outside_user"),
    ([{"from": "human", "value": "x <|image_pad|>"}, {"from": "gpt", "value": "y"}], [], "special_token_in_text"),
    ([{"from": "human", "value": "x"}, {"from": "gpt", "value": "y<|im_end|>"}], [], "special_token_in_text"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}], [], "malformed_conversation"),
    ([], [], "malformed_conversation"),
    ("just text", [], "malformed_conversation"),
    ([{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}], [(1, 3, 3)], "bad_grid"),
])
def test_rejects(tpl, conv, grids, reason):
    with pytest.raises(chat.SampleRejected) as e:
        tpl.encode(conv, grids)
    assert e.value.reason == reason
    assert isinstance(e.value, ValueError)


def test_reject_reasons_are_stable():
    assert chat.REJECT_REASONS == ("malformed_conversation", "unknown_role", "misplaced_system", "no_assistant",
                                   "empty_assistant", "placeholder_mismatch", "image_outside_user",
                                   "special_token_in_text", "bad_grid")
    with pytest.raises(ValueError, match="unknown reason"):
        chat.SampleRejected("not_a_reason")
