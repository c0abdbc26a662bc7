"""Data settings of axolotl configs: prompt texts and loss masks as axolotl makes them."""

import json
from itertools import groupby

import pytest

from tunelab.config import load_config
from tunelab.data.prepare import load_examples, prepare_data
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import DataError

from .conftest import CHATML

# axolotl's AlpacaPrompter texts (prompters.py), written out here to compare against.
SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)
AXOLOTL_STYLES = {
    "instruct": (
        "{system}\n\n",
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "chat": (
        "SYSTEM: {system}\n",
        "USER: {instruction}\n{input}\nASSISTANT:",
        "USER: {instruction}\nASSISTANT:",
    ),
    "chatml": (
        "<|im_start|>system\n{system}<|im_end|>\n",
        "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "phi": (
        "<|system|>\n{system}<|end|>\n",
        "<|user|>\n{instruction}<|end|>{input}<|assistant|>",
        "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
    ),
}


def axolotl_prompt(style: str, instruction: str, extra: str) -> str:
    system, turn, turn_no_input = AXOLOTL_STYLES[style]
    if extra:
        return system.format(system=SYSTEM_INPUT) + turn.format(
            instruction=instruction, input=extra
        )
    return system.format(system=SYSTEM_NO_INPUT) + turn_no_input.format(instruction=instruction)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def config(**overrides):
    base = {"val_set_size": 0, "shuffle_merged_datasets": False}
    return load_config(overrides={**base, **overrides}).config


@pytest.fixture
def tokenizer(tiny_model_dir):
    """A tokenizer of its own: choosing a chat template changes the tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def marked(tokenizer, item) -> str:
    """The training text with trained runs inside [[ ]]."""
    pairs = zip(item["input_ids"], item["labels"], strict=True)
    out = []
    for trained, run in groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX):
        text = tokenizer.decode([i for i, _ in run])
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


# --- alpaca_prompt and jeopardy ---------------------------------------------------------------


@pytest.mark.parametrize("style", ["instruct", "chat", "chatml", "phi"])
def test_alpaca_prompt_is_axolotls_text_and_mask(tmp_path, tokenizer, style):
    rows = [
        {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
        {"instruction": "Repeat the word.", "input": "tree", "output": "tree tree"},
    ]
    data = write_jsonl(tmp_path / "a.jsonl", rows)
    cfg = config(datasets=[{"path": str(data), "type": "alpaca_prompt", "prompt_style": style}])
    prepared = prepare_data(cfg, tokenizer)
    assert len(prepared.train) == 2
    for row, item in zip(rows, prepared.train, strict=True):
        prompt = axolotl_prompt(style, row["instruction"], row["input"])
        # as axolotl: the prompt and the response tokenized apart, then the EOS token
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        assert item["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
        assert item["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [
            tokenizer.eos_token_id
        ]


def test_alpaca_prompt_train_on_inputs_trains_the_prompt(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hello.", "output": "Hi"}])
    cfg = config(datasets=[{"path": str(data), "type": "alpaca_prompt"}], train_on_inputs=True)
    item = prepare_data(cfg, tokenizer).train[0]
    assert item["labels"] == item["input_ids"]
    assert tokenizer.decode(item["input_ids"]) == (
        axolotl_prompt("instruct", "Say hello.", "") + "Hi<|im_end|>"
    )


def test_jeopardy_is_alpaca_with_what_is(tmp_path, tokenizer):
    row = {"question": "This planet is red.", "category": "SPACE", "answer": "Mars"}
    data = write_jsonl(tmp_path / "j.jsonl", [row])
    cfg = config(datasets=[{"path": str(data), "type": "jeopardy", "prompt_style": "chat"}])
    item = prepare_data(cfg, tokenizer).train[0]
    prompt = axolotl_prompt("chat", "This planet is red.", "SPACE")
    assert marked(tokenizer, item) == f"{prompt}[[what is Mars<|im_end|>]]"


@pytest.mark.parametrize(
    ("kind", "row", "key"),
    [
        ("alpaca_prompt", {"instruction": "Hi"}, "output"),
        ("alpaca_prompt", {"output": "Hi"}, "instruction"),
        ("jeopardy", {"question": "q", "answer": "a"}, "category"),
        ("jeopardy", {"question": "q", "category": "c"}, "answer"),
    ],
)
def test_prompted_formats_name_the_missing_column(tmp_path, kind, row, key):
    data = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_examples(config(datasets=[{"path": str(data), "type": kind}]))
    assert f"'{key}' is missing" in str(err.value) and "line 1" in str(err.value)
    assert f"as {kind}" in str(err.value)


# --- field for raw and text ---------------------------------------------------------------------


def test_text_reads_the_named_field(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "t.jsonl", [{"body": "hello world", "text": "not this"}])
    cfg = config(datasets=[{"path": str(data), "type": "text", "field": "body"}])
    item = prepare_data(cfg, tokenizer).train[0]
    assert marked(tokenizer, item) == "[[hello world<|im_end|>]]"
    missing = config(datasets=[{"path": str(data), "type": "text", "field": "content"}])
    with pytest.raises(DataError, match="'content' is missing"):
        load_examples(missing)


def test_raw_reads_the_named_field_with_no_hard_cut(tmp_path, tokenizer):
    # text-generation-webui's raw text: chunks end with no EOS; hard_cut_string cuts the text
    text = "one\n\n\ntwo"
    data = write_jsonl(tmp_path / "r.jsonl", [{"doc": text}])
    source = {"path": str(data), "type": "raw", "field": "doc", "hard_cut_string": ""}
    items = prepare_data(config(datasets=[source]), tokenizer).train
    assert [tokenizer.decode(i["input_ids"]) for i in items] == [text]  # not cut at "\n\n\n"
    cut = prepare_data(config(datasets=[{**source, "hard_cut_string": "\n\n\n"}]), tokenizer)
    assert sorted(tokenizer.decode(i["input_ids"]) for i in cut.train) == ["one", "two"]


# --- chunked_text (axolotl's type completion) and pretrain ---------------------------------------

LONG_DOC = " ".join(f"the cat is on the mat {i}." for i in range(12))


def bos_tokenizer(tiny_model_dir):
    """The tiny tokenizer, made to put a BOS token (<|im_start|>) in front of text."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos = "<|im_start|>"
    bos_id = tok.convert_tokens_to_ids(bos)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A",
                                                       special_tokens=[(bos, bos_id)])  # fmt: skip
    tok.bos_token = bos
    return tok


