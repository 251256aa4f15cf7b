"""Data loading, tokenisation, sharding and the (sum, count) loss the replicas combine."""

from __future__ import annotations

import json

import importlib.util
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from zoplan.errors import ZoplanError
from zoplan.runtime import data
from zoplan.runtime.data import (
    IGNORE_INDEX,
    Example,
    Task,
    accuracy,
    batches,
    encode,
    load_examples,
    loss_terms,
    make_sentiment,
    split,
)
from zoplan.runtime.tiny import TINY

CLS = Task("classification")
LM = Task("lm")
COMP = Task("completion")
CHOICE = Task("choice")
TASKS = pytest.mark.parametrize("task", [CLS, LM, COMP, CHOICE], ids=["classification", "lm", "completion", "choice"])


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs: dict[str, Path]):
    return AutoTokenizer.from_pretrained(tiny_dirs["tiny-llama"])


def _examples(n: int, labelled: bool = True) -> list[Example]:
    return [Example(r["text"], r["label"] if labelled else None) for r in make_sentiment(n, seed=7)]


def _task_examples(n: int, task: Task) -> list[Example]:
    """Records of the task's shape: a completion is the label word after MeZO's prompt."""
    if task.kind == "completion":
        return [
            Example((" terrible", " great")[r["label"]], prompt=r["text"] + " It was")
            for r in make_sentiment(n, seed=7)
        ]
    if task.kind == "choice":
        words = (" terrible", " great", " fine and long enough")
        return [
            Example(words[r["label"]], r["label"], prompt=r["text"] + " It was", choices=words)
            for r in make_sentiment(n, seed=7)
        ]
    return _examples(n, labelled=task.kind == "classification")


def _longer(example: Example, extra: str) -> Example:
    """The same record with a longer input (its text, or its prompt for a completion)."""
    if example.prompt is not None:
        return Example(example.text, example.label, prompt=extra + " " + example.prompt, choices=example.choices)
    return Example(example.text + " " + extra, example.label)


# --- the bundled data ---------------------------------------------------------------------------


def test_bundled_file_is_the_generator_output() -> None:
    expected = data.render_jsonl(make_sentiment(data.SENTIMENT_SIZE, data.SENTIMENT_SEED))
    assert data.SENTIMENT_FILE.read_text(encoding="utf-8") == expected


def test_generator_is_deterministic_balanced_and_seeded() -> None:
    records = make_sentiment(400, seed=0)
    assert records == make_sentiment(400, seed=0)
    assert records != make_sentiment(400, seed=1)
    assert sum(r["label"] for r in records) == 200
    for record in records:  # a clear cue: some adjective of the record's own class
        cue = data.SENTIMENT_POSITIVE if record["label"] else data.SENTIMENT_NEGATIVE
        other = data.SENTIMENT_NEGATIVE if record["label"] else data.SENTIMENT_POSITIVE
        words = set(record["text"].rstrip(".").split())
        assert words & set(cue) and not words & set(other)


def test_load_bundled_sentiment() -> None:
    examples, kind = load_examples("sentiment")
    assert kind == "classification"
    assert len(examples) == data.SENTIMENT_SIZE
    assert examples == [Example(**r) for r in make_sentiment(data.SENTIMENT_SIZE, data.SENTIMENT_SEED)]


# --- loading files ------------------------------------------------------------------------------


def test_load_jsonl_and_csv_kinds(tmp_path: Path) -> None:
    lm = tmp_path / "lm.jsonl"
    lm.write_text('{"text": "hello there"}\n\n{"text": "general kenobi"}\n')
    assert load_examples(str(lm)) == ([Example("hello there"), Example("general kenobi")], "lm")

    labelled = tmp_path / "cls.csv"
    labelled.write_text('text,label\n"a dull, boring film",0\nthe movie was wonderful,1\n')
    assert load_examples(str(labelled)) == (
        [Example("a dull, boring film", 0), Example("the movie was wonderful", 1)],
        "classification",
    )
    plain = tmp_path / "plain.csv"
    plain.write_text("text\nsome words\n")
    assert load_examples(str(plain)) == ([Example("some words")], "lm")
    # a line of spaces (an editor's last line) is a blank line, as in a .jsonl file
    labelled.write_text('text,label\n"a dull, boring film",0\n  \nthe movie was wonderful,1\n \t \n')
    plain.write_text("text\nsome words\n   \n")
    assert load_examples(str(labelled))[0] == [Example("a dull, boring film", 0), Example("the movie was wonderful", 1)]
    assert load_examples(str(plain)) == ([Example("some words")], "lm")
    document = "word " * 40_000  # a field over the csv module's default limit of 128 KiB
    plain.write_text(f'text\n"{document}"\n')
    assert load_examples(str(plain)) == ([Example(document)], "lm")

    pairs = [Example(" Paris", prompt="The capital of France is"), Example(" 4", prompt="2 + 2 =")]
    completion = tmp_path / "sft.jsonl"
    completion.write_text(
        '{"prompt": "The capital of France is", "completion": " Paris"}\n{"prompt": "2 + 2 =", "completion": " 4"}\n'
    )
    assert load_examples(str(completion)) == (pairs, "completion")
    as_csv = tmp_path / "sft.csv"
    as_csv.write_text("prompt,completion\nThe capital of France is, Paris\n2 + 2 =, 4\n")
    assert load_examples(str(as_csv)) == (pairs, "completion")

    choice = tmp_path / "copa.jsonl"
    choice.write_text('{"prompt": "It rained, so", "choices": [" we stayed in", " we swam"], "label": 0}\n')
    picked = Example(" we stayed in", 0, prompt="It rained, so", choices=(" we stayed in", " we swam"))
    assert load_examples(str(choice)) == ([picked], "choice")


