"""Qwen2-VL chat template with image expansion and assistant-only loss masks built from role spans.

Rendered text of a conversation (model.md section 6):

    <|im_start|>system\\n{system}<|im_end|>\\n          (default system "You are a helpful assistant.")
    <|im_start|>user\\n{text, each <image> -> <|vision_start|> + K x <|image_pad|> + <|vision_end|>}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n
    ...

K = t*h*w / merge_size**2 for the image's grid (t, h, w), images taken in placeholder order. If the
conversation has images but no `<image>` placeholder anywhere, LLaVA's convention applies: one "<image>\\n"
per image is put at the start of the first user turn.

Tokens are the concatenation, in order, of the pieces of each turn, each text piece encoded on its own with
`tokenizer.encode(piece, add_special_tokens=False)` and each special token given by its id:
    <|im_start|>   "{role}\\n"   content pieces (text / vision span)   <|im_end|>   "\\n"
For byte-level BPE tokenizers (Qwen's) this equals encoding the whole rendered text whenever no content
starts with whitespace that would fuse with the header's newline; the pieces, not the whole text, are what
training sees.

Loss mask (raw loss_mask[i] True when token i is supervised): in every assistant turn, the tokens of the
assistant content and its closing <|im_end|>. Not supervised: system and user turns, the
"<|im_start|>assistant\\n" header, and the "\\n" after <|im_end|>.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ovjax.data.images import Rejected
from ovjax.data.tokenizer import SPECIAL_TOKENS, special_token_ids

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Stable reasons of SampleRejected.
REJECT_REASONS = (
    "malformed_conversation",    # not a list of {role/from, content/value} maps with string content
    "unknown_role",              # a role outside human/gpt/user/assistant/system
    "misplaced_system",          # a system turn that is not the first turn
    "no_assistant",              # no assistant turn at all
    "empty_assistant",           # an assistant turn with blank content
    "placeholder_mismatch",      # number of <image> placeholders differs from the number of images
    "image_outside_user",        # an <image> placeholder in a system or assistant turn
    "special_token_in_text",     # text contains a special-token string (would forge image or turn tokens)
    "bad_grid",                  # an image grid that does not split into whole merge cells
)


class SampleRejected(Rejected):
    """A conversation cannot be encoded (reasons in `chat.REJECT_REASONS`)."""

    reasons = REJECT_REASONS


def normalize_conversation(conversation, num_images: int, *, require_assistant: bool = True) -> list[tuple[str, str]]:
    """[(role, content)] with roles user/assistant/system, placeholders checked (and inserted LLaVA-style).

    conversation: list of {"role"|"from": ..., "content"|"value": ...}; content may be a string or a list
    of parts {"type": "text", "text": ...} / {"type": "image"} (an image part is an <image> placeholder).
    require_assistant: False for an inference prompt (no answer yet).
    Raises SampleRejected with the reasons above.
    """
    if not isinstance(conversation, Sequence) or isinstance(conversation, (str, bytes)) or not conversation:
        raise SampleRejected("malformed_conversation", "conversation must be a non-empty list of turns")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, Mapping):
            raise SampleRejected("malformed_conversation", f"turn {i} is a {type(turn).__name__}")
        raw_role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(raw_role, str):
            raise SampleRejected("malformed_conversation", f"turn {i} has no role/from string")
        role = _ROLES.get(raw_role.lower())
        if role is None:
            raise SampleRejected("unknown_role", f"turn {i} has role {raw_role!r}")
        turns.append((role, _content_text(content, i)))

    for i, (role, _) in enumerate(turns):
        if role == "system" and i != 0:
            raise SampleRejected("misplaced_system", f"system turn at position {i}")
    if require_assistant and not any(role == "assistant" for role, _ in turns):
        raise SampleRejected("no_assistant", "conversation has no assistant turn")
    for i, (role, text) in enumerate(turns):
        if role == "assistant" and not text.strip():
            raise SampleRejected("empty_assistant", f"assistant turn {i} is empty")
        if role != "user" and IMAGE_PLACEHOLDER in text:
            raise SampleRejected("image_outside_user", f"{role} turn {i} holds an {IMAGE_PLACEHOLDER}")
        for s in SPECIAL_TOKENS:
            if s in text:
                raise SampleRejected("special_token_in_text", f"turn {i} contains {s}")

    count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if count == 0 and num_images > 0:
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            raise SampleRejected("placeholder_mismatch", f"{num_images} image(s) but no user turn to hold them")
        role, text = turns[first_user]
        turns[first_user] = (role, (IMAGE_PLACEHOLDER + "\n") * num_images + text)
    elif count != num_images:
        raise SampleRejected("placeholder_mismatch", f"{count} {IMAGE_PLACEHOLDER} placeholder(s) for "
                                                     f"{num_images} image(s)")
    return turns


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "image":
                parts.append(IMAGE_PLACEHOLDER)
            else:
                raise SampleRejected("malformed_conversation", f"turn {i} has a content part {part!r:.80}")
        return "".join(parts)
    raise SampleRejected("malformed_conversation", f"turn {i} content is a {type(content).__name__}")


def image_token_count(grid, merge_size: int = 2) -> int:
    """Number of <|image_pad|> tokens of an image with patch grid (t, h, w)."""
    t, h, w = (int(x) for x in grid)
    cell = merge_size * merge_size
    if min(t, h, w) < 1 or (t * h * w) % cell:
        raise SampleRejected("bad_grid", f"grid {(t, h, w)} does not split into {merge_size}x{merge_size} cells")
    return t * h * w // cell


class ChatTemplate:
    """Encodes conversations for one HF tokenizer (any AutoTokenizer; special ids looked up by string)."""

    def __init__(self, tokenizer, *, default_system: str = DEFAULT_SYSTEM, merge_size: int = 2):
        self.tokenizer = tokenizer
        self.ids = special_token_ids(tokenizer)
        self.default_system = default_system
        self.merge_size = merge_size

    def _pieces(self, conversation, grids, add_generation_prompt: bool):
        """Yields (kind, value, supervised): kind "text" (value str) or "ids" (value list[int])."""
        grids = [tuple(int(x) for x in g) for g in (grids if grids is not None else [])]
        turns = normalize_conversation(conversation, len(grids), require_assistant=not add_generation_prompt)
        if turns[0][0] != "system":
            turns.insert(0, ("system", self.default_system))
        ids = self.ids
        counts = iter([image_token_count(g, self.merge_size) for g in grids])
        for role, text in turns:
            sup = role == "assistant"
            yield "ids", [ids["im_start"]], False
            yield "text", f"{role}\n", False
            chunks = text.split(IMAGE_PLACEHOLDER)
            for j, chunk in enumerate(chunks):
                if j:
                    k = next(counts)
                    yield "ids", [ids["vision_start"]] + [ids["image_pad"]] * k + [ids["vision_end"]], False
                if chunk:
                    yield "text", chunk, sup
            yield "ids", [ids["im_end"]], sup
            yield "text", "\n", False
        if add_generation_prompt:
            yield "ids", [ids["im_start"]], False
            yield "text", "assistant\n", False

    def render(self, conversation, grids=(), *, add_generation_prompt: bool = False) -> str:
        """The rendered text, image pads expanded (what `encode`'s tokens decode to)."""
        inv = {v: k for k, v in self._special_strings().items()}
        out = []
        for kind, value, _ in self._pieces(conversation, grids, add_generation_prompt):
            out.append(value if kind == "text" else "".join(inv[i] for i in value))
        return "".join(out)

    def _special_strings(self) -> dict[str, int]:
        by_key = dict(zip(("endoftext", "im_start", "im_end", "vision_start", "vision_end", "image_pad",
                           "video_pad"), SPECIAL_TOKENS))
        return {by_key[k]: v for k, v in self.ids.items()}

    def encode(self, conversation, grids=(), *, add_generation_prompt: bool = False):
        """Tokens and loss mask of a conversation.

        grids: (t, h, w) patch grid of each image, in placeholder order ([N, 3] or a list of triples).
        add_generation_prompt: append "<|im_start|>assistant\\n" (for inference; training leaves it off).
        Returns (tokens int32 [L], loss_mask bool [L]). Raises SampleRejected.
        """
        pieces = list(self._pieces(conversation, grids, add_generation_prompt))
        texts = [v for kind, v, _ in pieces if kind == "text"]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        tokens: list[int] = []
        mask: list[bool] = []
        for kind, value, sup in pieces:
            part = next(encoded) if kind == "text" else value
            tokens.extend(part)
            mask.extend([sup] * len(part))
        tokens_arr = np.asarray(tokens, dtype=np.int32)
        mask_arr = np.asarray(mask, dtype=bool)
        expected_pads = sum(image_token_count(tuple(g), self.merge_size) for g in (grids if grids is not None else []))
        if int((tokens_arr == self.ids["image_pad"]).sum()) != expected_pads:
            raise SampleRejected("special_token_in_text", "text encodes to extra <|image_pad|> tokens")
        return tokens_arr, mask_arr