def axolotl_completion(tokenizer, text, sequence_len):
    """axolotl's CompletionPromptTokenizingStrategy: _tokenize (truncation at
    sequence_len * 64, EOS appended unless already last or at max_length), then slices of
    sequence_len tokens; labels are the ids."""
    max_length = sequence_len * 64
    ids = tokenizer(text, truncation=True, max_length=max_length, padding=False)["input_ids"]
    if ids[-1] != tokenizer.eos_token_id and len(ids) < max_length:
        ids = ids + [tokenizer.eos_token_id]
    return [ids[i : i + sequence_len] for i in range(0, len(ids), sequence_len)]


def axolotl_pretrain(tokenizer, text, sequence_len):
    """axolotl's PretrainTokenizationStrategy: the tokenizer's overflowing windows, each
    + EOS; labels are the ids."""
    res = tokenizer(
        text, truncation=True, max_length=sequence_len - 1, add_special_tokens=True,
        return_overflowing_tokens=True, stride=min(256, (sequence_len - 1) // 2),
    )  # fmt: skip
    return [seq + [tokenizer.eos_token_id] for seq in res["input_ids"]]


@pytest.mark.parametrize("bos", [False, True])
def test_chunked_text_is_axolotls_completion(tmp_path, tiny_model_dir, bos):
    from transformers import AutoTokenizer

    tok = bos_tokenizer(tiny_model_dir) if bos else AutoTokenizer.from_pretrained(tiny_model_dir)
    data = write_jsonl(tmp_path / "c.jsonl", [{"body": LONG_DOC}])
    source = {"path": str(data), "type": "chunked_text", "field": "body"}
    prepared = prepare_data(config(datasets=[source], sequence_len=16), tok)
    expected = axolotl_completion(tok, LONG_DOC, 16)
    assert len(expected) > 2 and len(expected[-1]) < 16  # several slices; the last is short
    assert [item["input_ids"] for item in prepared.train] == expected
    assert all(item["labels"] == item["input_ids"] for item in prepared.train)
    # consecutive slices, no overlap, of the text's ids (after the BOS, if any) and EOS
    whole = tok(LONG_DOC)["input_ids"] + [tok.eos_token_id]
    assert [t for item in prepared.train for t in item["input_ids"]] == whole
    assert (whole[0] == tok.bos_token_id) is bos
    assert prepared.stats["truncated"] == 0


def test_chunked_text_eos_only_where_axolotl_adds_it(tmp_path, tokenizer):
    rows = [{"text": "one\n\n\ntwo"}, {"text": "ends with its own EOS<|im_end|>"}, {"text": ""}]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    prepared = prepare_data(config(datasets=[{"path": str(data), "type": "chunked_text"}]),
                            tokenizer)  # fmt: skip
    # no hard cut, one EOS at the end, none added after an EOS already there, none for ""
    assert [tokenizer.decode(item["input_ids"]) for item in prepared.train] == [
        "one\n\n\ntwo<|im_end|>",
        "ends with its own EOS<|im_end|>",
    ]
    assert [item["input_ids"] for item in prepared.train] == [
        axolotl_completion(tokenizer, row["text"], 2048)[0] for row in rows[:2]
    ]


def test_chunked_text_is_cut_at_64_sequence_lens(tmp_path, tokenizer):
    text = " ".join(["the cat is on the mat"] * 200)  # over 8 * 64 = 512 tokens
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": text}])
    prepared = prepare_data(
        config(datasets=[{"path": str(data), "type": "chunked_text"}], sequence_len=8), tokenizer
    )
    whole = len(tokenizer(text)["input_ids"])
    assert [item["input_ids"] for item in prepared.train] == axolotl_completion(tokenizer, text, 8)
    assert len(prepared.train) == 64  # 512 tokens, with no EOS: axolotl adds none at the limit
    assert prepared.train[-1]["input_ids"][-1] != tokenizer.eos_token_id
    assert prepared.stats["truncated"] == 1
    assert prepared.stats["truncated_tokens"] == whole - 512


@pytest.mark.parametrize("bos", [False, True])
def test_pretrain_is_axolotls_strided_windows(tmp_path, tiny_model_dir, bos):
    from transformers import AutoTokenizer

    tok = bos_tokenizer(tiny_model_dir) if bos else AutoTokenizer.from_pretrained(tiny_model_dir)
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": LONG_DOC}])
    prepared = prepare_data(config(datasets=[{"path": str(data), "type": "pretrain"}],
                                   sequence_len=16), tok)  # fmt: skip
    assert tok.backend_tokenizer.truncation is None  # as it was: not kept from the windows
    expected = axolotl_pretrain(tok, LONG_DOC, 16)
    assert len(expected) > 2
    assert [item["input_ids"] for item in prepared.train] == expected
    assert all(item["labels"] == item["input_ids"] for item in prepared.train)
    assert all(len(ids) <= 16 and ids[-1] == tok.eos_token_id for ids in expected)
    if bos:  # every window starts with the BOS token
        assert all(ids[0] == tok.bos_token_id for ids in expected)
    else:  # neighbours share stride = min(256, 15 // 2) = 7 tokens
        assert expected[0][-1 - 7 : -1] == expected[1][:7]


def test_chunked_text_and_pretrain_pack_dedupe_cache_and_inspect(tmp_path, tokenizer):
    from tunelab.data.inspect import report

    rows = [{"text": LONG_DOC}, {"text": "a short one"}, {"text": LONG_DOC}]
    chunked = write_jsonl(tmp_path / "c.jsonl", rows)
    pretrain = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = config(
        datasets=[{"path": str(chunked), "type": "chunked_text"},
                  {"path": str(pretrain), "type": "pretrain"}],
        sequence_len=16, sample_packing=True, dataset_prepared_path=str(tmp_path / "prep"),
    )  # fmt: skip
    loaded = load_examples(cfg)
    assert loaded.duplicates == 2  # the same text, once per type
    first = prepare_data(cfg, tokenizer, loaded)
    samples = [ids for row in first.train for ids in row["input_ids"]]
    expected = [
        *axolotl_completion(tokenizer, LONG_DOC, 16),
        *axolotl_completion(tokenizer, "a short one", 16),
        *axolotl_pretrain(tokenizer, LONG_DOC, 16),
        *axolotl_pretrain(tokenizer, "a short one", 16),
    ]
    assert sorted(samples) == sorted(expected)
    assert first.stats["train_samples"] == len(expected) and "packed_rows" in first.stats
    assert [s.format for s in first.sources] == ["chunked_text", "pretrain"]
    again = prepare_data(cfg, tokenizer, loaded)
    assert again.train == first.train
    assert any(n.startswith("reused the prepared dataset") for n in again.notes)
    shown = report(first, tokenizer, 50)["examples"]
    assert all(len(ex["segments"]) == 1 and ex["segments"][0]["trained"] for ex in shown)


# --- chat_template masks --------------------------------------------------------------------------

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello there!"},
    ]
}
S, U1, A1 = "<|im_start|>system\nBe brief.", "<|im_start|>user\nName a colour.", "Blue."
U2, A2 = "<|im_start|>user\nSay hello.", "Hello there!"
END, AS = "<|im_end|>", "<|im_start|>assistant\n"