@pytest.mark.parametrize(
    ("lines", "line", "words"),
    [
        (['{"text": "ok", "label": 1}', '{"text": "broken", "label": 1'], 2, "invalid JSON"),
        (['{"text": "ok"}', '{"txt": "typo"}'], 2, 'no "text"'),  # labelled: test_a_prompt_reads_the_fields_it_names
        (['{"text": "ok", "label": "1"}'], 1, "not an integer"),
        (['{"text": "ok", "label": 1.5}'], 1, "not an integer"),
        (['{"text": "ok", "label": true}'], 1, "not an integer"),
        (['{"text": "ok", "label": 1}', "", '{"text": "no label"}'], 3, "has a text and no label but"),
        (
            ['{"text": "no label"}', '{"text": "ok", "label": 0}'],
            2,
            "has a text (or fields a prompt names) and a label but",
        ),
        (['["text", 1]'], 1, "expected a JSON object"),
        (['{"prompt": "2 + 2 =", "completion": " 4"}', '{"prompt": "3 + 3 ="}'], 2, 'no "completion"'),
        (['{"prompt": "2 + 2 =", "completion": 4}'], 1, '"completion" is not a string'),
        (['{"prompt": " ", "completion": " 4"}'], 1, '"prompt" is empty'),
        (['{"prompt": "2 + 2 =", "completion": " 4", "label": 1}'], 1, 'has "label" too'),
        (['{"prompt": "2 + 2 =", "completion": " 4"}', '{"text": "ok"}'], 2, "has a prompt and a completion"),
        (
            ['{"text": "ok", "label": 0}', '{"prompt": "2 + 2 =", "completion": " 4"}'],
            2,
            "a text (or fields a prompt names) and a label",
        ),
        (['{"prompt": "So", "choices": [" a", " b"], "label": 2}'], 1, "label 2, but the record has 2 choices"),
        (['{"prompt": "So", "choices": [" a"], "label": 0}'], 1, "two or more different non-empty strings"),
        (['{"prompt": "So", "choices": [" a", " a"], "label": 0}'], 1, "two or more different non-empty strings"),
        (['{"prompt": "So", "choices": [" a", 3], "label": 0}'], 1, "two or more different non-empty strings"),
        (['{"prompt": "So", "choices": [" a", " b"]}'], 1, 'has no "label"'),
        (['{"choices": [" a", " b"], "label": 0}'], 1, 'has no "prompt"'),
        (['{"prompt": "So", "choices": [" a", " b"], "label": 0, "text": "x"}'], 1, 'has "text" too'),
        # "prompt" or "choices" beside "text" and "label" (a field for --prompt): which shape was meant
        (['{"text": "ok", "label": 1, "prompt": "v1"}'], 1, 'a record with "prompt" is a prompt and its completion'),
        (['{"text": "ok", "label": 1, "choices": [" a", " b"]}'], 1, 'a record with "choices" is a multiple choice'),
        (['{"prompt": "So", "choices": [" a", "\\u200b"], "label": 0}'], 1, "two or more different non-empty"),
        # a zero-width space shows nothing: as empty as spaces
        (['{"text": "ok", "label": 0}', '{"text": "\\u200b", "label": 1}'], 2, '"text" is empty'),
        (['{"prompt": "\\u200b\\u2060", "completion": " 4"}'], 1, '"prompt" is empty'),
        # half of an escape pair (valid JSON in a valid UTF-8 file): the tokenizer crashed every rank
        (['{"text": "ok", "label": 0}', '{"text": "bad \\ud800 half", "label": 1}'], 2, "'\\ud800' at character 5"),
        (['{"prompt": "2 + 2 =\\udc00", "completion": " 4"}'], 1, '"prompt" holds'),
        (['{"prompt": "So", "choices": [" a", " b\\ud83d"], "label": 0}'], 1, "a choice holds"),
        (['{"premise": "x\\udfff", "label": 0}'], 1, '"premise" holds'),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, lines: list[str], line: int, words: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ZoplanError) as caught:
        load_examples(str(path))
    assert f"{path}:{line}:" in caught.value.message
    assert words in caught.value.message
    assert caught.value.fix


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        ("sentence,sentence,label\nhi,ho,1\n", 1, "header must be"),
        ("label\n1\n", 1, "header must be"),
        ("my field,label\nhi,1\n", 1, "header must be"),
        ("text,label\nfine,1\nbad,one\n", 3, "not an integer"),
        ('text,label\n"spans\ntwo lines",1\nno label,\n', 4, "no label"),
        ("text,label\nfine,1\ntoo,many,fields\n", 3, "3 fields"),
        ("text,label\nfine,-1\n", 2, "negative"),
        ("prompt,completion\n2 + 2 =, 4\n3 + 3 =,\n", 3, "completion is empty"),
        ("text,label\nfine,1\n\u200b,0\n", 3, "text is empty"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path: Path, content: str, line: int, words: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ZoplanError) as caught:
        load_examples(str(path))
    assert f"{path}:{line}:" in caught.value.message
    assert words in caught.value.message


def test_missing_file_and_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(ZoplanError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "folder.jsonl").mkdir()  # a folder of a data file's name: said as it is
    with pytest.raises(ZoplanError, match="folder.jsonl is a directory"):
        load_examples(str(tmp_path / "folder.jsonl"))
    (tmp_path / "set").mkdir()  # a data set's folder (or "."): "unsupported type ''" was all it said
    (tmp_path / "set" / "train.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ZoplanError, match=r"data .*set is a directory \(it holds train.jsonl\): a run reads one"):
        load_examples(str(tmp_path / "set"))
    os.mkfifo(tmp_path / "pipe.jsonl")  # a FIFO exists: "does not exist" was wrong
    with pytest.raises(ZoplanError, match="pipe.jsonl is not a regular file"):
        load_examples(str(tmp_path / "pipe.jsonl"))
    with pytest.raises(ZoplanError, match="unsupported type"):
        (tmp_path / "data.txt").write_text("hello\n")
        load_examples(str(tmp_path / "data.txt"))
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ZoplanError) as caught:
            load_examples("some-org/some-dataset")
        assert "'datasets' package" in caught.value.message
        assert ".jsonl" in caught.value.fix


# --- label words and encoding -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_label_words_are_single_tokens_in_every_tiny_tokenizer(name: str, tiny_dirs: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
    ids = CLS.label_token_ids(tokenizer)
    assert len(set(ids)) == 2
    for word, token in zip(CLS.label_words, ids):
        assert tokenizer(word, add_special_tokens=False)["input_ids"] == [token]
        # The same token the word gets after the prompt, i.e. what the model would continue with.
        prompt = CLS.format("the film was fun.")
        assert tokenizer(prompt + word, add_special_tokens=False)["input_ids"][-1] == token


def test_multi_token_label_word_is_refused(tokenizer) -> None:
    task = Task("classification", label_words=(" terrible", " magnificently"))
    with pytest.raises(ZoplanError, match="' magnificently' is [2-9]+ tokens"):
        task.label_token_ids(tokenizer)


def test_encode_pads_left_for_classification(tokenizer) -> None:
    examples = [Example("the film was fun.", 1), Example("a dull and boring film with bland music.", 0)]
    batch = encode(examples, tokenizer, CLS, max_len=64)
    lengths = [len(tokenizer(CLS.format(e.text))["input_ids"]) for e in examples]
    width = max(lengths)
    assert batch.input_ids.shape == (2, width)
    assert batch.attention_mask.sum(dim=1).tolist() == lengths
    short = width - lengths[0]
    assert batch.attention_mask[0, :short].sum() == 0 and batch.attention_mask[0, short:].all()
    assert (batch.input_ids[0, :short] == tokenizer.pad_token_id).all()
    assert batch.attention_mask[:, -1].all(), "the prediction point is the last column"
    assert tokenizer.decode(batch.input_ids[0, -2:]) == " It was"
    assert batch.position_ids[0, short:].tolist() == list(range(lengths[0]))
    assert batch.label_ids.tolist() == [1, 0]
    assert batch.label_token_ids.tolist() == CLS.label_token_ids(tokenizer)
    assert batch.target_count == 2
    assert encode(examples, tokenizer, CLS, max_len=64, pad_to_max_len=True).input_ids.shape == (2, 64)


def test_encode_lm_labels_ignore_padding_and_first_token(tokenizer) -> None:
    examples = [Example("hi there"), Example("the movie was wonderful and the music was superb.")]
    batch = encode(examples, tokenizer, LM, max_len=64)
    assert batch.labels is not None and batch.label_ids is None
    real = batch.attention_mask.bool()
    first_real = real & ~torch.nn.functional.pad(real, (1, 0))[:, :-1]
    assert (batch.labels[~real] == IGNORE_INDEX).all()
    assert (batch.labels[first_real] == IGNORE_INDEX).all()
    keep = real & ~first_real
    assert torch.equal(batch.labels[keep], batch.input_ids[keep])
    assert batch.target_count == int(keep.sum()) == int(real.sum()) - 2


def test_encode_truncation_keeps_prompt_end_or_text_start(tokenizer) -> None:
    long = Example(" ".join(["the movie was wonderful"] * 20) + ".", 1)
    cls = encode([long], tokenizer, CLS, max_len=16)
    assert cls.input_ids.shape == (1, 16)
    assert cls.input_ids[0, 0] == tokenizer.bos_token_id
    assert tokenizer.decode(cls.input_ids[0, -2:]) == " It was"
    lm = encode([Example(long.text)], tokenizer, LM, max_len=16)
    assert lm.input_ids.shape == (1, 16)
    assert tokenizer.decode(lm.input_ids[0], skip_special_tokens=True).startswith("the movie was wonderful")
    # a prompt whose words after its field alone fill what is kept: every example would read the
    # same tokens (it trained on them, exit 0); a record's words cut short is what truncation is for
    words = Task("classification", prompt="{text}" + " and so on" * 8 + " It was", label_words=CLS.label_words)
    with pytest.raises(
        ZoplanError, match=r"after its last field \{text\} is \d+ tokens, and an input keeps its last 15"
    ):
        encode([long], tokenizer, words, max_len=16)
    assert encode([long], tokenizer, words, max_len=64).input_ids.shape == (1, 64)


def _very_long(words: int, seed: int) -> str:
    """A text of ``words`` words of mixed shapes (capitals, digits, punctuation, accents, emoji)."""
    import random

    rng = random.Random(seed)
    vocab = ["the", "Movie", "was", "wonderful", "1984", "naïve", "well-made", "(sic)", "émigré", "🎬", "x" * 9, "it's"]
    return " ".join(rng.choice(vocab) for _ in range(words)) + "."


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_text_far_longer_than_a_row_is_cut_before_it_is_tokenised_to_the_same_tokens(
    name: str, tiny_dirs: dict[str, Path], monkeypatch
) -> None:
    """Tokenising a 10 MB line whole took 8 s for the 64 tokens a row kept: the tokenizer now reads
    only the end a row keeps (``reach``), and the rows are the same as from the whole text."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
    max_len = 24
    most = data.reach(tokenizer, max_len)
    long = _very_long(most // 3, seed=1)  # several times what is read
    assert len(long) > 2 * most
    records = {
        CLS: [Example(long, 1), Example("short.", 0)],
        LM: [Example(long), Example("short.")],
        COMP: [Example(long, prompt=long[::-1]), Example(" great", prompt="It was")],
        CHOICE: [Example(long, 0, prompt=long[::-1], choices=(long, " great"))],
    }
    read: list[int] = []
    original = type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        read.extend(len(t) for t in (text if isinstance(text, list) else [text]))
        return original(self, text, *args, **kwargs)

    cut = {}
    with monkeypatch.context() as patch:
        patch.setattr(type(tokenizer), "__call__", spy)
        for task, examples in records.items():
            cache: data.Tokens = {}
            data.pretokenize(examples, tokenizer, task, cache, max_len)
            cut[task] = encode(examples, tokenizer, task, max_len, cache=cache, every_choice=True)
    assert read and max(read) <= most  # the long texts were cut first
    monkeypatch.setattr(data, "reach", lambda tokenizer, max_len: 10**12)  # read whole
    for task, examples in records.items():
        whole = encode(examples, tokenizer, task, max_len, every_choice=True)
        assert torch.equal(cut[task].input_ids, whole.input_ids), task.kind
        assert cut[task].labels is None or torch.equal(cut[task].labels, whole.labels)
    # a cut part that gives too few tokens (as if each token stood for one character, while a
    # word takes several) is tokenised whole: the same rows again
    monkeypatch.setattr(data, "reach", lambda tokenizer, max_len: 4 * (max_len + data.REACH_MARGIN))
    for task, examples in records.items():
        again = encode(examples, tokenizer, task, max_len, every_choice=True)
        assert torch.equal(cut[task].input_ids, again.input_ids), task.kind


def test_encode_completion_learns_only_the_completion_and_its_end(tokenizer) -> None:
    examples = [Example(" great", prompt="the film was fun. It was"), Example(" wonderful music", prompt="hi")]
    batch = encode(examples, tokenizer, COMP, max_len=64)
    assert batch.labels is not None and batch.label_ids is None
    for row, example in enumerate(examples):
        targets = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        completion = tokenizer(example.text, add_special_tokens=False)["input_ids"]
        assert targets == completion + [tokenizer.eos_token_id]
        assert batch.input_ids[row, -len(targets) :].tolist() == targets  # the prompt comes before them
        prompt = tokenizer(example.prompt)["input_ids"]
        assert batch.input_ids[row, -len(targets) - len(prompt) : -len(targets)].tolist() == prompt
    assert batch.target_count == int((batch.labels != IGNORE_INDEX).sum())
    # too long: the prompt's beginning goes first (its special tokens stay), then the completion's end
    long = Example(" great", prompt=" ".join(["the movie was wonderful"] * 20) + ". It was")
    cut = encode([long], tokenizer, COMP, max_len=12)
    assert cut.input_ids.shape == (1, 12) and cut.input_ids[0, 0] == tokenizer.bos_token_id
    assert tokenizer.decode(cut.input_ids[0, -4:-2]) == " It was" and cut.target_count == 2
    huge = Example(" ".join(["great"] * 30), prompt="It was")
    cut = encode([huge], tokenizer, COMP, max_len=12)
    bos_and_was = [tokenizer.bos_token_id, tokenizer("It was", add_special_tokens=False)["input_ids"][-1]]
    assert cut.input_ids[0, :2].tolist() == bos_and_was  # the completion keeps 10 of its 31 tokens
    assert cut.target_count == 10
    with pytest.raises(ZoplanError, match="needs records of its shape"):
        encode([Example("the film was fun.")], tokenizer, COMP, max_len=32)


def test_a_multiple_choice_trains_on_its_right_choice_and_is_scored_on_all(tokenizer) -> None:
    """Training rows: each example's right choice after its prompt (the loss is its tokens').
    Evaluation rows: every choice; the answer is the choice of the highest mean log-probability."""
    words = (" terrible", " great", " fine and long enough")
    examples = [
        Example(words[1], 1, prompt="the film was fun. It was", choices=words),
        Example(words[0], 0, prompt="a dull plot. It was", choices=words[:2]),
    ]
    train = encode(examples, tokenizer, CHOICE, max_len=64)
    assert train.input_ids.shape[0] == 2 and bool(train.choice_right.all())
    for row, example in enumerate(examples):
        right = tokenizer(example.text, add_special_tokens=False)["input_ids"]
        assert train.labels[row][train.labels[row] != IGNORE_INDEX].tolist() == right  # no end token
    scored = encode(examples, tokenizer, CHOICE, max_len=64, every_choice=True)
    assert scored.choice_example.tolist() == [0, 0, 0, 1, 1]
    assert scored.choice_right.tolist() == [False, True, False, True, False]
    assert scored.target_count == train.target_count  # the loss counts the right choices' tokens
    vocab = len(tokenizer)
    logits = torch.zeros(*scored.input_ids.shape, vocab)
    loss, count = loss_terms(logits, scored, CHOICE)
    assert count == train.target_count and torch.allclose(loss / count, torch.tensor(math.log(vocab)))

    def favouring(choice_rows: dict[int, float]) -> torch.Tensor:
        """Logits under which row r's choice tokens get log-probability boost ``choice_rows[r]``."""
        out = torch.zeros(*scored.input_ids.shape, vocab)
        for row, boost in choice_rows.items():
            targets = scored.labels[row, 1:]
            for position in (targets != IGNORE_INDEX).nonzero().squeeze(1).tolist():
                out[row, position, targets[position]] = boost
        return out

    assert accuracy(favouring({1: 5.0, 3: 5.0}), scored, CHOICE) == (2, 2)
    assert accuracy(favouring({0: 5.0, 3: 5.0}), scored, CHOICE) == (1, 2)
    assert accuracy(favouring({2: 5.0, 4: 5.0}), scored, CHOICE) == (0, 2)  # the long choice is not penalised


