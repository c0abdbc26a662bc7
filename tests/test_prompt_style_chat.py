"""A run trained on the Alpaca prompt (type alpaca_prompt / jeopardy) saves that prompt as its
chat template, so chat and generate prompt the model in the format it learned."""

import json

import pytest

from tunelab.config import load_config
from tunelab.data.chat_render import compile_chat_template, render_chat
from tunelab.data.prepare import prepare_data
from tunelab.data.prompt_styles import (
    LAYOUTS,
    WITHOUT_INPUT,
    chat_template,
    prompt_text,
    prompted_style,
)
from tunelab.data.tokenize import IGNORE_INDEX, adds_bos
from tunelab.errors import DataError

from .conftest import CHATML, MEMORISE, cli, run, write_json

QUESTION = MEMORISE[0]  # no input: the prompt a one-question conversation renders as


def _config(**overrides):
    base = {"val_set_size": 0, "shuffle_merged_datasets": False}
    return load_config(overrides={**base, **overrides}).config


def _prompt_ids(item) -> list[int]:
    """The untrained start of a training item: its prompt's ids."""
    trained = next(i for i, label in enumerate(item["labels"]) if label != IGNORE_INDEX)
    return item["input_ids"][:trained]


def _data_prompt_ids(tmp_path, tokenizer, style: str, row=QUESTION) -> list[int]:
    """The ids the data pipeline gives ``row``'s prompt."""
    data = write_json(tmp_path / f"one-{style}.json", [row])
    source = {"path": str(data), "type": "alpaca_prompt", "prompt_style": style}
    return _prompt_ids(prepare_data(_config(datasets=[source]), tokenizer).train[0])


class _Tokenizer:
    """What render_chat reads of a tokenizer."""

    def __init__(self, template: str) -> None:
        self.chat_template = template
        self.special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.mark.parametrize("style", sorted(LAYOUTS))
def test_template_renders_the_prompt_of_each_style(style):
    template = chat_template(style)
    compile_chat_template(template, f"prompt_style {style}")  # compiles in the sandbox
    tok = _Tokenizer(template)
    question, answer = "Name a colour.", "Blue."
    user = [{"role": "user", "content": question}]
    prompt = prompt_text(style, question, "")
    assert render_chat(tok, user, add_generation_prompt=True) == prompt
    turn = [*user, {"role": "assistant", "content": answer}]
    assert render_chat(tok, turn) == prompt + answer + "</s>"
    # a system message takes the default one's place; later turns have no system line again
    system = [{"role": "system", "content": "Be brief."}, *turn, *user]
    with_system = prompt_text(style, question, "").replace(WITHOUT_INPUT, "Be brief.")
    again = LAYOUTS[style].turn_no_input.format(instruction=question)
    assert render_chat(tok, system, add_generation_prompt=True) == (
        with_system + answer + "</s>" + again
    )
    assert render_chat(_Tokenizer(chat_template(style, bos=True)), user, True) == "<s>" + prompt
    # braces and Jinja syntax in a message are text
    odd = [{"role": "user", "content": "{instruction} {{ x }} {% if %}"}]
    assert render_chat(tok, odd, True) == prompt_text(style, "{instruction} {{ x }} {% if %}", "")