def chat_marked(tmp_path, tokenizer, rows=None, **settings) -> list[str]:
    data = write_jsonl(tmp_path / "c.jsonl", rows or [CONVERSATION])
    source = {"path": str(data), "type": "chat_template"}
    source.update({k: v for k, v in settings.items() if k not in ("eot_tokens", "train_on_inputs")})
    top = {k: v for k, v in settings.items() if k in ("eot_tokens", "train_on_inputs")}
    prepared = prepare_data(config(datasets=[source], **top), tokenizer)
    return [marked(tokenizer, item) for item in prepared.train]


def test_chat_template_trains_assistant_content_and_its_end_token(tmp_path, tokenizer):
    # unlike tunelab's own rule, the newline after <|im_end|> is markup, not trained
    assert chat_marked(tmp_path, tokenizer) == [
        f"{S}{END}\n{U1}{END}\n{AS}[[{A1}{END}]]\n{U2}{END}\n{AS}[[{A2}{END}]]\n"
    ]


def test_chat_template_roles_to_train_user_and_assistant(tmp_path, tokenizer):
    both = chat_marked(tmp_path, tokenizer, roles_to_train=["user", "assistant"])
    assert both == [
        f"{S}{END}\n<|im_start|>user\n[[Name a colour.{END}]]\n{AS}[[{A1}{END}]]\n"
        f"<|im_start|>user\n[[Say hello.{END}]]\n{AS}[[{A2}{END}]]\n"
    ]
    # train_on_inputs trains every turn's content, the system message's too
    every = chat_marked(tmp_path, tokenizer, train_on_inputs=True)
    assert every[0].startswith("<|im_start|>system\n[[Be brief.<|im_end|>]]\n")
    assert every[0].count("[[") == 5


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("turn", f"{S}{END}\n{U1}{END}\n{AS}[[{A1}{END}]]\n{U2}{END}\n{AS}[[{A2}{END}]]\n"),
        ("last", f"{S}{END}\n{U1}{END}\n{AS}[[{A1}]]{END}\n{U2}{END}\n{AS}[[{A2}{END}]]\n"),
        (
            "all",
            f"{S}[[{END}]]\n{U1}[[{END}]]\n{AS}[[{A1}{END}]]\n{U2}[[{END}]]\n{AS}[[{A2}{END}]]\n",
        ),
        ("none", f"{S}{END}\n{U1}{END}\n{AS}[[{A1}]]{END}\n{U2}{END}\n{AS}[[{A2}]]{END}\n"),
    ],
)
def test_chat_template_train_on_eos(tmp_path, tokenizer, rule, expected):
    assert chat_marked(tmp_path, tokenizer, train_on_eos=rule) == [expected]