def test_a_prompt_reads_the_fields_it_names(tmp_path: Path) -> None:
    """Labelled records of named fields (RTE's premise and hypothesis): the prompt names them; a
    record without one is named before any rank starts."""
    from zoplan.runtime.data import check_labels

    path = tmp_path / "rte.jsonl"
    path.write_text(
        '{"premise": "It rained.", "hypothesis": "The road is wet.", "label": 0, "idx": 7}\n'
        '{"premise": "It was dry.", "label": 1}\n'
    )
    examples, kind = load_examples(str(path))
    assert kind == "classification" and examples[0].fields == (
        ("hypothesis", "The road is wet."),
        ("premise", "It rained."),
    )
    task = Task(
        "classification", prompt='{premise}\nDoes this mean that "{hypothesis}" is true?', label_words=(" Yes", " No")
    )
    assert task.render(examples[0]) == 'It rained.\nDoes this mean that "The road is wet." is true?'
    with pytest.raises(
        ZoplanError, match=r"rte.jsonl:2: the prompt .* names \{hypothesis\}, which this record does not have"
    ):
        check_labels(examples, task, str(path))
    with pytest.raises(ZoplanError, match="no placeholder"):
        Task("classification", prompt="It was")
    # a recipe's prompt on records of another field name: the fix gives the prompt with theirs
    path.write_text('{"text": "a fine film", "label": 1}\n')
    with pytest.raises(ZoplanError, match=r"names \{sentence\}") as said:
        check_labels(load_examples(str(path))[0], Task("classification", prompt="{sentence} It was"), str(path))
    assert said.value.fix is not None and "(these have 'text': --prompt '{text} It was')" in said.value.fix
    # a number where the prompt wants text: said as such (the record does have the field)
    path.write_text('{"premise": 3, "hypothesis": "The road is wet.", "label": 0}\n')
    with pytest.raises(ZoplanError, match=r"names \{premise\}, which this record does not have as a string") as said:
        check_labels(load_examples(str(path))[0], task, str(path))
    assert '"3", not 3' in said.value.fix
    # a field the prompt reads, empty (spaces, or a zero-width space): the model would read the
    # prompt's own words alone, as it would for an empty "text" (refused so), in JSONL and CSV
    for blank in ("", "   ", "\u200b"):
        path.write_text(json.dumps({"premise": "It rained.", "hypothesis": blank, "label": 0}) + "\n")
        with pytest.raises(ZoplanError, match=r'rte.jsonl:1: "hypothesis", which the prompt .* reads, is empty'):
            check_labels(load_examples(str(path))[0], task, str(path))
    sst2 = tmp_path / "sst2.csv"
    sst2.write_text("sentence,label\nfine,1\n   ,0\n")
    with pytest.raises(ZoplanError, match=r'sst2.csv:3: "sentence", which the prompt .* reads, is empty'):
        check_labels(load_examples(str(sst2))[0], Task("classification", prompt="{sentence} It was"), str(sst2))
    # the same records as CSV: a header of the fields and 'label' (a recipe's own data: SST-2's
    # 'sentence,label', RTE's 'premise,hypothesis,label'), the label column anywhere
    as_csv = tmp_path / "rte.csv"
    as_csv.write_text('label,premise,hypothesis\n0,It rained.,The road is wet.\n1,"It was dry, and cold.",\n')
    rows, kind = load_examples(str(as_csv))
    assert kind == "classification" and rows[0].fields == examples[0].fields and rows[0].label == 0
    assert task.render(rows[0]) == task.render(examples[0])
    assert rows[1].fields == (("hypothesis", ""), ("premise", "It was dry, and cold.")) and rows[1].label == 1


