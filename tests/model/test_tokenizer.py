"""Tokenizer: ids, the v1 chat format and its validation against mistral-common, streaming detokenization.

Oracles: mistral-common's own v1 tokenizer and instruct encoder, and sentencepiece's `decode` of a
whole sequence (what the streamed deltas must add up to).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from moray.model.tokenizer import (
    ChatMessage,
    IncrementalDetokenizer,
    Tokenizer,
    default_tokenizer_path,
    tools_tokenizer_path,
)

TEXTS = [
    "Hello world, how are you?",
    "naïve café — “quotes” ß 中文字符 😀🎉",
    "  leading spaces\n\nand\ttabs  ",
    "rare: 𝔘🦀ꙮ𓀀 (byte fallback)",
    "x",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="module")
def mistral() -> MistralTokenizer:
    return MistralTokenizer.v1()


# ---- ids ------------------------------------------------------------------------------------------
def test_default_is_mistral_commons_v1(tok: Tokenizer, mistral: MistralTokenizer) -> None:
    reference = mistral.instruct_tokenizer.tokenizer
    assert default_tokenizer_path().read_bytes() == Path(reference.file_path).read_bytes()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (reference.n_words, reference.bos_id, reference.eos_id)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_mistral_common(tok: Tokenizer, mistral: MistralTokenizer, text: str) -> None:
    reference = mistral.instruct_tokenizer.tokenizer
    assert tok.encode(text) == reference.encode(text, bos=True, eos=False)
    assert tok.encode(text, bos=False) == reference.encode(text, bos=False, eos=False)
    assert tok.decode(tok.encode(text)) == reference.decode(tok.encode(text)) == text


def test_decode_rejects_out_of_range_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([5, 32000])


def test_model_dir_tokenizer_wins(tmp_path: Path, tok: Tokenizer) -> None:
    other = default_tokenizer_path().parent / "mistral_instruct_tokenizer_240216.model.v2"  # 32768 ids
    assert Tokenizer.from_model_dir(tmp_path).vocab_size == tok.vocab_size  # nothing there: the default
    assert Tokenizer.from_model_dir(None).path == default_tokenizer_path()
    shutil.copyfile(other, tmp_path / "tokenizer.model.v1")
    assert Tokenizer.from_model_dir(tmp_path).vocab_size == 32768
    shutil.copyfile(default_tokenizer_path(), tmp_path / "tokenizer.model")
    assert Tokenizer.from_model_dir(tmp_path).path == tmp_path / "tokenizer.model"
    assert Tokenizer.from_model_dir(tmp_path).vocab_size == 32000
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.model")


def test_token_text_is_the_surface_text(tok: Tokenizer) -> None:
    """A token's text is what it adds after other text (leading space kept), as vLLM shows it."""
    rng = random.Random(0)
    before = tok.encode("x", bos=False)
    for i in rng.sample(range(3 + 256, tok.vocab_size), 300):  # skip control and byte tokens
        assert tok.token_text(i) == tok.decode(before + [i])[1:], tok.id_to_piece(i)
    assert tok.token_text(tok.encode("Hello", bos=False)[0]) == " Hello"
    assert tok.token_text(tok.eos_id) == "</s>" and tok.token_text(tok.bos_id) == "<s>"
    assert tok.token_text(tok.encode("𝔘", bos=False)[1]) == "\ufffd"  # a lone byte of a character


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_add_up_to_the_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == (" " + text).encode()  # sentencepiece's dummy space


# ---- chat -----------------------------------------------------------------------------------------
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "one user": [{"role": "user", "content": "Hi"}],
    "system multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
        {"role": "user", "content": "Thanks — ça va? 😀"},
    ],
    "system between users": [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "a"},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "b"},
    ],
    "system later only": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "system", "content": "late system"},
        {"role": "user", "content": "d"},
    ],
    "runs merge": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ],
    "only system": [{"role": "system", "content": "just a system prompt"}],
    "assistant first": [
        {"role": "system", "content": "S"},
        {"role": "assistant", "content": "Greetings."},
        {"role": "user", "content": "u"},
    ],
    "empty system and user": [
        {"role": "system", "content": ""},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "u"},
    ],
}


def reference_ids(mistral: MistralTokenizer, messages: list[dict[str, Any]]) -> list[int]:
    tokens: list[int] = mistral.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    return tokens


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_matches_mistral_common(tok: Tokenizer, mistral: MistralTokenizer, name: str) -> None:
    messages = CONVERSATIONS[name]
    assert tok.encode_chat(messages) == reference_ids(mistral, messages)