def test_chat_template_eot_tokens_other_than_eos(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    # a template whose turns end with <|endoftext|> (a single token); EOS is not written
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHATML.replace("<|im_end|>", "<|endoftext|>")
    settings = {"eot_tokens": ["<|endoftext|>"], "train_on_eos": "none", "train_on_eot": "turn"}
    got = chat_marked(tmp_path, tok, **settings)
    assert got[0].endswith("<|im_start|>assistant\n[[Hello there!<|endoftext|>]]\n")
    assert "[[Blue.<|endoftext|>]]" in got[0]
    # default eot_tokens (the EOS token, which this template never writes): content only
    plain = chat_marked(tmp_path, tok)
    assert plain[0].endswith("<|im_start|>assistant\n[[Hello there!]]<|endoftext|>\n")


def test_chat_template_eot_token_rules_conflict_with_eos(tmp_path, tokenizer):
    settings = {"eot_tokens": ["<|im_end|>"], "train_on_eos": "none", "train_on_eot": "turn"}
    with pytest.raises(DataError, match="train_on_eos 'none' and train_on_eot 'turn' differ"):
        chat_marked(tmp_path, tokenizer, **settings)


def test_chat_template_roles_thinking_and_system(tmp_path, tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.reasoning_content %}"
        "<think>{{ m.reasoning_content }}</think>\n{% endif %}{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
    )
    row = {
        "chat": [
            {"who": "sys", "text": "Be brief."},
            {"who": "me", "text": "Hi"},
            {"who": "bot", "text": "Hello", "thought": "greet back"},
        ]
    }
    settings = {
        "field_messages": "chat",
        "message_property_mappings": {"role": "who", "content": "text"},
        "roles": {"system": ["sys"], "user": ["me"], "assistant": ["bot"]},
        "field_thinking": "thought",
        "drop_system_message": True,
    }
    got = chat_marked(tmp_path, tokenizer, rows=[row], **settings)
    # as axolotl: the reasoning is part of the turn's trained text
    assert got == ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                   "[[<think>greet back</think>\nHello<|im_end|>]]\n"]  # fmt: skip