def test_a_prompt_is_a_format_string_of_the_records_fields_and_nothing_else() -> None:
    """{{ and }} are literal braces, as in Python; a format spec, a conversion, an index or a lone
    brace is refused when the task is made (each used to leave its text in the model's input, or to
    fill a field meant as literal text, and the run went on)."""
    example = Example("", 0, fields=(("hypothesis", "wet"), ("premise", "rain")))
    task = Task("classification", prompt='{{"premise": {premise}}} so {hypothesis}?', label_words=(" Yes", " No"))
    assert task.render(example) == '{"premise": rain} so wet?'
    assert data.placeholders("{premise} {{text}} {premise} {hypothesis}") == ["premise", "hypothesis"]
    for prompt, said in (
        ("{premise:>5} so {hypothesis}", "{premise:>5} is not a field"),
        ("{premise!r} so {hypothesis}", "{premise!r} is not a field"),
        ("{premise[0]} so {hypothesis}", "{premise[0]} is not a field"),
        ("{} so {hypothesis}", "{} is not a field"),
        ("{premise} so {hypothesis} }", "single '}' encountered"),
        ("{premise so {hypothesis}", "unexpected '{' in field name"),
        ("{premise} so {hypothesis", "expected '}'"),
    ):
        with pytest.raises(ZoplanError, match=re.escape(said)) as refused:
            Task("classification", prompt=prompt, label_words=(" Yes", " No"))
        assert "write a literal brace as {{ or }}" in refused.value.fix


