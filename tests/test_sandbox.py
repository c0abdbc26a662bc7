"""User templates render in a bounded sandbox: no code runs, nothing hangs, the text is unchanged.

The bounds are lowered with ``monkeypatch`` (they are module constants, a real setting) so
that a runaway template stops within a fraction of a second.
"""

import json

import jinja2
import pytest

from tunelab.config import load_config
from tunelab.data import sandbox
from tunelab.data.chat_render import render_chat
from tunelab.data.prepare import load_examples, prepare_data
from tunelab.data.templates import CHAT_TEMPLATES, DataTemplate
from tunelab.errors import DataError
from tunelab.model.generate import encode

from .conftest import CHATML, cli

ROWS = [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]


@pytest.fixture
def low_bounds(monkeypatch):
    """Bounds small enough that every runaway template below stops at once."""
    monkeypatch.setattr(sandbox, "MAX_SECONDS", 0.5)
    monkeypatch.setattr(sandbox, "MAX_LOOP_STEPS", 10_000)
    monkeypatch.setattr(sandbox, "MAX_OUTPUT_CHARS", 100_000)


def test_code_in_a_data_template_does_not_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    template = (
        "{{ self.__init__.__globals__.__builtins__.__import__('os')"
        f".popen('touch {marker}').read() }}}}{{{{instruction}}}} {{{{output}}}}"
    )
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    config = {"datasets": [{"path": str(tmp_path / "d.json"), "data_template": template}]}
    (tmp_path / "c.json").write_text(json.dumps(config))
    code, err = cli(["validate", str(tmp_path / "c.json")], capsys)
    assert not marker.exists()
    assert code == 2 and "data_template" in err and "'__init__'" in err and "unsafe" in err


def test_a_runaway_data_template_is_a_clear_error_in_validate(tmp_path, capsys):
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    template = "{% for i in range(10**9) %}{% endfor %}{{instruction}} {{output}}"
    config = {"datasets": [{"path": str(tmp_path / "d.json"), "data_template": template}]}
    (tmp_path / "c.json").write_text(json.dumps(config))
    code, err = cli(["validate", str(tmp_path / "c.json")], capsys)
    assert code == 2 and "data_template: range() of more than 100,000 numbers" in err
    assert "fix: " in err


RUNAWAY = {
    "nested loops without a call": (
        "{% set s = 'abcdefghij' * 100 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
        "the loop bound",
    ),
    "range(10**9)": ("{% for i in range(10**9) %}{% endfor %}", "the range bound"),
    "'x' * 10**9": ("{{ 'x' * 10**9 }}", "the size bound"),
    "9 ** (9 ** 9)": ("{{ 9 ** (9 ** 9) }}", "the number bound"),  # Jinja's ** groups leftwards
    "squaring in a loop": (
        "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
        "{% endfor %}",
        "the number bound",
    ),
    "doubling with ~": (
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
        "the size bound",
    ),
    "a padding filter": ("{{ 'x' | center(10**10) }}", "the size bound"),
    "a format width": ("{{ '%900000000s' % 'x' }}", "the size bound"),
    "str.replace": ("{% set s = 'x' * 50000 %}{{ s.replace('', s) | length }}", "the size bound"),
    "a macro calling itself": (
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
        "the recursion bound",
    ),
    "oversized output": (
        "{% for i in range(5000) %}{{ instruction * 100 }}{% endfor %}",
        "the output bound",
    ),
    "output kept in a macro": (
        "{% macro m() %}{% for i in range(5000) %}{{ 'y' * 100 }}{% endfor %}{% endmacro %}"
        "{% set kept = m() %}",
        "the output bound",
    ),
}


@pytest.mark.parametrize("name", RUNAWAY)
def test_runaway_data_template_stops_at_its_bound(name, low_bounds):
    body, bound = RUNAWAY[name]
    template = DataTemplate(body + "{{ output }}")
    with pytest.raises(DataError) as info:
        template(ROWS[0])
    assert info.value.message.startswith("data_template: ") and bound in info.value.message


