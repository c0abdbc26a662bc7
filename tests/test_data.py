import pytest

from tunelab.config import load_config
from tunelab.data.formats import alpaca_to_messages
from tunelab.data.prepare import load_examples, prepare_data
from tunelab.data.tokenize import IGNORE_INDEX, render_segments, tokenize_segments
from tunelab.errors import DataError

from .conftest import write_json


def split_decoded(tokenizer, ids, labels):
    trained = tokenizer.decode(
        [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    )
    untrained = tokenizer.decode(
        [i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]
    )
    return trained, untrained


def test_alpaca_messages():
    row = {"instruction": "Translate", "input": "Hello", "output": "Bonjour", "system": "Be brief."}
    assert alpaca_to_messages(row) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate\n\nHello"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    with_history = {"instruction": "And 3?", "output": "9", "history": [["Square 2?", "4"]]}
    assert [m["role"] for m in alpaca_to_messages(with_history)] == ["user", "assistant"] * 2


def test_response_only_loss_with_trained_end_of_turn(tiny_tokenizer):
    messages = alpaca_to_messages(
        {"instruction": "What is the capital of France?", "output": "Paris."}
    )
    segments = render_segments(messages, tiny_tokenizer, train_on_inputs=False)
    ids, labels = tokenize_segments(segments, tiny_tokenizer)
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert "".join(s.text for s in segments) == rendered
    assert ids == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    trained, untrained = split_decoded(tiny_tokenizer, ids, labels)
    assert trained == "Paris.<|im_end|>\n"
    assert (
        untrained
        == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    # exact positions: the prompt is masked; each response token, end of turn included, is trained
    n_prompt = len(tiny_tokenizer(untrained, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in labels


def test_multi_turn_trains_every_assistant_turn(tiny_tokenizer):
    row = {
        "instruction": "And 3?",
        "output": "9",
        "history": [["Square 2?", "4"]],
        "system": "Math.",
    }
    segments = render_segments(alpaca_to_messages(row), tiny_tokenizer, train_on_inputs=False)
    assert [s.text for s in segments if s.trained] == ["4<|im_end|>\n", "9<|im_end|>\n"]
    assert not any("Math." in s.text for s in segments if s.trained)


def test_train_on_inputs_trains_everything(tiny_tokenizer):
    messages = alpaca_to_messages({"instruction": "Say hello.", "output": "Hello there!"})
    ids, labels = tokenize_segments(render_segments(messages, tiny_tokenizer, True), tiny_tokenizer)
    assert labels == ids


@pytest.fixture
def bos_tokenizer(tiny_model_dir):
    """The tiny tokenizer made to put a BOS token in front of text, as Llama's does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.bos_token = "<|endoftext|>"
    bos = ("<|endoftext|>", tok.convert_tokens_to_ids("<|endoftext|>"))
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[bos]
    )
    return tok


@pytest.mark.parametrize("template_has_bos", [True, False])
def test_exactly_one_bos(bos_tokenizer, template_has_bos):
    from .conftest import CHATML

    bos_tokenizer.chat_template = ("{{ bos_token }}" if template_has_bos else "") + CHATML
    messages = alpaca_to_messages({"instruction": "Say hello.", "output": "Hello there!"})
    ids, labels = tokenize_segments(render_segments(messages, bos_tokenizer, False), bos_tokenizer)
    assert ids.count(bos_tokenizer.bos_token_id) == 1 and ids[0] == bos_tokenizer.bos_token_id
    assert labels[0] == IGNORE_INDEX


def test_truncation_and_dropping(tmp_path, tiny_tokenizer):
    rows = [
        {"instruction": "word " * 60, "output": "short"},
        {"instruction": "Hi", "output": "Hello there!"},
    ]
    path = write_json(tmp_path / "d.json", rows)
    config = load_config(
        overrides={"datasets": [{"path": str(path)}], "val_set_size": 0, "sequence_len": 40}
    ).config
    data = prepare_data(config, tiny_tokenizer)
    assert data.stats["truncated"] == 1 and data.stats["dropped"] == 1
    assert len(data.train) == 1 and all(len(x["input_ids"]) <= 40 for x in data.train)


def test_nothing_left_to_train_is_an_error(tmp_path, tiny_tokenizer):
    path = write_json(tmp_path / "d.json", [{"instruction": "word " * 60, "output": "short"}])
    config = load_config(
        overrides={"datasets": [{"path": str(path)}], "val_set_size": 0, "sequence_len": 20}
    ).config
    with pytest.raises(DataError, match="nothing left to train on"):
        prepare_data(config, tiny_tokenizer)


def test_validation_split_is_seeded(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    path = write_json(tmp_path / "d.json", rows)
    config = load_config(overrides={"datasets": [{"path": str(path)}], "val_set_size": 0.25}).config
    a, b = prepare_data(config, tiny_tokenizer), prepare_data(config, tiny_tokenizer)
    assert (len(a.train), len(a.eval)) == (15, 5)
    assert a.eval == b.eval


def _examples(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return load_examples(load_config(overrides={"datasets": [{"path": str(path)}]}).config)


def test_jsonl_reads(tmp_path):
    data = _examples(
        tmp_path,
        "d.jsonl",
        '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n',
    )
    assert len(data.examples) == 2 and data.sources[0].format == "alpaca"
    assert data.sources[0].rows == 2


def test_malformed_jsonl_names_file_and_line(tmp_path):
    with pytest.raises(DataError) as info:
        _examples(
            tmp_path,
            "d.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n',
        )
    assert f"{tmp_path / 'd.jsonl'}:2:" in info.value.message


def test_malformed_json_names_line(tmp_path):
    with pytest.raises(DataError) as info:
        _examples(
            tmp_path,
            "d.json",
            '[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]',
        )
    assert f"{tmp_path / 'd.json'}:3:" in info.value.message


def test_missing_field_counts_rows_and_names_first(tmp_path):
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "c"},
        {"instruction": "d", "output": "e"},
        {"instruction": "f"},
    ]
    with pytest.raises(DataError) as info:
        _examples(tmp_path, "d.json", __import__("json").dumps(rows))
    assert "2 of 4 rows cannot be read as alpaca" in info.value.message
    assert "'output' is missing (first at row 2)" in info.value.message


def test_empty_dataset(tmp_path):
    with pytest.raises(DataError, match="the dataset is empty"):
        _examples(tmp_path, "d.json", "[]")


def test_unknown_columns(tmp_path):
    with pytest.raises(DataError, match=r"cannot tell the format from its columns \['foo'\]"):
        _examples(tmp_path, "d.json", '[{"foo": "bar"}]')
