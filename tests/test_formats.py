"""Every input format: exact messages or text, and exact trained parts."""

import json

import pytest

from tunelab.config import load_config
from tunelab.data.formats import FORMATS, RowError, TextSample, detect_format
from tunelab.data.prepare import load_examples, prepare_data
from tunelab.data.tokenize import IGNORE_INDEX, sample_segments, tokenize_segments
from tunelab.errors import ConfigError, DataError


def trained_text(sample, tokenizer, train_on_inputs=False):
    segments = sample_segments(sample, tokenizer, train_on_inputs)
    ids, labels = tokenize_segments(segments, tokenizer)
    pairs = zip(ids, labels, strict=True)
    return tokenizer.decode([i for i, lab in pairs if lab != IGNORE_INDEX]), segments


def test_detection_order():
    assert detect_format(["messages"]).name == "openai"
    assert detect_format(["conversations", "tools"]).name == "sharegpt"
    assert detect_format(["instruction", "input", "output"]).name == "alpaca"
    assert detect_format(["question", "answer", "context"]).name == "qa"
    assert detect_format(["prompt", "completion"]).name == "completion"
    assert detect_format(["image", "caption"]).name == "vision"
    assert detect_format(["text", "meta"]).name == "text"
    assert detect_format(["instruction", "text"]).name == "text"
    assert detect_format(["foo"]) is None


def test_sharegpt_with_tools_and_function_calls(tiny_tokenizer):
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {
                "from": "function_call",
                "value": '{"name": "weather", "arguments": {"city": "Paris"}}',
            },
            {"from": "observation", "value": '{"temp": 20}'},
            {"from": "gpt", "value": "It is 20 degrees."},
        ],
        "tools": '[{"name": "weather"}]',
    }
    messages = FORMATS["sharegpt"].convert(row)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[0]["content"] == 'You can call these tools:\n[{"name": "weather"}]'
    trained, segments = trained_text(messages, tiny_tokenizer)
    assert trained == (
        '{"name": "weather", "arguments": {"city": "Paris"}}<|im_end|>\n'
        "It is 20 degrees.<|im_end|>\n"
    )
    untrained = "".join(s.text for s in segments if not s.trained)
    assert '{"temp": 20}' in untrained and "Weather in Paris?" in untrained


def test_openai_messages_with_tool_calls(tiny_tokenizer):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": [{"type": "text", "text": "It is 5."}]},
        ]
    }  # fmt: skip
    messages = FORMATS["openai"].convert(row)
    assert messages[2] == {
        "role": "assistant",
        "content": '{"name": "add", "arguments": {"a": 2, "b": 3}}',
    }
    trained, _ = trained_text(messages, tiny_tokenizer)
    assert (
        trained == '{"name": "add", "arguments": {"a": 2, "b": 3}}<|im_end|>\nIt is 5.<|im_end|>\n'
    )


def test_messages_column_with_sharegpt_turns():
    row = {"messages": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert FORMATS["openai"].convert(row)[1] == {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize(
    "turns, problem",
    [
        ([("human", "a"), ("human", "b"), ("gpt", "c")], "turn 2 is 'user' after 'user'"),
        ([("gpt", "a"), ("human", "b"), ("gpt", "c")], "turn 1 is 'assistant' at the start"),
        ([("human", "a"), ("gpt", "b"), ("human", "c")], "must end with an assistant turn"),
        ([("human", "a"), ("robot", "b")], "unknown role 'robot'"),
        ([("human", "a"), ("gpt", " ")], "of an assistant turn is empty"),
    ],
)
def test_conversation_problems(turns, problem):
    row = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    with pytest.raises(RowError, match=problem):
        FORMATS["sharegpt"].convert(row)


def test_qa(tiny_tokenizer):
    row = {"question": "Capital?", "answer": "Paris.", "context": "France is in Europe."}
    messages = FORMATS["qa"].convert(row)
    assert messages[0] == {"role": "user", "content": "France is in Europe.\n\nCapital?"}
    assert trained_text(messages, tiny_tokenizer)[0] == "Paris.<|im_end|>\n"


def test_completion_trains_only_the_completion(tiny_tokenizer):
    sample = FORMATS["completion"].convert({"prompt": "The sky is", "completion": " blue."})
    assert sample == TextSample((("The sky is", False), (" blue.", True)))
    trained, segments = trained_text(sample, tiny_tokenizer)
    assert trained == " blue.<|im_end|>"
    assert "".join(s.text for s in segments) == "The sky is blue.<|im_end|>"


def test_text_trains_everything_and_ends_with_eos(tiny_tokenizer):
    sample = FORMATS["text"].convert({"text": "hello world"})
    assert trained_text(sample, tiny_tokenizer)[0] == "hello world<|im_end|>"


def test_vision_rows_need_a_multimodal_model(tmp_path, tiny_tokenizer):
    from PIL import Image

    from tunelab.data.formats import VisionSample

    sample = FORMATS["vision"].convert({"image": "a.png", "caption": "a cat"})
    assert isinstance(sample, VisionSample) and sample.images == ("a.png",)
    assert sample.messages[1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "a cat"}],
    }
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "d.json").write_text(json.dumps([{"image": "a.png", "caption": "a cat"}]))
    config = load_config(
        overrides={"datasets": [{"path": str(tmp_path / "d.json")}], "val_set_size": 0}
    ).config
    with pytest.raises(DataError, match="image rows need a multimodal base model"):
        prepare_data(config, tiny_tokenizer)
    (tmp_path / "e.json").write_text(json.dumps([{"image": "missing.png", "caption": "a cat"}]))
    with pytest.raises(DataError, match="'image' names a file that does not exist"):
        load_examples(
            load_config(overrides={"datasets": [{"path": str(tmp_path / "e.json")}]}).config
        )