def test_label_out_of_range_is_refused(tokenizer) -> None:
    with pytest.raises(ZoplanError, match="has label 2"):
        encode([Example("the film was fun.", 2)], tokenizer, CLS, max_len=32)


# --- splitting and batching ---------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint() -> None:
    examples = [Example(f"text {i}", i % 2) for i in range(50)]
    train, held = split(examples, 0.2, seed=3)
    assert (train, held) == split(examples, 0.2, seed=3)
    assert held != split(examples, 0.2, seed=4)[1]
    assert len(held) == 10 and len(train) == 40
    assert sorted(e.text for e in train + held) == sorted(e.text for e in examples)
    with pytest.raises(ZoplanError, match="eval fraction"):
        split(examples, 1.0, seed=3)


@pytest.mark.parametrize("step", [0, 1, 5, 12])  # 12 * 8 = 96 straddles the 2nd epoch boundary
def test_every_data_degree_sees_the_same_global_batch(step: int) -> None:
    train = [Example(f"text {i}", i % 2) for i in range(45)]
    whole = batches(train, 8, seed=0, step=step, replica=0, replicas=1)
    assert len(whole) == 8
    for replicas in (2, 4, 8):
        shards = [batches(train, 8, 0, step, replica, replicas) for replica in range(replicas)]
        assert [len(shard) for shard in shards] == [8 // replicas] * replicas
        assert [e for shard in shards for e in shard] == whole


def test_batches_are_seeded_permutations_per_epoch() -> None:
    train = [Example(f"text {i}", i % 2) for i in range(40)]
    epoch = [e for step in range(5) for e in batches(train, 8, 0, step, 0, 1)]
    assert sorted(e.text for e in epoch) == sorted(e.text for e in train), "an epoch sees each once"
    assert epoch != train, "shuffled"
    assert epoch == [e for step in range(5) for e in batches(train, 8, 0, step, 0, 1)]
    assert epoch != [e for step in range(5) for e in batches(train, 8, 1, step, 0, 1)]
    next_epoch = [e for step in range(5, 10) for e in batches(train, 8, 0, step, 0, 1)]
    assert next_epoch != epoch and sorted(map(str, next_epoch)) == sorted(map(str, epoch))


def test_indivisible_global_batch_is_refused() -> None:
    with pytest.raises(ZoplanError) as caught:
        batches([Example("x", 0)] * 10, 6, seed=0, step=0, replica=0, replicas=4)
    assert "global batch 6" in caught.value.message and "4 data-parallel replicas" in caught.value.message


# --- loss and accuracy --------------------------------------------------------------------------


@TASKS
def test_shard_sums_equal_the_whole_batch_mean(task: Task, tokenizer) -> None:
    """Each replica encodes its own shard (its own padding) and returns (sum, count); summing them
    gives the mean over the global batch. Left padding right-aligns real tokens, so a shard's
    logits are the last columns of the whole batch's logits for the same rows."""
    examples = _task_examples(8, task)
    examples[3] = _longer(examples[3], "a long one: " + examples[4].text * 3)  # uneven shards
    whole = encode(examples, tokenizer, task, max_len=96)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(*whole.input_ids.shape, len(tokenizer), generator=generator)

    if task.kind == "classification":
        scores = logits[:, -1, whole.label_token_ids]
        reference = F.cross_entropy(scores, whole.label_ids)
    else:
        reference = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            whole.labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
    loss, count = loss_terms(logits, whole, task)
    assert torch.allclose(loss / count, reference, atol=1e-6)

    for replicas in (2, 4):
        total, total_count = torch.zeros(()), 0
        shard_size = len(examples) // replicas
        for replica in range(replicas):
            rows = slice(replica * shard_size, (replica + 1) * shard_size)
            shard = encode(examples[rows], tokenizer, task, max_len=96)
            width = shard.input_ids.shape[1]
            assert torch.equal(shard.input_ids, whole.input_ids[rows, -width:])
            shard_loss, shard_count = loss_terms(logits[rows, -width:], shard, task)
            total, total_count = total + shard_loss, total_count + shard_count
        assert total_count == count
        assert torch.allclose(total / total_count, reference, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY))