def test_other_conversation_formats_keep_tunelabs_rule(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "o.jsonl", [CONVERSATION])
    item = prepare_data(config(datasets=[{"path": str(data), "type": "openai"}]), tokenizer)
    assert marked(tokenizer, item.train[0]).endswith(f"{AS}[[{A2}{END}\n]]")


# --- choosing the chat template ---------------------------------------------------------------

VICUNA_LIKE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _alpaca_rows(tmp_path):
    return write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hello.", "output": "Hi"}])


@pytest.mark.parametrize("as_file", [False, True])
def test_chat_template_jinja_text_or_file_wins(tmp_path, tokenizer, as_file):
    jinja = VICUNA_LIKE
    if as_file:
        (tmp_path / "t.jinja").write_text(VICUNA_LIKE, encoding="utf-8")
        jinja = str(tmp_path / "t.jinja")
    data = _alpaca_rows(tmp_path)
    cfg = config(datasets=[{"path": str(data)}], chat_template="chatml", chat_template_jinja=jinja)
    prepared = prepare_data(cfg, tokenizer)
    assert tokenizer.chat_template == VICUNA_LIKE
    text = tokenizer.decode(prepared.train[0]["input_ids"])
    assert text == "USER: Say hello.\nASSISTANT: Hi\n<|im_end|>"  # tunelab adds the EOS
    assert any("chat_template 'chatml' is not used" in n for n in prepared.notes)


def test_chat_template_jinja_missing_file(tmp_path, tokenizer):
    cfg = config(datasets=[{"path": str(_alpaca_rows(tmp_path))}],
                 chat_template_jinja=str(tmp_path / "nope.jinja"))  # fmt: skip
    with pytest.raises(DataError, match="neither Jinja text nor an existing file"):
        prepare_data(cfg, tokenizer)


def test_chat_template_jinja_is_data_never_code(tmp_path, tokenizer):
    """A template from a config reaches no Python object: it renders in the sandbox."""
    escape = (
        "{{ messages.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{% endfor %}"
    )
    cfg = config(datasets=[{"path": str(_alpaca_rows(tmp_path))}], chat_template_jinja=escape)
    with pytest.raises(DataError) as caught:
        prepare_data(cfg, tokenizer)
    assert "chat_template_jinja" in caught.value.message and "unsafe" in caught.value.message


def test_axolotl_template_name_uses_the_models_own(tmp_path, tokenizer):
    cfg = config(datasets=[{"path": str(_alpaca_rows(tmp_path))}], chat_template="qwen_25")
    prepared = prepare_data(cfg, tokenizer)
    assert tokenizer.chat_template == CHATML
    assert any(
        "'qwen_25' is axolotl's name" in n and "using the template of" in n for n in prepared.notes
    )
    assert tokenizer.decode(prepared.train[0]["input_ids"]).startswith("<|im_start|>user\n")


def test_axolotl_template_name_without_a_models_own(tmp_path, tokenizer):
    tokenizer.chat_template = None
    cfg = config(datasets=[{"path": str(_alpaca_rows(tmp_path))}], chat_template="phi_3")
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tokenizer)
    assert "phi_3" in err.value.message and "has no chat template" in err.value.message
    assert "chat_template_jinja" in err.value.hint


def test_gemma3_and_tokenizer_default(tmp_path, tokenizer):
    data = _alpaca_rows(tmp_path)
    prepare_data(config(datasets=[{"path": str(data)}], chat_template="tokenizer_default"),
                 tokenizer)  # fmt: skip
    assert tokenizer.chat_template == CHATML
    prepared = prepare_data(config(datasets=[{"path": str(data)}], chat_template="gemma3"),
                            tokenizer)  # fmt: skip
    assert "<start_of_turn>model\n" in tokenizer.decode(prepared.train[0]["input_ids"])


# --- pretraining_dataset ----------------------------------------------------------------------