def test_chat_accepts_message_objects(tok: Tokenizer, mistral: MistralTokenizer) -> None:
    messages = CONVERSATIONS["system multi-turn"]
    expected = reference_ids(mistral, messages)
    assert tok.encode_chat([ChatMessage(m["role"], m["content"]) for m in messages]) == expected
    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    assert tok.encode_chat([classes[m["role"]](content=m["content"]) for m in messages]) == expected


def test_chat_shape(tok: Tokenizer) -> None:
    ids = tok.encode_chat(CONVERSATIONS["system multi-turn"])
    text = tok.decode(ids)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2 and ids[-1] != tok.eos_id
    assert text.startswith("[INST] You are terse.\n\nWhat is 2+2? [/INST]") and text.endswith("[/INST]")


def test_final_assistant_message_is_continued(tok: Tokenizer, mistral: MistralTokenizer) -> None:
    """As vLLM does with mistral-common: a last assistant message is a prefix to complete (no </s>)."""
    messages = [{"role": "user", "content": "Count to 3"}, {"role": "assistant", "content": "1, 2,"}]
    expected = reference_ids(mistral, [messages[0], {**messages[1], "prefix": True}])
    assert tok.encode_chat(messages) == expected and expected[-1] != tok.eos_id


INVALID: dict[str, tuple[list[dict[str, Any]], str]] = {
    "empty": ([], "at least one message"),
    "lone assistant": ([{"role": "assistant", "content": "x"}], "must start with a user message"),
    "system after assistant": (
        [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
            {"role": "system", "content": "s"},
            {"role": "user", "content": "v"},
        ],
        "'system' after role 'assistant'",
    ),
    "empty assistant": (
        [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "v"},
        ],
        "assistant message must have content",
    ),
    "tool role": (
        [{"role": "user", "content": "u"}, {"role": "tool", "content": "t", "tool_call_id": "abcdefghi"}],
        "role 'tool'",
    ),
    "unknown role": ([{"role": "robot", "content": "u"}], "role 'robot'"),
    "system without content": (
        [{"role": "system", "content": None}, {"role": "user", "content": "u"}],
        "system message must have content",
    ),
}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_conversations_are_refused_like_mistral_common(
    tok: Tokenizer, mistral: MistralTokenizer, name: str
) -> None:
    messages, message = INVALID[name]
    with pytest.raises(Exception):  # noqa: B017 - mistral-common raises its own exception types
        reference_ids(mistral, messages)
    with pytest.raises(ValueError, match=message):
        tok.encode_chat(messages)


def test_non_string_content_is_refused(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="string"):
        tok.encode_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


# ---- streaming detokenization ---------------------------------------------------------------------
def stream(tok: Tokenizer, prompt: list[int], generated: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    return [detok.add(t) for t in generated], detok.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_decode_at_every_split(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    for cut in range(1, len(ids)):
        prompt, generated = ids[:cut], ids[cut:]
        deltas, tail = stream(tok, prompt, generated)
        whole = prompt  # a prompt cut inside a character: the character is the completion's
        while tok.decode(whole).endswith("\ufffd"):
            whole = whole[:-1]
        assert "".join(deltas) + tail == tok.decode(ids)[len(tok.decode(whole)) :], (cut, deltas)
        assert tail == "" and not any("\ufffd" in d for d in deltas), (cut, deltas)
    deltas, tail = stream(tok, [], ids[1:])
    assert "".join(deltas) + tail == tok.decode(ids[1:]) == text


def test_leading_space_of_the_first_generated_token(tok: Tokenizer) -> None:
    prompt = tok.encode("Hello")
    world = tok.encode("Hello world")[2:]  # [▁world]
    deltas, _ = stream(tok, prompt, world)
    assert deltas == [" world"]  # vLLM: the completion of "Hello" is " world"
    deltas, _ = stream(tok, [tok.bos_id], tok.encode("world", bos=False))
    assert deltas == ["world"]  # after <s> alone, as decode([<s>, ▁world]) reads


def test_byte_fallback_is_held_until_the_character_completes(tok: Tokenizer) -> None:
    ids = tok.encode("a 𝔘 b", bos=False)  # ▁a ▁ <0xF0> <0x9D> <0x94> <0x98> ▁b
    deltas, _ = stream(tok, [tok.bos_id], ids)
    assert deltas == ["a", " ", "", "", "", "𝔘", " b"]


def test_incomplete_character_at_the_end_flushes_as_decode_does(tok: Tokenizer) -> None:
    ids = tok.encode("a 𝔘", bos=False)[:-2]  # stop two bytes short
    deltas, tail = stream(tok, [tok.bos_id], ids)
    assert "".join(deltas) == "a " and tail == tok.decode(ids)[2:] and tail.startswith("\ufffd")


def test_prompt_ending_inside_a_character(tok: Tokenizer) -> None:
    ids = tok.encode("a 𝔘 b")  # <s> ▁a ▁ <0xF0> <0x9D> <0x94> <0x98> ▁b
    deltas, tail = stream(tok, ids[:5], ids[5:])
    assert deltas == ["", "𝔘", " b"] and tail == ""


def test_random_ids_stream_like_decode(tok: Tokenizer) -> None:
    """Arbitrary ids, byte tokens (valid or not), control tokens: the stream still equals decode."""
    rng = random.Random(1)
    pools = [range(3, 259), range(259, tok.vocab_size), [tok.eos_id, tok.bos_id], [28705]]
    for _ in range(300):
        generated = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 25))]
        prompt = [tok.bos_id] + [rng.randrange(259, tok.vocab_size) for _ in range(rng.randint(0, 9))]
        deltas, tail = stream(tok, prompt, generated)
        assert "".join(deltas) + tail == tok.decode(prompt + generated)[len(tok.decode(prompt)) :]
        deltas, tail = stream(tok, [], generated)
        assert "".join(deltas) + tail == tok.decode(generated)


