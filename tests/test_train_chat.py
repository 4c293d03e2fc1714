"""Chat templates (rendered as transformers renders them; assistant replies located by rendering), streaming
generation, and the `chat` / `generate --chat` commands on a tiny exported model."""

import io
import sys
from pathlib import Path

import jax
import pytest
import transformers
from flax import nnx

import models
from train import cli
from train.chat_template import ChatTemplate, ChatTemplateError
from train.export import export_hf
from train.generate import stream_text

ROOT = Path(__file__).resolve().parents[1]
CHATML = (ROOT / "configs" / "chatml.jinja").read_text()

# Exercises what real templates use: namespace, loop controls, trim, tojson on non-ASCII, raise_exception.
FEATURES = """
{%- if messages[0].role not in ['system', 'user'] -%}{{ raise_exception('first message must be system or user') }}
{%- endif -%}
{%- set ns = namespace(turns=0) -%}
{%- for m in messages -%}
{%- if m.role == 'tool' -%}{%- continue -%}{%- endif -%}
{%- set ns.turns = ns.turns + 1 -%}
<|im_start|>{{ m.role }}
{{ m.content | trim }}{% if m.meta is defined %} {{ m.meta | tojson }}{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
{{- '' if ns.turns else bos_token -}}
"""

# Like Qwen3's: earlier assistant turns lose their reasoning once later turns follow.
DROPS_HISTORY = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and not loop.last -%}<a>{{ m.content.split('</think>')[-1] }}</e>"
    "{%- else -%}<{{ m.role[0] }}>{{ m.content }}</e>{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}<a>{%- endif -%}"
)

CHAT = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "Héllo <b>日本</b>", "meta": {"lang": "<é>"}},
    {"role": "tool", "content": "ignored"},
    {"role": "assistant", "content": "Hi!"},
]


@pytest.mark.torch
@pytest.mark.parametrize("source", [CHATML, FEATURES], ids=["chatml", "features"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_rendering_matches_transformers(source, generation_prompt):
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=models.hf.byte_level_tokenizer().backend, bos_token="<|bos|>", eos_token="<|eos|>"
    )
    hf.chat_template = source
    for messages in (CHAT, CHAT[:2]):
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        ours = ChatTemplate(source, bos_token="<|bos|>", eos_token="<|eos|>")
        assert ours.render(messages, add_generation_prompt=generation_prompt) == want


def test_pieces_locate_every_reply_and_keep_inconsistent_ones_as_context():
    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>x</think>b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "<think>y</think>d"},
    ]
    pieces, untrained = ChatTemplate(CHATML).pieces(chat)
    assert untrained == 0
    assert [text for text, trained in pieces if trained] == [
        "<think>x</think>b<|im_end|>\n",
        "<think>y</think>d<|im_end|>\n",
    ]
    assert "".join(text for text, _ in pieces) == ChatTemplate(CHATML).render(chat)
    pieces, untrained = ChatTemplate(DROPS_HISTORY).pieces(chat)
    assert untrained == 1  # the first reply renders as "b" in the full conversation, not "<think>x</think>b"
    assert pieces == [("<u>a</e><a>b</e><u>c</e><a>", False), ("<think>y</think>d</e>", True)]
    # Text after the last reply carries no loss and is dropped.
    pieces, _ = ChatTemplate(CHATML).pieces(chat + [{"role": "user", "content": "more"}])
    assert pieces[-1] == ("<think>y</think>d<|im_end|>\n", True)


def test_template_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="does not compile as Jinja"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="failed on this conversation: first message must be system or user"):
        ChatTemplate(FEATURES).render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="no assistant reply could be located"):
        ChatTemplate(CHATML).pieces([{"role": "user", "content": "x"}])
    assert ChatTemplate(CHATML).end_of_turn() == "<|im_end|>"
    assert ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}").end_of_turn() == ""


@pytest.fixture(scope="module")
def tiny():
    return models.CausalLM(models.get_preset("tiny", dtype="float32"), rngs=nnx.Rngs(5)), models.ByteTokenizer()


def test_streaming_yields_what_generate_returns(tiny):
    model, tok = tiny
    prompt = tok.encode("Once upon", add_bos=True)
    want = models.generate(model, [prompt], 12)[0]
    assert list(models.generate_stream(model, prompt, 12)) == want
    stop = want[5]
    assert list(models.generate_stream(model, prompt, 12, stop_ids=[stop])) == want[: want.index(stop)]
    # Text streaming ends where the stop text starts, and never shows a piece of it.
    text = tok.decode(want)
    stop_text = text[3:6]
    pieces = list(stream_text(model, tok, prompt, 12, stop_text=stop_text))
    assert "".join(pieces) == text[: text.index(stop_text)]


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    model, tok = tiny
    root = tmp_path_factory.mktemp("chat")
    export_hf(model, tok, root / "with_template", chat_template=CHATML)
    export_hf(model, tok, root / "no_template")
    return root


def _expected_reply(model, tok, messages, max_new_tokens):
    ids = tok.encode(ChatTemplate(CHATML).render(messages, add_generation_prompt=True))
    text = tok.decode(models.generate(model, [ids], max_new_tokens, eos_id=tok.eos_id)[0])
    return text.split("<|im_end|>")[0]


def test_chat_command_streams_replies_with_the_exports_template(exported, tiny, monkeypatch, capsys):
    model, tok = tiny
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there\nWho are you?\n/reset\nHello\n"))
    assert cli.main(["chat", str(exported / "with_template"), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    first = _expected_reply(model, tok, [{"role": "user", "content": "Hi there"}], 8)
    second = _expected_reply(
        model,
        tok,
        [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Who are you?"},
        ],
        8,
    )
    third = _expected_reply(model, tok, [{"role": "user", "content": "Hello"}], 8)  # after /reset
    assert out == f"{first}\n{second}\n{third}\n"


def test_generate_chat_and_plain(exported, tiny, capsys):
    model, tok = tiny
    assert cli.main(["generate", "--model", str(exported / "with_template"), "--chat", "--prompt", "Hi"]) == 0
    reply = _expected_reply(model, tok, [{"role": "user", "content": "Hi"}], 32)
    assert capsys.readouterr().out == f"Hi\u2192{reply}\n"
    assert (
        cli.main(["generate", "--model", str(exported / "no_template"), "--prompt", "Hi", "--max-new-tokens", "6"]) == 0
    )
    ids = tok.encode("Hi", add_bos=True)
    want = tok.decode(models.generate(model, [ids], 6, eos_id=tok.eos_id, rng=jax.random.key(0))[0])
    assert capsys.readouterr().out == f"Hi\u2192{want}\n"


def test_chat_without_a_template_is_a_clear_error(exported, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert cli.main(["chat", str(exported / "no_template")]) == 2
    assert "has no chat template; pass --chat-template FILE" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    template = ROOT / "configs" / "chatml.jinja"
    args = ["chat", str(exported / "no_template"), "--chat-template", str(template), "--max-new-tokens", "2"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.endswith("\n")