def test_pretraining_reads_only_what_max_steps_needs(tmp_path, tokenizer):
    docs = [f"the cat is on the mat {i}" for i in range(3000)]
    lines = [json.dumps({"body": d}) for d in docs]
    lines[1500] = "{not json"  # read, it would fail: reading must stop well before it
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = config(
        pretraining_dataset=[{"path": str(path), "field": "body"}],
        max_steps=3, micro_batch_size=2, gradient_accumulation_steps=2, sequence_len=16,
        val_set_size=0.2,
    )  # fmt: skip
    loaded = load_examples(cfg)
    assert loaded.examples == []
    prepared = prepare_data(cfg, tokenizer, loaded)
    assert prepared.eval == []  # never held out
    rows = 3 * 2 * 2
    assert len(prepared.train) == rows
    # as axolotl's type pretrain: each document its own sample (short ones one window), + EOS
    assert [c["input_ids"] for c in prepared.train] == [
        w for doc in docs[:rows] for w in axolotl_pretrain(tokenizer, doc, 16)
    ]
    assert all(c["labels"] == c["input_ids"] for c in prepared.train)
    note = next(n for n in loaded.notes if n.startswith("pretraining_dataset: read"))
    assert f"read {rows} rows" in note and "the rest is not read" in note
    assert prepared.sources[-1].rows == rows


def test_pretraining_long_documents_are_strided_windows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": LONG_DOC}, {"text": ""}, {"text": "x y"}])
    cfg = config(pretraining_dataset=[{"path": str(path)}], max_steps=100, sequence_len=16)
    prepared = prepare_data(cfg, tokenizer)
    expected = axolotl_pretrain(tokenizer, LONG_DOC, 16) + axolotl_pretrain(tokenizer, "x y", 16)
    # the empty row's lone EOS is dropped, as axolotl drops samples under 2 tokens
    assert [c["input_ids"] for c in prepared.train] == expected
    assert prepared.stats["pretraining_chunks"] == len(expected)
    assert any("fewer than the 100 rows" in n for n in prepared.notes)


def test_pretraining_with_packing_reads_tokens_to_fill_the_rows(tmp_path, tokenizer):
    docs = [f"the cat is on the mat {i}" for i in range(500)]
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": d} for d in docs])
    cfg = config(pretraining_dataset=[{"path": str(path)}], max_steps=3, sequence_len=32,
                 sample_packing=True)  # fmt: skip
    prepared = prepare_data(cfg, tokenizer)
    windows = prepared.stats["pretraining_chunks"]
    assert 3 < windows < 500  # several short documents to a row
    assert prepared.stats["packed_rows"] >= 3
    # reading stops at the window that brings the tokens to 3 rows' worth
    assert 3 * 32 <= prepared.stats["train_tokens"] < 3 * 32 + 32


def test_pretraining_beside_datasets_and_from_a_text_file(tmp_path, tokenizer):
    text = tmp_path / "book.txt"
    text.write_text("line one\nline two\n" * 50, encoding="utf-8")
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hello.", "output": "Hi"}])
    cfg = config(
        datasets=[{"path": str(data)}], pretraining_dataset=[{"path": str(text)}],
        max_steps=2, micro_batch_size=1, sequence_len=32,
    )  # fmt: skip
    prepared = prepare_data(cfg, tokenizer)
    assert len(prepared.train) == 1 + 2
    chunks = [c["input_ids"] for c in prepared.train if c["labels"] == c["input_ids"]]
    # the whole file is one document: its first two windows
    assert chunks == axolotl_pretrain(tokenizer, text.read_text(), 32)[:2]
    assert tokenizer.decode(chunks[0]).startswith("line one\nline two\nline")
    assert prepared.stats["pretraining_chunks"] == 2


def test_pretraining_row_error_names_line_and_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "fine"}, {"other": "x"}])
    cfg = config(pretraining_dataset=[{"path": str(path)}], max_steps=50, sequence_len=8)
    with pytest.raises(DataError, match=r"p\.jsonl:2: 'text' is missing"):
        prepare_data(cfg, tokenizer)


def test_pretraining_prepared_dataset_is_reused_with_its_note(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": f"the cat {i}"} for i in range(200)])
    cfg = config(
        pretraining_dataset=[{"path": str(path)}], max_steps=2, sequence_len=8,
        dataset_prepared_path=str(tmp_path / "prepared"),
    )  # fmt: skip
    first = prepare_data(cfg, tokenizer)
    again = prepare_data(cfg, tokenizer)
    assert again.train == first.train and len(first.train) == 2
    assert any(n.startswith("reused the prepared dataset") for n in again.notes)
    assert any(n.startswith("pretraining_dataset: read") for n in again.notes)
    longer = prepare_data(config(**{**cfg.model_dump(), "max_steps": 3}), tokenizer)
    assert len(longer.train) == 3  # how much is read is part of the key


# --- image conversations in chat_template rows ------------------------------------------------


@pytest.fixture
def vlm_processor(tiny_vlm):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_vlm)