def test_template_refuses_turns_out_of_order():
    tok = _Tokenizer(chat_template("instruct"))
    for messages in (
        [{"role": "assistant", "content": "Hi"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
    ):
        with pytest.raises(DataError, match="alternate user and assistant"):
            render_chat(tok, messages, add_generation_prompt=True)


def test_bos_is_there_when_the_tokenizer_adds_it(tmp_path, tiny_model_dir):
    """With a tokenizer that puts BOS before plain text, the template starts with it too and
    the ids are still the training prompt's."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos = "<|endoftext|>"
    tokenizer.bos_token = bos
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
    )
    assert adds_bos(tokenizer)
    for style in ("instruct", "chatml"):
        expected = _data_prompt_ids(tmp_path, tokenizer, style)
        assert expected[0] == tokenizer.bos_token_id
        tokenizer.chat_template = chat_template(style, bos=True)
        user = [{"role": "user", "content": QUESTION["instruction"]}]
        text = render_chat(tokenizer, user, add_generation_prompt=True)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected


def test_prompted_style_needs_one_style_for_every_dataset(tmp_path):
    data = str(write_json(tmp_path / "d.json", MEMORISE))
    alpaca = {"path": data, "type": "alpaca_prompt"}
    jeopardy = {"path": data, "type": "jeopardy"}

    def style(*datasets):
        return prompted_style(load_config(overrides={"datasets": list(datasets)}).config.datasets)

    assert style(alpaca, jeopardy) == ("instruct", None)
    assert style({**alpaca, "prompt_style": "phi"}) == ("phi", None)
    assert style({"path": data}) == (None, None)
    mixed, note = style(alpaca, {**alpaca, "prompt_style": "chat"})
    assert mixed is None and "prompt styles chat and instruct" in note
    mixed, note = style(alpaca, {"path": data, "type": "alpaca"})
    assert mixed is None and "the Alpaca prompt and other formats" in note


@pytest.mark.parametrize("style", ["instruct", "chat"])
def test_run_saves_the_prompt_it_trained_on(style, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from tunelab.infer.load import load_run
    from tunelab.model.generate import encode, generate, prompt_messages

    data = write_json(tmp_path / "data.json", MEMORISE)
    source = {"path": str(data), "type": "alpaca_prompt", "prompt_style": style}
    result = run(tiny_model_dir, data, tmp_path / "out", max_steps=2, datasets=[source])
    log = (result.run_dir / "train.log").read_text()
    assert (
        f"the run's chat template is the Alpaca prompt it was trained on (prompt_style {style})"
        in log
    )

    base = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = _data_prompt_ids(tmp_path, base, style)
    assert result.tokenizer.chat_template == CHATML  # the tokenizer in memory keeps its own

    model, tokenizer = load_run(result.run_dir)
    assert tokenizer.chat_template == chat_template(style, bos=adds_bos(base))
    ids = encode(tokenizer, prompt_messages(QUESTION["instruction"], None))["input_ids"]
    assert ids[0].tolist() == expected
    assert isinstance(generate(model, tokenizer, QUESTION["instruction"], max_new_tokens=4), str)

    code, err = cli(
        ["generate", "--run", str(result.run_dir), "--json", "--max-new-tokens", "4", "Hi"], capsys
    )
    assert code == 0, err
    assert json.loads(cli.out.splitlines()[0])["prompt"] == "Hi"


def test_mixed_data_keeps_the_models_template(tiny_model_dir, tmp_path):
    from tunelab.infer.load import load_run

    data = write_json(tmp_path / "data.json", MEMORISE)
    datasets = [
        {"path": str(data), "type": "alpaca_prompt"},
        {"path": str(data), "type": "alpaca"},
    ]
    result = run(tiny_model_dir, data, tmp_path / "out", max_steps=2, datasets=datasets)
    _, tokenizer = load_run(result.run_dir)
    assert tokenizer.chat_template == CHATML
    log = (result.run_dir / "train.log").read_text()
    assert "the saved tokenizer keeps the model's chat template" in log


def test_a_configured_chat_template_is_kept(tiny_model_dir, tmp_path):
    from tunelab.infer.load import load_run

    data = write_json(tmp_path / "data.json", MEMORISE)
    datasets = [{"path": str(data), "type": "alpaca_prompt"}]
    result = run(
        tiny_model_dir, data, tmp_path / "out", max_steps=2, datasets=datasets,
        chat_template_jinja=CHATML + " ",
    )  # fmt: skip
    _, tokenizer = load_run(result.run_dir)
    assert tokenizer.chat_template == CHATML + " "
    log = (result.run_dir / "train.log").read_text()
    assert "keeps the configured chat template" in log
