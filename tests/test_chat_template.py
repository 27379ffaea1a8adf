"""Chat templates come from model files: rendered in jinja2's sandbox (a template cannot reach
Python internals or run commands), with transformers' globals and filters, so a Llama-3.1-style
template renders exactly what transformers' apply_chat_template renders."""

from __future__ import annotations

import pytest
from test_model_hf import write_tiny_mistral

from pyeffort.models.loaders.hf import load_tokenizer
from pyeffort.models.tokenizer import ChatTemplateError, render_chat_template

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi <b>there</b> é"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Weather?"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now>",
          "parameters": {"type": "object", "properties": {"z_city": {"type": "string"},
                                                          "a_unit": {"type": "string"}}}}}]  # fmt: skip

# Llama-3.1's template, shortened; it uses strftime_now, raise_exception, tojson with indent and
# a {% break %} (loop controls)
LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- set ns = namespace(first_user=none) %}
{%- for m in messages %}
    {%- if m['role'] == 'user' %}
        {%- set ns.first_user = m['content'] %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- if ns.first_user is none %}
    {{- raise_exception("Conversation needs a user message!") }}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ joiner.__init__.__globals__['os'].system('true') }}",
        "{% set ns = namespace(_x=1) %}{{ ns }}",
        "{{ messages.append(1) }}",  # the sandbox is immutable
    ],
)
def test_template_cannot_escape_the_sandbox(template):
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat_template(template, messages=[{"role": "user", "content": "x"}])


def test_template_errors_are_pyeffort_errors():
    with pytest.raises(ChatTemplateError, match="needs a user message"):
        render_chat_template(LLAMA31, messages=[{"role": "system", "content": "s"}],
                             bos_token="<s>", tools=None)  # fmt: skip
    with pytest.raises(ChatTemplateError, match="compile"):
        render_chat_template("{% for %}", messages=[])
    with pytest.raises(ValueError):  # a ChatTemplateError is a ValueError
        render_chat_template("{{ raise_exception('no') }}")


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_llama31_template_renders_as_transformers(tmp_path, tools):
    transformers = pytest.importorskip("transformers")
    write_tiny_mistral(tmp_path, llama=True, chat_template=LLAMA31)
    ours = load_tokenizer(tmp_path, {})
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    want = ref.apply_chat_template(MESSAGES, tools=tools, tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    got = render_chat_template(ours.chat_template, messages=MESSAGES, tools=tools,
                               add_generation_prompt=True, bos_token="<s>", eos_token="</s>")  # fmt: skip
    assert got == want
    if tools:  # key order kept, no HTML escaping (jinja2's own tojson does both)
        assert got.index('"z_city"') < got.index('"a_unit"') and "<now>" in got
    else:
        assert ours.format_chat(MESSAGES) == want
