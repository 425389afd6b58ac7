"""Chat templates: rendered like transformers renders them, sandboxed, with typed errors."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime

import pytest

from kernels.tokenizer import ChatTemplateError, ChatTemplateMissing, Tokenizer
from kernels.tokenizer.chat_template import ChatTemplate

# Templates in the shapes real models ship, each leaning on one feature of the environment.
TEMPLATES = {
    # Gemma-style: a system message folded into the first user turn, roles checked, BOS written.
    "gemma-style": (
        "{{ bos_token }}\n"
        "{%- if messages[0]['role'] == 'system' -%}\n"
        "    {%- set prefix = messages[0]['content'] + '\\n\\n' -%}\n"
        "    {%- set turns = messages[1:] -%}\n"
        "{%- else -%}\n"
        "    {%- set prefix = '' -%}\n"
        "    {%- set turns = messages -%}\n"
        "{%- endif -%}\n"
        "{%- for message in turns -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception('roles must alternate user/assistant') }}\n"
        "    {%- endif -%}\n"
        "    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\n"
        "    {{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') }}\n"
        "    {{- message['content'] | trim }}\n"
        "    {{- '<end_of_turn>\\n' }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}\n"
    ),
    # Plain blocks, no dashes: trim_blocks and lstrip_blocks decide the whitespace.
    "block-whitespace": (
        "{% for message in messages %}\n"
        "    {% if message.role == 'system' %}\n"
        "[SYS] {{ message.content }}\n"
        "    {% else %}\n"
        "<{{ message.role }}> {{ message.content }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    ),
    # Tools and documents passed through, tojson with options, namespace, dict, loop controls.
    "tools-and-state": (
        "{%- set ns = namespace(users=0, last='') -%}\n"
        "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.users = ns.users + 1 -%}"
        "{%- set ns.last = m.content -%}{%- endif -%}{%- endfor -%}\n"
        "users={{ ns.users }} last={{ ns.last | tojson }}\n"
        "{%- if tools %}\ntools={{ tools | tojson(indent=2) }}{% endif %}\n"
        "{%- if documents %}\n{% for d in documents %}[{{ d.title }}]{% if loop.index == 1 %}{% break %}{% endif %}"
        "{% endfor %}{% endif %}\n"
        "{%- set extra = dict(a=1, b='x') %}\nextra={{ extra | tojson(sort_keys=True) }}"
        " eos_defined={{ eos_token is defined }} pad_defined={{ pad_token is defined }}"
    ),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello <b>world</b> 😀"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi \n"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "中文?"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter für <city>",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
DOCUMENTS = [{"title": "First", "text": "a"}, {"title": "Second", "text": "b"}]
SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": None}


def transformers_render(source: str, messages, add_generation_prompt: bool, **kwargs) -> str:
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = chat_template_utils.render_jinja_template(
        conversations=[messages], chat_template=source, add_generation_prompt=add_generation_prompt, **kwargs)
    return rendered[0]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "with-system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(name, messages, add_generation_prompt):
    source = TEMPLATES[name]
    set_specials = {k: v for k, v in SPECIALS.items() if v is not None}  # transformers passes only the set ones
    theirs = transformers_render(source, messages, add_generation_prompt, tools=TOOLS, documents=DOCUMENTS,
                                 **set_specials)
    ours = ChatTemplate(source).render(messages, add_generation_prompt=add_generation_prompt, tools=TOOLS,
                                       documents=DOCUMENTS, special_tokens=SPECIALS)
    assert ours == theirs


def test_tojson_keeps_text_as_is():
    messages = [{"role": "user", "content": "<é> & \"q\""}]
    assert ChatTemplate("{{ messages | tojson }}").render(messages) == json.dumps(messages, ensure_ascii=False)


def test_strftime_now_and_extra_variables():
    template = ChatTemplate("{{ strftime_now('%Y') }} {{ who }}")
    assert template.render([{"role": "user", "content": "x"}], who="me") == f"{datetime.now():%Y} me"


def test_none_valued_keys_are_dropped():
    # APIs send content=None or tool_calls=None; templates test `is defined`, as with transformers.
    template = ChatTemplate("{{ messages[0].tool_calls is defined }} {{ messages[0].content }}")
    assert template.render([{"role": "assistant", "content": "ok", "tool_calls": None}]) == "False ok"


def test_the_templates_own_exception_is_typed():
    template = ChatTemplate(TEMPLATES["gemma-style"])
    with pytest.raises(ChatTemplateError, match="refused this conversation: roles must alternate"):
        template.render([{"role": "assistant", "content": "first"}], special_tokens=SPECIALS)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__ }}",
    "{% set ns = namespace() %}{% set ns._private = 1 %}",
    "{{ namespace(_x=1) }}",
    "{{ raise_exception.__globals__.keys() }}",
])
def test_sandbox_refuses_internals(source):
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source", ["{{ messages.__class__ }}", "{{ raise_exception.__globals__ }}"])
def test_sandbox_shows_internals_as_nothing(source):
    assert ChatTemplate(source).render([{"role": "user", "content": "x"}]) == ""


def test_sandbox_cannot_mutate_inputs():
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        ChatTemplate("{{ messages.append(1) }}").render(messages)
    assert messages == [{"role": "user", "content": "x"}]


def test_bad_input_is_typed():
    with pytest.raises(ChatTemplateError, match="conversation is empty"):
        ChatTemplate("x").render([])
    with pytest.raises(ChatTemplateError, match="must be a mapping"):
        ChatTemplate("x").render(["hi"])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}")


def test_missing_or_broken_template_on_a_tokenizer(model_path):
    tok = Tokenizer.from_model(model_path)
    assert tok.has_chat_template
    base = Tokenizer(dataclasses.replace(tok.spec, chat_template=None))
    assert not base.has_chat_template
    with pytest.raises(ChatTemplateMissing, match=r"raw completion prompt.*/v1/completions.*--raw"):
        base.apply_chat_template([{"role": "user", "content": "hi"}])
    # A template that does not parse fails when used, and the tokenizer still encodes raw prompts.
    broken = Tokenizer(dataclasses.replace(tok.spec, chat_template="{% if %}"))
    assert broken.encode("hi") == tok.encode("hi")
    with pytest.raises(ChatTemplateError, match="does not parse"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