def test_detokenizer_keeps_a_short_window(tok: Tokenizer) -> None:
    prompt = tok.encode("The story begins")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    ids = tok.encode(" once upon a time, 𝔘 there was a crab 🦀." * 40, bos=False)
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert len(detok.ids) < 16  # decodes a window, not the whole sequence
    assert prompt == tok.encode("The story begins")  # the caller's list is not touched


# ---- tools -------------------------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "abcDEF123", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
TOOL_TURNS = [{"role": "user", "content": "Weather in Oslo?"},
              {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather", "content": "-3C"},
              {"role": "user", "content": "Thanks. And now?"}]


def test_v3_renders_tools_and_tool_turns_with_mistral_common(tmp_path: Path) -> None:
    """The tiny checkpoints' tokenizer: tools, a tool call and its result as mistral-common's own message
    classes encode them (the [AVAILABLE_TOOLS] / [TOOL_CALLS] / [TOOL_RESULTS] control tokens)."""
    from mistral_common.protocol.instruct.messages import ToolMessage
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    shutil.copyfile(tools_tokenizer_path(), tmp_path / "tokenizer.model.v3")
    shutil.copyfile(default_tokenizer_path(), tmp_path / "tokenizer.model")  # the versioned file wins
    tok3 = Tokenizer.from_model_dir(tmp_path)
    assert (tok3.version, tok3.vocab_size, tok3.tool_calls_id) == ("v3", 32768, 5)
    reference = MistralTokenizer.from_file(str(tools_tokenizer_path()))
    request = ChatCompletionRequest(
        tools=[Tool(function=Function(**TOOL["function"]))],  # type: ignore[arg-type]
        messages=[UserMessage(content="Weather in Oslo?"),
                  AssistantMessage(tool_calls=[ToolCall(id="abcDEF123", function=FunctionCall(
                      name="get_weather", arguments='{"city": "Oslo"}'))]),
                  ToolMessage(content="-3C", tool_call_id="abcDEF123", name="get_weather"),
                  UserMessage(content="Thanks. And now?")])
    expected = reference.encode_chat_completion(request).tokens
    assert tok3.encode_chat(TOOL_TURNS, [TOOL]) == expected
    pieces = {tok3.id_to_piece(i) for i in expected}
    assert {"[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[INST]"} <= pieces


def test_v1_leaves_tools_out_and_refuses_tool_turns(tok: Tokenizer) -> None:
    """Mixtral-8x7B-Instruct-v0.1's tokenizer has no tool tokens: mistral-common (and so vLLM) renders no
    tools, and a tool call or result in the history is an error (a 400 from the API)."""
    plain = [{"role": "user", "content": "Weather in Oslo?"}]
    assert tok.version == "v1" and tok.tool_calls_id is None
    assert tok.encode_chat(plain, [TOOL]) == tok.encode_chat(plain)
    with pytest.raises(ValueError, match="Tools not implemented"):
        tok.encode_chat(TOOL_TURNS, [TOOL])