@TASKS
def test_real_model_loss_does_not_depend_on_sharding(name: str, task: Task, tiny_dirs: dict[str, Path]) -> None:
    """With position_ids and left padding a sequence gets the same loss in any shard."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[name]).eval()
    examples = _task_examples(4, task)
    examples[0] = _longer(examples[0], examples[1].text)
    with torch.no_grad():
        whole = encode(examples, tokenizer, task, max_len=64)
        loss, count = loss_terms(model(**whole.model_inputs()).logits, whole, task)
        total, total_count = 0.0, 0
        for replica in range(4):
            shard = encode(examples[replica : replica + 1], tokenizer, task, max_len=64)
            shard_loss, shard_count = loss_terms(model(**shard.model_inputs()).logits, shard, task)
            total, total_count = total + float(shard_loss), total_count + shard_count
    assert torch.isfinite(loss)
    assert total_count == count
    assert abs(total / total_count - float(loss) / count) < 1e-4


def test_accuracy_counts_label_word_argmax(tokenizer) -> None:
    examples = [Example("the film was fun.", 1), Example("a dull film.", 0), Example("so so.", 1)]
    batch = encode(examples, tokenizer, CLS, max_len=32)
    logits = torch.zeros(3, len(tokenizer))  # last position only, as with logits_to_keep=1
    great, terrible = batch.label_token_ids[1], batch.label_token_ids[0]
    logits[0, great] = 2.0  # right
    logits[1, terrible] = 2.0  # right
    logits[2, terrible] = 2.0  # wrong
    logits[:, 5] = 10.0  # a non-label token scores higher: must not matter
    assert accuracy(logits, batch, CLS) == (2, 3)
    loss, count = loss_terms(logits, batch, CLS)
    expected = 2 * F.cross_entropy(torch.tensor([[0.0, 2.0]]), torch.tensor([1])) + F.cross_entropy(
        torch.tensor([[2.0, 0.0]]), torch.tensor([1])
    )
    assert count == 3 and torch.allclose(loss, expected)


def test_lm_accuracy_counts_only_targets(tokenizer) -> None:
    batch = encode([Example("the movie was great"), Example("hi")], tokenizer, LM, max_len=16)
    # Logits that predict each next token exactly: every real target is right.
    logits = torch.full((*batch.input_ids.shape, len(tokenizer)), -5.0)
    logits[:, :-1].scatter_(2, batch.input_ids[:, 1:, None], 5.0)
    assert accuracy(logits, batch, LM) == (batch.target_count, batch.target_count)


def test_a_jsonl_file_may_start_with_a_byte_order_mark_and_messages_use_json_words(tmp_path: Path) -> None:
    """A BOM (as editors on Windows write it) was refused in a .jsonl file while a .csv file took
    one; messages named Python's types (NoneType, True) for what the file writes as null, true."""
    path = tmp_path / "bom.jsonl"
    lines = [json.dumps({"text": f"text {i}", "label": i % 2}) for i in range(3)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(lines) + "\n")
    assert load_examples(str(path)) == load_examples(str(plain))
    for line, words in (
        ("null", "expected a JSON object, found null"),
        ('{"text": "a", "label": true}', "label true is"),
    ):
        path.write_text(line + "\n")
        with pytest.raises(ZoplanError, match=words):
            load_examples(str(path))


