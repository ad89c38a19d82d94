"""The pretraining data pipeline: spec parsing, tokenizing into cached shards, and the batch plan."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nanocli.data import (
    BatchPlan,
    DataError,
    Phase,
    SourceSpec,
    blend_phase,
    open_shard,
    parse_data_spec,
    permute,
    prepare_source,
    pretraining_eos_id,
    sample_texts_for_tokenizer,
    source_key,
    train_bpe_tokenizer,
)
from nanocli_model.tokenizer import build_test_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while seven zebras quietly graze near "
         "rivers and mountains under bright skies with numbers 12 345 6789").split()


def make_docs(n: int, seed: int, lo: int = 5, hi: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + rng.choice([".", "!\n", "?"])
            for _ in range(n)]


def write_jsonl(path: Path, docs, field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def expected_stream(tok, docs) -> tuple[np.ndarray, np.ndarray]:
    """tokens and doc_index computed the direct way: encode each doc, append </s>."""
    eos = tok.token_to_id("</s>")
    pieces = [tok.encode(d) + [eos] for d in docs if d]
    index = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    return np.array([i for p in pieces for i in p], dtype=np.uint32), index


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    return (np.fromfile(path / "tokens.bin", dtype="<u4"), np.load(path / "doc_index.npy"),
            json.loads((path / "meta.json").read_text()))


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"), make_docs(400, 0), vocab_size=512)


@pytest.fixture
def data(tmp_path):
    """data/web/{a,b}.jsonl, data/book.txt, data/notes.md (not a data file), data/.hidden/x.txt."""
    root = tmp_path / "data"
    write_jsonl(root / "web" / "a.jsonl", make_docs(30, 1))
    write_jsonl(root / "web" / "b.jsonl", make_docs(20, 2))
    (root / "book.txt").write_text("Chapter one.\n\nIt was a dark night.\n", encoding="utf-8")
    (root / "notes.md").write_text("# notes\n", encoding="utf-8")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    return tmp_path


# ---------------------------------------------------------------------------------------------- specs
def test_spec_weights_globs_and_default_names(data):
    web, book = parse_data_spec("data/web/*.jsonl@0.7,data/book.txt@0.3", base_dir=data)
    assert (web.name, web.kind, web.weight) == ("web", "files", 0.7)
    assert [p.name for p in web.paths] == ["a.jsonl", "b.jsonl"]
    assert (book.name, book.weight, book.paths) == ("book", 0.3, (data / "data" / "book.txt",))
    (everything,) = parse_data_spec("data", base_dir=data)  # a directory: recursive, data files only
    assert [p.relative_to(data / "data").as_posix() for p in everything.paths] == ["book.txt", "web/a.jsonl",
                                                                                   "web/b.jsonl"]
    assert everything.weight == 1.0
    a, a2 = parse_data_spec("data/web/a.jsonl;data/web/../web/a.jsonl", base_dir=data)
    assert (a.name, a2.name) == ("a", "a-2")
    (named,) = parse_data_spec("mine=data/web/b.jsonl#field=body@2", base_dir=data)
    assert (named.name, named.text_field, named.weight) == ("mine", "body", 2.0)


def test_spec_synthetic_queries_keep_their_commas(data):
    syn, web = parse_data_spec("synthetic:reasoning?tasks=add,sub&docs=50@0.3,data/web@0.7", base_dir=data)
    assert (syn.kind, syn.name, syn.weight) == ("synthetic", "synthetic", 0.3)
    assert syn.options["tasks"] == ["add", "sub"] and syn.options["docs"] == 50
    assert (web.name, web.weight, len(web.paths)) == ("web", 0.7, 2)
    syn, book = parse_data_spec("synthetic:reasoning?tasks=add,sort&difficulty=2;data/book.txt", base_dir=data)
    assert syn.options["tasks"] == ["add", "sort"] and syn.options["difficulty"] == [2, 2]
    assert book.name == "book"
    web, syn = parse_data_spec("data/web/*.jsonl@0.7,synthetic:reasoning?tasks=add,sub@0.3", base_dir=data)
    assert (web.name, web.weight, syn.weight, syn.options["tasks"]) == ("web", 0.7, 0.3, ["add", "sub"])
    math_, other = parse_data_spec("math=synthetic:reasoning?tasks=mul,add@1,synthetic:reasoning@1")
    assert (math_.name, math_.options["tasks"], other.name) == ("math", ["mul", "add"], "synthetic")
    with pytest.raises(DataError, match="separate sources with ';'"):
        parse_data_spec("synthetic:reasoning?tasks=add,data/book.txt", base_dir=data)


@pytest.mark.parametrize("spec, message", [
    ("", "empty data spec"),
    ("data/book.txt,,data/web", "empty item"),
    ("data/missing.txt", "no such file"),
    ("data/*.nothing", "no files match"),
    ("data/book.txt@x", "weight 'x' is not a number"),
    ("data/book.txt@-1", "weight must be a number > 0"),
    ("data/notes.md", "unsupported file type '.md'"),
    ("data/web/*", None),  # fine: only .jsonl there
    ("synthetic:poetry", "unknown synthetic corpus"),
    ("synthetic:reasoning?bogus=1", "unknown option 'bogus'"),
    ("data/book.txt#field=", "text field"),
    ("x=data/book.txt,x=data/web", "two sources are named 'x'"),
])
def test_spec_errors(data, spec, message):
    if message is None:
        assert parse_data_spec(spec, base_dir=data)
        return
    with pytest.raises(DataError, match=message):
        parse_data_spec(spec, base_dir=data)


def test_source_from_mapping(data):
    s = SourceSpec.from_mapping("web", {"path": ["data/web/a.jsonl", "data/book.txt"], "weight": 2,
                                        "text_field": "body"}, base_dir=data)
    assert (s.kind, len(s.paths), s.weight, s.text_field) == ("files", 2, 2.0, "body")
    s = SourceSpec.from_mapping("math", {"synthetic": {"tasks": ["add", "sub"], "difficulty": [1, 2], "docs": 10}})
    assert (s.kind, s.options["tasks"], s.options["difficulty"], s.options["docs"]) == \
        ("synthetic", ["add", "sub"], [1, 2], 10)
    s = SourceSpec.from_mapping("m2", {"source": "synthetic:reasoning?docs=5@3"})
    assert (s.name, s.weight, s.options["docs"]) == ("m2", 3.0, 5)
    for bad, message in [({"path": "data/book.txt", "synthetic": {}}, "exactly one"),
                         ({"path": "data/book.txt", "colour": 1}, "unknown key 'colour'"),
                         ({"path": "data/book.txt", "weight": 0}, "weight must be"),
                         ({"synthetic": {"difficulty": 9}}, "difficulty")]:
        with pytest.raises(DataError, match=message):
            SourceSpec.from_mapping("x", bad, base_dir=data)


# ---------------------------------------------------------------------------------------------- tokenizing
def test_jsonl_and_txt_tokenize_byte_exact(tok, tmp_path):
    docs = make_docs(50, 3) + ["déjà vu — ünïcode ✓", "<think>not special here</think>"]
    lines = [json.dumps({"content": d}) for d in docs[:10]] + ["", '{"content": ""}', '{"content": null}']
    lines += [json.dumps({"content": d}) for d in docs[10:]]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text("whole file\n\nis one document\n", encoding="utf-8")
    calls = []
    (spec,) = parse_data_spec("d.jsonl#field=content;t.txt", base_dir=tmp_path)[:1]
    src = prepare_source(spec, tok, tmp_path / "cache", progress=lambda *a: calls.append(a))
    tokens, index, meta = read_shard(src.path)
    want_tokens, want_index = expected_stream(tok, docs)
    assert np.array_equal(tokens, want_tokens) and np.array_equal(index, want_index)
    assert (meta["n_docs"], meta["n_tokens"], src.n_docs) == (len(docs), len(want_tokens), len(docs))
    assert meta["eos_id"] == tok.token_to_id("</s>") == pretraining_eos_id(tok)
    assert src.max_id == int(want_tokens.max())
    assert isinstance(src.tokens, np.memmap) and not src.tokens.flags.writeable
    assert np.array_equal(src.document(len(docs) - 1), tok.encode(docs[-1]) + [tok.token_to_id("</s>")])
    size = (tmp_path / "d.jsonl").stat().st_size
    done = [c[1] for c in calls if c[0] == "tokenizing d"]
    assert done == sorted(done) and done[-1] == size and all(c[2] == size for c in calls if c[0] == "tokenizing d")
    (txt,) = parse_data_spec("t.txt", base_dir=tmp_path)
    tokens, index, _ = read_shard(prepare_source(txt, tok, tmp_path / "cache").path)
    assert np.array_equal(tokens, expected_stream(tok, ["whole file\n\nis one document\n"])[0])


def test_parquet_tokenizes_its_text_column(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = make_docs(40, 4)
    pq.write_table(pa.table({"text": docs[:20] + [None] + docs[20:], "n": list(range(41))}), tmp_path / "p.parquet")
    (spec,) = parse_data_spec("p.parquet", base_dir=tmp_path)
    tokens, index, _ = read_shard(prepare_source(spec, tok, tmp_path / "cache").path)
    want_tokens, want_index = expected_stream(tok, docs)
    assert np.array_equal(tokens, want_tokens) and np.array_equal(index, want_index)
    (spec,) = parse_data_spec("p.parquet#field=body", base_dir=tmp_path)
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n\)"):
        prepare_source(spec, tok, tmp_path / "cache")


def test_parquet_without_pyarrow_says_what_to_install(tok, tmp_path, monkeypatch):
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # import now fails
    (spec,) = parse_data_spec("p.parquet", base_dir=tmp_path)
    with pytest.raises(DataError, match="needs pyarrow; pip install pyarrow"):
        prepare_source(spec, tok, tmp_path / "cache")


def test_synthetic_source_is_the_generator_text(tok, tmp_path):
    from nanocli.data.synthetic import as_text, generate

    (spec,) = parse_data_spec("synthetic:reasoning?tasks=add,sort&docs=150&seed=3&split=heldout")
    src = prepare_source(spec, tok, tmp_path / "cache")
    want = [as_text(p) for p in generate(150, seed=3, split="heldout", tasks=["add", "sort"])]
    tokens, index, meta = read_shard(src.path)
    assert np.array_equal(tokens, expected_stream(tok, want)[0]) and meta["n_docs"] == 150


def test_synthetic_chat_format_is_the_conversation_through_the_chat_template(tiny_base, tmp_path):
    from nanocli.data.synthetic import CHAT_NO_THINK_EVERY, as_chat, generate
    from nanocli_model.tokenizer import Tokenizer

    chat_tok = Tokenizer.from_dir(tiny_base)
    (spec,) = parse_data_spec("synthetic:reasoning?docs=12&seed=5&format=chat")
    src = prepare_source(spec, chat_tok, tmp_path / "cache")
    problems = generate(12, seed=5)
    want = [chat_tok.apply_chat_template(as_chat(p, think=(i + 1) % CHAT_NO_THINK_EVERY != 0)["messages"],
                                         add_generation_prompt=False) for i, p in enumerate(problems)]
    tokens, _, meta = read_shard(src.path)
    assert np.array_equal(tokens, expected_stream(chat_tok, want)[0]) and meta["n_docs"] == 12
    assert "<think></think>" in want[CHAT_NO_THINK_EVERY - 1] and "</think>" in want[0]
    assert "<think>\n" in want[0] and "<think>\n" not in want[CHAT_NO_THINK_EVERY - 1]
    (text_spec,) = parse_data_spec("synthetic:reasoning?docs=12&seed=5")
    assert source_key(text_spec, chat_tok) != source_key(spec, chat_tok)
    other = Tokenizer.from_dir(tiny_base)
    other.chat_template = other.chat_template.replace("Assistant", "Bot")
    assert source_key(spec, other) != source_key(spec, chat_tok)  # a new template is a new cache entry


def test_synthetic_chat_format_needs_a_chat_template(tiny_base, tmp_path):
    from nanocli_model.tokenizer import Tokenizer

    plain = Tokenizer.from_dir(tiny_base)
    plain.chat_template = None
    (spec,) = parse_data_spec("synthetic:reasoning?docs=3&format=chat")
    with pytest.raises(DataError, match="format=chat"):
        prepare_source(spec, plain, tmp_path / "cache")
    with pytest.raises(Exception, match="format must be text or chat"):
        parse_data_spec("synthetic:reasoning?format=markdown")


def test_cache_is_reused_and_invalidated(tok, data, tmp_path):
    cache = tmp_path / "cache"
    (spec,) = parse_data_spec("data/web", base_dir=data)
    first = prepare_source(spec, tok, cache)
    stamp = (first.path / "tokens.bin").stat().st_mtime_ns
    calls = []
    again = prepare_source(parse_data_spec("data/web", base_dir=data)[0], tok, cache,
                           progress=lambda *a: calls.append(a))
    assert again.reused and not first.reused and again.path == first.path
    assert (again.path / "tokens.bin").stat().st_mtime_ns == stamp
    assert not [c for c in calls if c[0].startswith("tokenizing")]
    # one changed byte -> new key
    a = data / "data" / "web" / "a.jsonl"
    raw = bytearray(a.read_bytes())
    raw[raw.index(b'"text": "') + 9] ^= 0x01
    a.write_bytes(bytes(raw))
    changed = prepare_source(spec, tok, cache)
    assert changed.path != first.path and not changed.reused
    # another tokenizer -> new key, and its ids
    other = build_test_tokenizer(tmp_path / "tok2", make_docs(100, 9), vocab_size=300)
    retok = prepare_source(spec, other, cache)
    assert retok.path not in (first.path, changed.path)
    assert retok.tokens.max() < 300 and retok.meta["tokenizer_hash"] != changed.meta["tokenizer_hash"]
    # another text field -> new key (and here an error: the field is missing)
    with pytest.raises(DataError, match="no 'body' field"):
        prepare_source(parse_data_spec("data/web#field=body", base_dir=data)[0], tok, cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.path.name for p in (first, changed, retok))


@pytest.mark.parametrize("name, content, message", [
    ("broken.jsonl", b'{"text": "ok"}\n{"text": "oops\n', r"broken\.jsonl:2: broken JSON"),
    ("nofield.jsonl", b'{"text": "ok"}\n\n{"body": "x", "id": 3}\n', r"nofield\.jsonl:3: no 'text' field \(fields: body, id\)"),
    ("notstr.jsonl", b'{"text": 5}\n', r"notstr\.jsonl:1: field 'text' is int"),
    ("list.jsonl", b'["text"]\n', r"list\.jsonl:1: expected a JSON object"),
    ("latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin\.jsonl:2: not UTF-8"),
    ("latin.txt", b"line one\ncaf\xe9\n", r"latin\.txt:2: not UTF-8"),
    ("empty.jsonl", b'\n{"text": ""}\n\n', r"has no documents"),
    ("empty.txt", b"", r"has no documents"),
])
def test_bad_sources_raise_data_error_with_location(tok, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    (spec,) = parse_data_spec(name, base_dir=tmp_path)
    with pytest.raises(DataError, match=message):
        prepare_source(spec, tok, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written left behind


def test_shard_directory_is_used_in_place_and_vocab_checked(tok, data, tmp_path):
    (spec,) = parse_data_spec("data/web", base_dir=data)
    src = prepare_source(spec, tok, tmp_path / "cache")
    (shard,) = parse_data_spec(str(src.path))
    assert shard.kind == "shards"
    opened = prepare_source(shard, tok, tmp_path / "elsewhere")
    assert opened.path == src.path and opened.reused and opened.tokenizer_matches
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(DataError, match=rf"token ids go up to {src.meta['max_token_id']} but the vocabulary has 100"):
        prepare_source(shard, tok, tmp_path / "cache", vocab_size=100)
    (src.path / "tokens.bin").write_bytes(b"\0" * 8)
    with pytest.raises(DataError, match="damaged"):
        open_shard(src.path)


# ---------------------------------------------------------------------------------------------- batch plan
@pytest.fixture
def two_sources(tok, tmp_path):
    """'web' (~3.5k tokens) and 'book' (~1.5k tokens), tokenized."""
    write_jsonl(tmp_path / "web.jsonl", make_docs(150, 5))
    write_jsonl(tmp_path / "book.jsonl", make_docs(60, 6))
    specs = parse_data_spec("web.jsonl@0.7,book.jsonl@0.3", base_dir=tmp_path)
    return specs, {s.name: prepare_source(s, tok, tmp_path / "cache") for s in specs}


def plan_of(sources, phases=None, seq_len=16, global_batch=8, total_steps=200, seed=1, heldout=0.0):
    phases = phases or [Phase({"web": 0.7, "book": 0.3}, 1.0)]
    return BatchPlan(sources, phases, seq_len, global_batch, total_steps, seed, heldout)


def test_permute_is_a_keyed_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        assert sorted(permute(np.arange(n), n, ["k", n]).tolist()) == list(range(n))
    a, b = permute(np.arange(1000), 1000, "a"), permute(np.arange(1000), 1000, "b")
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    assert np.array_equal(permute(np.arange(500, 1000), 1000, "a"), a[500:])  # pointwise: no state


def test_batches_are_pure_functions_of_the_step(two_sources):
    _, sources = two_sources
    one, two = plan_of(sources), plan_of(sources)
    forward = [one.batch(s) for s in range(30)]
    backward = [two.batch(s) for s in reversed(range(30))][::-1]
    for a, b in zip(forward, backward):
        assert a.dtype == torch.int64 and a.shape == (8, 17) and torch.equal(a, b)
    assert one.global_batch_ids(17) == two.global_batch_ids(17) and torch.equal(one.batch(5), forward[5])
    assert not torch.equal(plan_of(sources, seed=2).batch(0), forward[0])
    assert one.fingerprint == two.fingerprint != plan_of(sources, seed=2).fingerprint


def test_rank_slices_concatenate_to_the_global_batch(two_sources):
    _, sources = two_sources
    plan = plan_of(sources)
    for step in (0, 7, 199):
        full = plan.batch(step)
        for world in (2, 4):
            assert torch.equal(torch.cat([plan.batch(step, r, world) for r in range(world)]), full)
    with pytest.raises(DataError, match="does not split evenly over 3"):
        plan.batch(0, 0, 3)
    with pytest.raises(DataError, match="outside the plan"):
        plan.batch(200)


def test_windows_are_slices_of_the_packed_stream(two_sources):
    _, sources = two_sources
    plan = plan_of(sources)
    streams = {n: np.fromfile(s.path / "tokens.bin", dtype="<u4").astype(np.int64) for n, s in sources.items()}
    for step in (0, 3, 150):
        rows = plan.batch(step).numpy()
        for row, (name, w) in zip(rows, plan.global_batch_ids(step)):
            assert np.array_equal(row, streams[name][w * 16:w * 16 + 17])


def test_blend_proportions_and_phase_switching(two_sources):
    _, sources = two_sources
    plan = plan_of(sources)
    names = [n for s in range(200) for n, _ in plan.global_batch_ids(s)]
    assert abs(names.count("web") / len(names) - 0.7) < 0.01
    for lo in range(0, 200, 25):  # any 25-step span, too
        span = names[lo * 8:(lo + 25) * 8]
        assert abs(span.count("web") / len(span) - 0.7) < 0.03
    phased = plan_of(sources, [Phase({"web": 1.0}, 0.25), Phase({"book": 1, "web": 1}, 0.5),
                               Phase({"book": 1.0}, 0.25)], total_steps=100)
    assert [phased.phase_at(s) for s in (0, 24, 25, 74, 75, 99)] == [0, 0, 1, 1, 2, 2]
    by_step = [[n for n, _ in phased.global_batch_ids(s)] for s in range(100)]
    assert all(set(b) == {"web"} for b in by_step[:25]) and all(set(b) == {"book"} for b in by_step[75:])
    middle = [n for b in by_step[25:75] for n in b]
    assert middle.count("web") == middle.count("book")
    info = phased.describe()
    assert [p["steps"] for p in info["phases"]] == [[0, 25], [25, 75], [75, 100]]
    assert info["tokens_per_step"] == 8 * 16 and info["total_tokens"] == 100 * 8 * 16
    assert info["sources"]["web"]["sequences"] == 25 * 8 + 200 and info["sources"]["book"]["sequences"] == 400
    web = info["sources"]["web"]
    assert web["epochs"] == pytest.approx(400 / web["train_windows"])


@pytest.mark.parametrize("phases, message", [
    ([Phase({"web": 1.0}, 0.5), Phase({"book": 1.0}, 0.4)], "add up to 0.9"),
    ([Phase({"news": 1.0}, 1.0)], "unknown source 'news'"),
    ([Phase({"web": 0.0}, 1.0)], "no source has a positive weight"),
    ([Phase({"web": -1.0, "book": 2.0}, 1.0)], "must be a number >= 0"),
])
def test_bad_phases(two_sources, phases, message):
    with pytest.raises(DataError, match=message):
        plan_of(two_sources[1], phases)


def test_each_window_once_per_epoch(two_sources):
    _, sources = two_sources
    plan = plan_of({"book": sources["book"]}, [Phase({"book": 1.0}, 1.0)])
    m = plan.describe()["sources"]["book"]["train_windows"]
    ids = [w for s in range(200) for _, w in plan.global_batch_ids(s)]
    first = [w for s in range(m // 8) for _, w in plan.global_batch_ids(s)]
    assert len(set(first)) == len(first)  # within the first epoch: no repeats
    counts = Counter(ids)
    assert set(counts) == set(range(m)) and max(counts.values()) - min(counts.values()) <= 1
    assert min(counts.values()) == len(ids) // m


def test_heldout_windows_never_train(two_sources):
    _, sources = two_sources
    plan = plan_of(sources, heldout=0.2)
    streams = {n: np.fromfile(s.path / "tokens.bin", dtype="<u4").astype(np.int64) for n, s in sources.items()}
    for name in sources:
        held = set(plan.heldout_windows(name).tolist())
        n_windows = plan.describe()["sources"][name]["windows"]
        assert len(held) == round(0.2 * n_windows)
        trained = {w for s in range(200) for n, w in plan.global_batch_ids(s) if n == name}
        assert not trained & held and trained | held == set(range(n_windows))
        rows = np.concatenate([b.numpy() for b in plan.eval_batches(3, 4, source=name)])
        wanted = {tuple(streams[name][w * 16:w * 16 + 17]) for w in held}
        assert rows.shape == (12, 17) and all(tuple(r) in wanted for r in rows)
    mixed = list(plan.eval_batches(2, 8))
    assert torch.equal(torch.cat(mixed), torch.cat(list(plan.eval_batches(2, 8))))
    assert plan.heldout_windows("web").tolist() == plan_of(sources, seed=9, heldout=0.2).heldout_windows("web").tolist()
    with pytest.raises(DataError, match="heldout_fraction > 0"):
        next(plan_of(sources).eval_batches(1, 1))


def test_source_too_small_for_a_window(two_sources):
    _, sources = two_sources
    n = sources["book"].n_tokens
    with pytest.raises(DataError, match=rf"'book' has {n} tokens but seq_len {n} needs at least {n + 1}"):
        plan_of(sources, seq_len=n)


def test_single_phase_from_a_spec(two_sources):
    specs, sources = two_sources
    phase = blend_phase(specs)
    assert phase == Phase({"web": 0.7, "book": 0.3}, 1.0)
    assert plan_of(sources, [phase]).global_batch_ids(3) == plan_of(sources).global_batch_ids(3)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_from_sampled_source_text(data, tmp_path):
    specs = parse_data_spec("data/web@3,synthetic:reasoning?docs=50@1", base_dir=data)
    texts = sample_texts_for_tokenizer(specs, 4000)
    assert 3900 <= sum(map(len, texts)) <= 4000
    assert any(t.startswith("Question:") for t in texts)
    assert sum(len(t) for t in texts if not t.startswith("Question:")) == 3000
    tok = train_bpe_tokenizer(texts, tmp_path / "tok", 320)
    assert tok.vocab_size == 320 and tok.token_to_id("</s>") == 2 and tok.think_start_id is not None
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    with pytest.raises(DataError, match="vocab_size must be"):
        train_bpe_tokenizer(texts, tmp_path / "tok2", 100)