def test_unknown_format_name_lists_the_known_ones(tmp_path):
    data = tmp_path / "d.json"
    data.write_text("[]")
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"datasets": [{"path": str(data), "type": "alpacca"}]})
    assert "datasets.0.type" in str(info.value) and "'sharegpt'" in str(info.value)


def test_chat_template_type_with_property_mappings(tmp_path, tiny_tokenizer):
    rows = [
        {"dialog": [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "Hey"}]}
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    source = {
        "path": str(path),
        "type": "chat_template",
        "field_messages": "dialog",
        "message_property_mappings": {"role": "speaker", "content": "text"},
    }
    config = load_config(overrides={"datasets": [source], "val_set_size": 0}).config
    data = load_examples(config)
    assert data.examples[0].sample == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
    ]


def test_default_system_message(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}]))
    config = load_config(
        overrides={"datasets": [{"path": str(path)}], "default_system_message": "Be kind."}
    ).config
    assert load_examples(config).examples[0].sample[0] == {"role": "system", "content": "Be kind."}


def test_named_chat_template_replaces_the_models(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}]))
    overrides = {"datasets": [{"path": str(path)}], "val_set_size": 0, "chat_template": "vicuna"}
    data = prepare_data(load_config(overrides=overrides).config, tokenizer)
    ids, labels = data.train[0]["input_ids"], data.train[0]["labels"]
    assert tokenizer.decode(ids) == "USER: Hi\nASSISTANT: Hello<|im_end|>\n"
    trained = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert trained == " Hello<|im_end|>\n"


def test_empty_response_names_row_and_key(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}])
    )
    with pytest.raises(DataError) as info:
        load_examples(load_config(overrides={"datasets": [{"path": str(path)}]}).config)
    assert "'output' is empty" in info.value.message and "(first at row 2)" in info.value.message


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "alpaca", "vicuna"])
def test_named_templates_mask_every_assistant_turn(name, tiny_model_dir):
    from transformers import AutoTokenizer

    from tunelab.data.templates import CHAT_TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ]
    trained, segments = trained_text(messages, tokenizer)
    responses = [s.text for s in segments if s.trained]
    assert len(responses) == 2 and "Hello" in responses[0] and "See you" in responses[1]
    assert all("Hi" not in r and "Bye" not in r and "Be brief." not in r for r in responses)
    assert "None" not in "".join(s.text for s in segments)
    assert trained == "".join(responses)


NAN, INF = float("nan"), float("inf")
CHAT = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]