def test_a_loop_that_stays_under_the_step_bound_stops_at_the_time_bound(monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_SECONDS", 0.2)
    monkeypatch.setattr(sandbox, "MAX_LOOP_STEPS", 10**12)  # only the clock can stop these
    looping = "{% set s = 'abcdefghij' * 1000 %}{% for a in s %}{% for b in s %}{% endfor %}"
    with pytest.raises(DataError, match=r"took more than 0.2 s \(the time bound\)"):
        DataTemplate(looping + "{% endfor %}{{ output }}")(ROWS[0])
    exponential = "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
    with pytest.raises(DataError, match="the time bound"):
        DataTemplate(exponential + "{{ f(60) }}{{ output }}")(ROWS[0])


NORMAL = [
    "Instruction: {{instruction}}\n{% if input %}Input: {{ input }}\n{% endif %}Answer: {{output}}",
    "{% for word in instruction.split() %}[{{ loop.index }}:{{ word | upper }}]{% endfor %}"
    "{{ '%s!' % output ~ ' ' ~ (output | length) }} {{ [1, 2] * 2 }} {{ 2 ** 10 }}\n",
    "{% macro q(t) %}<{{ t | trim }}>{% endmacro %}{{ q(instruction) }}{{ output | center(9) }}",
]


@pytest.mark.parametrize("text", NORMAL)
def test_normal_data_templates_render_as_plain_jinja_does(text):
    row = {"instruction": "Say hi to me.", "input": "", "output": "Hi!"}
    plain = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    prompt, response = DataTemplate(text)(row).parts
    assert prompt[0] + response[0] == plain.from_string(text).render(**row)


@pytest.mark.parametrize("value", [float("nan"), 3, None, ["Hi!"], {"text": "Hi!"}, True])
def test_a_value_that_is_not_text_names_the_row_and_key(tmp_path, value):
    rows = [{"q": "a", "a": "b"}, {"q": "c", "a": value}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = {"path": str(tmp_path / "d.jsonl"), "data_template": "Q: {{q}}\nA: {{a}}"}
    with pytest.raises(DataError) as info:
        load_examples(load_config(overrides={"datasets": [source]}).config)
    message = info.value.message
    assert "cannot be read as data_template" in message and "'a' must be text, found" in message
    assert "line 2" in message or "row 2" in message
    if value != value:  # NaN
        assert "found a number (NaN)" in message


def test_a_format_file_value_that_is_not_text_is_a_row_error(tmp_path):
    fmt = tmp_path / "fmt.json"
    fmt.write_text(json.dumps({"instruction,output": "User: %instruction%\nBot: %output%"}))
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "a", "output": float("nan")}]))
    source = {"path": str(tmp_path / "d.json"), "format_file": str(fmt)}
    with pytest.raises(DataError) as info:
        load_examples(load_config(overrides={"datasets": [source]}).config)
    assert "'output' must be text, found a number (NaN); write it as a string" in info.value.message