@pytest.fixture
def pictures(tmp_path):
    """Three small PNGs beside the data file, in img/."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / "img" / f"{i}.png")
    return tmp_path / "img"


def image_turn(text, *images):
    return [*images, {"type": "text", "text": text}]


LLAVA_ROWS = [  # the layout of HuggingFaceH4/llava-instruct-mix-vsft
    {
        "messages": [
            {"role": "user", "content": image_turn("What colour is it?", {"type": "image"})},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        ],
        "images": ["img/0.png"],
    },
    {
        "messages": [
            {"role": "user", "content": image_turn("And this?", {"type": "image"})},
            {"role": "assistant", "content": [{"type": "text", "text": "Green."}]},
            {
                "role": "user",
                "content": image_turn("Last one?", {"type": "image", "path": "img/2.png"}),
            },
            {"role": "assistant", "content": "Blue."},
        ],
        "images": ["img/1.png"],
    },
]


def test_chat_template_image_rows_train_like_vision_rows(tmp_path, vlm_processor, pictures):
    data = write_jsonl(tmp_path / "llava.jsonl", LLAVA_ROWS)
    cfg = config(datasets=[{"path": str(data), "type": "chat_template"}])
    prepared = prepare_data(cfg, vlm_processor.tokenizer, processor=vlm_processor)
    first, second = prepared.train
    assert first["images"] == [str(pictures / "0.png")]
    # the column's image first, then the one the later part names itself
    assert second["images"] == [str(pictures / "1.png"), str(pictures / "2.png")]
    tokenizer = vlm_processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert second["input_ids"].count(image_id) == 2 * 5  # 4 patches + the class token each
    shown = "<image>" * 5
    assert marked(tokenizer, first) == (
        f"<|im_start|>user\n{shown}What colour is it?{END}\n{AS}[[Red.{END}\n]]"
    )
    assert marked(tokenizer, second) == (
        f"<|im_start|>user\n{shown}And this?{END}\n{AS}[[Green.{END}\n]]"
        f"<|im_start|>user\n{shown}Last one?{END}\n{AS}[[Blue.{END}\n]]"
    )


def test_chat_template_image_rows_are_vision_samples(tmp_path, pictures):
    from tunelab.data.formats import VisionSample

    rows = [LLAVA_ROWS[1], CONVERSATION]  # a text-only conversation stays one
    data = write_jsonl(tmp_path / "llava.jsonl", rows)
    source = {"path": str(data), "type": "chat_template", "field_messages": "messages"}
    loaded = load_examples(config(datasets=[source], default_system_message="Be kind."))
    image, text = (ex.sample for ex in loaded.examples)
    assert isinstance(image, VisionSample) and isinstance(text, list)
    # every turn as content parts, the form image-text chat templates read; parts bare
    assert image.messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": image_turn("And this?", {"type": "image"})},
        {"role": "assistant", "content": [{"type": "text", "text": "Green."}]},
        {"role": "user", "content": image_turn("Last one?", {"type": "image"})},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
    ]
    assert image.images == (str(pictures / "1.png"), str(pictures / "2.png"))


def test_image_rows_need_a_multimodal_model(tmp_path, tokenizer, pictures):
    data = write_jsonl(tmp_path / "llava.jsonl", LLAVA_ROWS[:1])
    cfg = config(datasets=[{"path": str(data), "type": "chat_template"}])
    with pytest.raises(DataError, match="image rows need a multimodal base model"):
        prepare_data(cfg, tokenizer)


@pytest.mark.parametrize(
    ("content", "images", "problem"),
    [
        ([{"type": "audio"}, {"type": "text", "text": "Hi"}], None,
         "'content' of turn 1 holds an 'audio' part: audio parts are not supported yet"),
        ([{"type": "input_audio", "input_audio": {"data": "..."}}], None,
         "audio parts are not supported yet"),
        ([{"type": "image"}, {"type": "image"}], ["img/0.png"],
         "'images' holds 1 image path for 2 image parts"),
        ([{"type": "text", "text": "Hi"}], ["img/0.png"],
         "'images' holds 1 image path for 0 image parts"),
        ([{"type": "image"}], ["img/nope.png"], "'images' names a file that does not exist"),
        ([{"type": "image", "image": "img/nope.png"}], None,
         "'images' names a file that does not exist"),
        ([{"type": "image", "url": "https://example.com/a.png"}], None,
         "image part's 'url' is a web address"),
        ([{"type": "image"}], [{"bytes": "..."}],
         "'images' item 1 must be an image file path, found an object"),
        ([{"type": "video"}], None, "holds a 'video' part; only text parts"),
    ],
)  # fmt: skip
def test_image_row_errors_name_line_and_key(tmp_path, pictures, content, images, problem):
    row = {"messages": [{"role": "user", "content": content},
                        {"role": "assistant", "content": "Ok."}]}  # fmt: skip
    if images is not None:
        row["images"] = images
    data = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_examples(config(datasets=[{"path": str(data), "type": "chat_template"}]))
    assert problem in err.value.message and "(first at line 1)" in err.value.message


def test_image_rows_note_the_mask_keys_they_do_not_use(tmp_path, pictures):
    data = write_jsonl(tmp_path / "llava.jsonl", LLAVA_ROWS)
    source = {"path": str(data), "type": "chat_template", "roles_to_train": ["assistant"]}
    notes = load_examples(config(datasets=[source])).notes
    assert "datasets.0: roles_to_train apply to its text rows only; image rows are masked" in (
        " ".join(notes)
    )


# --- min_sample_len -----------------------------------------------------------------------------


def test_min_sample_len_drops_short_samples(tmp_path, tokenizer):
    rows = [{"text": "hello"}, {"text": "the cat is on the mat " * 4}, {"text": "a"}]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    lengths = [len(tokenizer(r["text"])["input_ids"]) + 1 for r in rows]  # + EOS
    cut = sorted(lengths)[-1]  # only the longest sample is long enough
    prepared = prepare_data(config(datasets=[{"path": str(data)}], min_sample_len=cut), tokenizer)
    assert [len(item["input_ids"]) for item in prepared.train] == [cut]
    assert prepared.stats["dropped"] == 2 and prepared.stats["dropped_short"] == 2
    assert len(prepare_data(config(datasets=[{"path": str(data)}]), tokenizer).train) == 3


def test_min_sample_len_dropping_everything_names_it(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"text": "a"}])
    with pytest.raises(DataError) as err:
        prepare_data(config(datasets=[{"path": str(data)}], min_sample_len=50), tokenizer)
    assert "all 2 training samples were dropped (2 shorter than min_sample_len=50)" in (
        err.value.message
    )
    assert "lower min_sample_len" in err.value.hint


# --- keys a dataset's type does not read ---------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "note"),
    [
        ({"roles_to_train": ["user"]},
         "datasets.0.roles_to_train applies to type chat_template only; ignored for alpaca"),
        ({"train_on_eos": "all"}, "datasets.0.train_on_eos applies to type chat_template only"),
        ({"train_on_eot": "all"}, "datasets.0.train_on_eot applies to type chat_template only"),
        ({"roles": {"user": ["human"]}}, "datasets.0.roles applies to type chat_template only"),
        ({"field_thinking": "why"}, "datasets.0.field_thinking applies to type chat_template"),
        ({"drop_system_message": True}, "datasets.0.drop_system_message applies to type chat_"),
        ({"field": "body"}, "datasets.0.field applies to types raw, text, chunked_text and "
         "pretrain only; ignored for alpaca"),
        ({"prompt_style": "chat"}, "datasets.0.prompt_style applies to types alpaca_prompt and "
         "jeopardy only; ignored for alpaca"),
    ],
)  # fmt: skip
def test_keys_the_type_does_not_read_are_noted(tmp_path, settings, note):
    data = _alpaca_rows(tmp_path)
    notes = load_examples(config(datasets=[{"path": str(data), **settings}])).notes
    assert len(notes) == 1 and notes[0].startswith(note)


def test_keys_the_type_reads_are_not_noted(tmp_path):
    chat = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION])
    text = write_jsonl(tmp_path / "t.jsonl", [{"body": "hello"}])
    alpaca = _alpaca_rows(tmp_path)
    datasets = [
        {"path": str(chat), "type": "chat_template", "roles_to_train": ["assistant"],
         "train_on_eos": "all", "field_thinking": "why", "drop_system_message": True},
        {"path": str(text), "type": "text", "field": "body"},
        {"path": str(alpaca), "type": "alpaca_prompt", "prompt_style": "chat"},
    ]  # fmt: skip
    notes = load_examples(config(datasets=datasets)).notes
    assert not [n for n in notes if "applies to" in n]
    # openai rows are conversations too, but not masked by chat_template's keys
    other = [{"path": str(chat), "type": "openai", "train_on_eos": "all"}]
    assert load_examples(config(datasets=other)).notes == [
        "datasets.0.train_on_eos applies to type chat_template only; ignored for openai"
    ]


def test_field_of_a_text_file_is_noted(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("one line\n", encoding="utf-8")
    notes = load_examples(config(datasets=[{"path": str(path), "field": "body"}])).notes
    assert notes == ["datasets.0.field is ignored for a .txt file (it has no columns)"]