@pytest.mark.parametrize(
    "fmt, row, problem",
    [
        ("alpaca", {"instruction": "Say nothing", "output": NAN},
         "'output' must be text, found a number (NaN); write it as a string"),
        ("alpaca", {"instruction": 3, "output": "x"}, "'instruction' must be text, found a number;"),
        ("alpaca", {"instruction": "a", "input": True, "output": "x"},
         "'input' must be text, found a boolean (true)"),
        ("alpaca", {"instruction": "a", "output": "x", "system": ["a"]},
         "'system' must be text, found a list"),
        ("alpaca", {"instruction": "a", "output": "x", "history": [["q", 1]]},
         "'history' pair 1: must be text, found a number"),
        ("qa", {"question": "q", "answer": INF}, "'answer' must be text, found a number (Infinity)"),
        ("qa", {"question": "q", "answer": "a", "context": {"x": 1}},
         "'context' must be text, found an object"),
        ("completion", {"prompt": 1.5, "completion": "x"}, "'prompt' must be text, found a number"),
        ("completion", {"prompt": "p", "completion": False},
         "'completion' must be text, found a boolean (false)"),
        ("text", {"text": -INF}, "'text' must be text, found a number (-Infinity)"),
        ("sharegpt", {"conversations": [CHAT[0], {"from": "gpt", "value": 42}]},
         "'value' of turn 2 must be text, found a number"),
        ("sharegpt", {"conversations": CHAT, "system": NAN}, "'system' must be text, found a number (NaN)"),
        ("sharegpt", {"conversations": CHAT, "tools": 3}, "'tools' must be a list of tool definitions"),
        ("openai", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]},
                                 {"role": "assistant", "content": "x"}]},
         "'content' of turn 1 text part must be text, found a number"),
        ("openai", {"messages": [{"role": "user", "content": [{"type": "image_url"}]},
                                 {"role": "assistant", "content": "x"}]},
         "'content' of turn 1 holds a 'image_url' part; only text parts"),
        ("vision", {"image": "a.png", "caption": NAN}, "'caption' must be text, found a number (NaN)"),
        ("vision", {"image": "a.png", "caption": "c", "prompt": 7}, "'prompt' must be text"),
        ("alpaca", {"instruction": "hi \ud800", "output": "x"},
         "'instruction' holds \\ud800, half of a UTF-16 surrogate pair"),
    ],
)  # fmt: skip
def test_values_that_are_not_text_are_errors(fmt, row, problem):
    with pytest.raises(RowError) as info:
        FORMATS[fmt].convert(row)
    assert problem in str(info.value)


def test_null_is_missing_where_required_and_empty_where_optional():
    row = {"instruction": "Hi", "input": None, "system": None, "history": None, "output": "Yo"}
    assert FORMATS["alpaca"].convert(row)[0] == {"role": "user", "content": "Hi"}
    with pytest.raises(RowError, match="'instruction' is missing"):
        FORMATS["alpaca"].convert({"instruction": None, "output": "Yo"})
    turns = [{"role": "user", "content": None}, {"role": "assistant", "content": "Yo"}]
    assert FORMATS["openai"].convert({"messages": turns})[0]["content"] == ""


def test_nan_rows_in_jsonl_are_counted_and_named(tmp_path, capsys):
    from .conftest import cli

    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"instruction": "Hi", "output": "Yo"}\n'
        '{"instruction": "Say nothing", "output": NaN}\n'
        '{"instruction": "Count", "output": 3}\n'
        '{"instruction": "More", "output": 4}\n'
    )
    code, err = cli(["validate", "--data", str(path)], capsys)
    assert code == 2
    assert f"error: {path}: 3 of 4 rows cannot be read as alpaca:" in err
    assert (
        "2 rows: 'output' must be text, found a number; write it as a string (first at line 3)"
        in err
    )
    assert (
        "1 row: 'output' must be text, found a number (NaN); write it as a string (first at line 2)"
        in err
    )


def test_csv_values_are_text_and_typed_columns_are_checked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def load(path):
        return load_examples(load_config(overrides={"datasets": [{"path": str(path)}]}).config)

    (tmp_path / "d.csv").write_text("question,answer,context\nTwo plus two?,4,\nNaN?,NaN,\n")
    answers = sorted(ex.sample[1]["content"] for ex in load(tmp_path / "d.csv").examples)
    assert answers == ["4", "NaN"]  # a CSV holds only text
    rows = [{"instruction": "a", "input": None, "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ok.parquet")
    assert len(load(tmp_path / "ok.parquet").examples) == 2  # a null in an optional column
    numbers = [{"question": "q", "answer": 1.5}, {"question": "r", "answer": float("nan")}]
    pq.write_table(pa.Table.from_pylist(numbers), tmp_path / "n.parquet")
    with pytest.raises(DataError) as info:
        load(tmp_path / "n.parquet")
    assert "2 of 2 rows cannot be read as qa" in info.value.message
    assert "1 row: 'answer' must be text, found a number (NaN)" in info.value.message