COMPLEX = """\
{#- A tool-calling template in the style of Qwen2.5 and Llama 3.1. -#}
{%- set ns = namespace(system='You are a helpful assistant.', last_user=-1, tools=[]) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for m in loop_messages %}
    {%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
    {%- for call in m.tool_calls | default([]) %}
        {%- set ns.tools = ns.tools + [call.function.name] %}
    {%- endfor %}
{%- endfor %}
{{- bos_token or '' }}<|im_start|>system
{{ ns.system }}
{%- if ns.tools %} Tools used: {{ ns.tools | unique | join(', ') }}{% endif %}<|im_end|>
{% for m in loop_messages %}
    {%- if m.role not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' ~ m.role) }}
    {%- endif %}
    {%- if m.role == 'assistant' %}
<|im_start|>assistant
{% generation %}
        {%- for call in m.tool_calls | default([]) %}
<tool_call>{{ dict(name=call.function.name, arguments=call.function.arguments) | tojson }}
</tool_call>{% if not loop.last %}{{ '\\n' }}{% endif %}
        {%- else %}
            {{- m.content | trim }}
        {%- endfor %}<|im_end|>{% endgeneration %}
    {%- elif m.role == 'tool' %}
<|im_start|>tool
{{ m.content | tojson(indent=2) }}<|im_end|>
    {%- else %}
<|im_start|>{{ m.role }}
{{ m.content }}{% if loop.index0 == ns.last_user %} [{{ loop.index }}/{{ loop.length }}]{% endif %}
<|im_end|>
    {%- endif %}
    {%- if loop.last and add_generation_prompt %}
<|im_start|>assistant
    {%- endif %}
{% endfor %}
{%- for word in ['stop', 'here'] %}{% if word == 'here' %}{% break %}{% endif %}{% endfor %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief. <b>&'\"é"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "  Hello "},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ],
    [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": "<3>"}}},
            {"type": "function", "function": {"name": "log", "arguments": {"x": "é"}}}]},
        {"role": "tool", "content": "5 & <done>"},
        {"role": "assistant", "content": "It is 5."},
    ],
]  # fmt: skip


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.bos_token = "<|endoftext|>"  # so that templates with {{ bos_token }} show it
    return tokenizer


@pytest.mark.parametrize("template", ["fixture", *CHAT_TEMPLATES, "complex"])
def test_chat_templates_render_exactly_as_transformers_does(template, bos_tokenizer):
    bos_tokenizer.chat_template = {"fixture": CHATML, "complex": COMPLEX}.get(
        template, CHAT_TEMPLATES.get(template)
    )
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            expected = bos_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
            assert render_chat(bos_tokenizer, messages, generation_prompt) == expected
    if template == "complex":
        assert "<3>" in expected and "</tool_call>" in expected and "[1/4]" in expected


def test_encode_gives_the_same_ids_as_transformers(bos_tokenizer):
    bos_tokenizer.chat_template = COMPLEX
    inputs = encode(bos_tokenizer, CONVERSATIONS[1])
    expected = bos_tokenizer.apply_chat_template(
        CONVERSATIONS[1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert inputs["input_ids"].tolist() == expected["input_ids"].tolist()
    assert inputs["attention_mask"].tolist() == expected["attention_mask"].tolist()


def test_raise_exception_in_a_chat_template_is_a_data_error(bos_tokenizer):
    bos_tokenizer.chat_template = COMPLEX
    with pytest.raises(DataError, match="cannot render this conversation: Unknown role: robot"):
        render_chat(bos_tokenizer, [{"role": "robot", "content": "beep"}])


def test_runaway_chat_template_file_names_file_row_and_bound(tmp_path, tiny_model_dir, low_bounds):
    from transformers import AutoTokenizer

    looping = tmp_path / "loop.jinja"
    looping.write_text(
        "{% for m in messages %}{% for a in m.content * 50 %}{% for b in m.content * 50 %}"
        "{% endfor %}{% endfor %}{{ m.content }}{% endfor %}"
    )
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    overrides = {"datasets": [{"path": str(tmp_path / "d.json")}], "val_set_size": 0}
    config = load_config(overrides={**overrides, "chat_template": str(looping)}).config
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(DataError) as info:
        prepare_data(config, tokenizer)
    message = info.value.message
    assert f"chat_template {looping}" in message and "row 1" in message
    assert "the loop bound" in message
    with pytest.raises(DataError, match="the loop bound"):
        encode(tokenizer, [{"role": "user", "content": "Say hi."}])


def test_a_chat_template_file_with_a_syntax_error_is_named(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    overrides = {"datasets": [{"path": str(tmp_path / "d.json")}], "chat_template": str(broken)}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(DataError, match=f"chat_template {broken}: line 1: Unexpected end"):
        prepare_data(load_config(overrides=overrides).config, tokenizer)