def test_a_hub_dataset_s_missing_or_empty_text_is_refused_not_read_as_a_word(monkeypatch) -> None:
    """A record of a Hugging Face dataset whose text was null trained on the word "None" (str()),
    and an empty one on nothing; its label was named in Python's words."""
    import sys
    import types

    records = [{"sentence": "fine", "label": 1}]
    fake = types.ModuleType("datasets")

    class Loaded(list):
        column_names = ["sentence", "label"]

    fake.load_dataset = lambda name, config=None, split=None: Loaded(records)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_examples("someone/sst2") == ([Example("fine", 1)], "classification")
    for bad, words in (
        ({"sentence": None, "label": 0}, "its 'sentence' is null, not a text"),
        ({"sentence": " \u200b", "label": 0}, "its 'sentence' is empty"),
        ({"sentence": "ok", "label": True}, "label true is not a class index"),
    ):
        records[:] = [{"sentence": "fine", "label": 1}, bad]
        with pytest.raises(ZoplanError, match=f"dataset 'someone/sst2' record 1: {words}"):
            load_examples("someone/sst2")


@TASKS
def test_the_examples_a_sequence_cuts_are_counted_as_encoding_cuts_them(task: Task, tokenizer) -> None:
    """A prompt longer than --seq-len lost its start without a word (an RTE premise at -s 16):
    the run now counts them and says so. The count is of the examples whose row differs from
    their whole one."""
    from zoplan.runtime.data import cut_examples, pretokenize

    examples = _task_examples(24, task)
    lengths = [int(encode([e], tokenizer, task, 10_000).attention_mask.sum()) for e in examples]
    max_len = sorted(lengths)[len(lengths) // 2]  # about half are longer
    cut = 0
    for e in examples:
        short, whole = encode([e], tokenizer, task, max_len), encode([e], tokenizer, task, 10_000)
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(short.input_ids, short.attention_mask)]
        wholes = [ids[mask.bool()].tolist() for ids, mask in zip(whole.input_ids, whole.attention_mask)]
        cut += rows != wholes
    cache: dict = {}
    pretokenize(examples, tokenizer, task, cache, max_len)
    counted = cut_examples(examples, tokenizer, task, cache, max_len)
    if task.kind == "lm":  # read as far as a row goes, by design: not said
        assert counted == 0 and cut > 0
    else:
        assert counted == cut and 0 < cut < len(examples), (counted, cut)
