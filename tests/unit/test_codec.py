"""Row <-> token codec, constrained likelihood and the constrained sampler.

Oracles: the round trip is checked against bins computed with `pd.cut` from the schema's edges (not the
codec's searchsorted); masks against the tokens that encoding every domain value produces; the likelihood
against a per-position loop; cached constrained sampling against greedy full recompute without a cache.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tramontane.datasets import adult_schema, load_adult
from tramontane.errors import DataError, GenerationError, SchemaError
from tramontane.synth.codec import BOS_ID, IGNORE_INDEX, TabularCodec
from tramontane.synth.sampling import sample_rows, sample_tokens
from tramontane.synth.schema import ColumnSpec, Schema

from tests.conftest import random_model, tiny_args


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and do not stall when the machine is oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adult() -> pd.DataFrame:
    return load_adult("train")


@pytest.fixture(scope="module")
def codec() -> TabularCodec:
    return TabularCodec(adult_schema())


def _missing_schema() -> Schema:
    return Schema((
        ColumnSpec.categorical("pet", ["cat", "dog"], missing=True),
        ColumnSpec.numeric("n", 0, 9, "integer", missing=True),
        ColumnSpec.numeric("x", -1.0, 1.0, "float", n_bins=4),
        ColumnSpec.categorical("flag", [True, False]),
    ))


def _missing_frame() -> pd.DataFrame:
    return pd.DataFrame({"pet": ["cat", None, "dog", "cat"], "n": [0, 9, np.nan, 4],
                         "x": [-1.0, 0.1, 0.99, -0.3], "flag": [True, False, False, True]})


# -- round trip ---------------------------------------------------------------------------------------------

def test_every_adult_row_round_trips_to_its_binned_value(adult: pd.DataFrame, codec: TabularCodec) -> None:
    enc = codec.encode(adult)
    assert enc.tokens.shape == (len(adult), 45) and enc.tokens.dtype == torch.long
    back = codec.decode(enc.tokens)
    assert list(back.columns) == list(adult.columns)
    schema = codec.schema
    for spec in schema:
        got, want = back[spec.name], adult[spec.name]
        if spec.kind == "categorical":
            assert got.tolist() == want.tolist(), spec.name
            assert pd.api.types.is_string_dtype(got.dtype)
            continue
        assert got.dtype == np.int64, spec.name
        # Oracle: the decoded value falls in the same schema bin as the original, per pd.cut.
        edges = list(spec.edges)
        cut = lambda s: pd.cut(s, edges, right=False, labels=False, include_lowest=True)  # noqa: E731
        assert (cut(got) == cut(want)).all(), spec.name
        if spec.n_bins == spec.hi - spec.lo + 1:  # one bin per integer: exact
            assert (got == want).all(), spec.name
    # The zero bins and the top code of capital-gain are exact too.
    for name in ("capital-gain", "capital-loss"):
        assert ((back[name] == 0) == (adult[name] == 0)).all()
    assert ((back["capital-gain"] == 99999) == (adult["capital-gain"] == 99999)).all()
    # Decoding is a fixed point: re-encoding the decoded rows gives the same tokens.
    assert torch.equal(codec.encode(back).tokens, enc.tokens)


def test_missing_values_and_dtypes_round_trip() -> None:
    schema = _missing_schema()
    codec = TabularCodec(schema, bos=True)
    df = _missing_frame()
    enc = codec.encode(df)
    assert enc.tokens.shape == (4, 13) and (enc.tokens[:, 0] == BOS_ID).all()
    back = codec.decode(enc.tokens)
    assert back["pet"].tolist()[0] == "cat" and pd.isna(back["pet"][1])
    assert back["n"].dtype == np.float64 and np.isnan(back["n"][2]) and back["n"][1] == 9.0
    assert back["x"].tolist() == [-0.75, 0.25, 0.75, -0.25]  # bin centres
    assert back["flag"].tolist() == [True, False, False, True]
    no_missing = codec.decode(enc.tokens[[0, 1, 3]])
    assert no_missing["n"].dtype == np.int64


def test_encode_refuses_rows_outside_the_schema(codec: TabularCodec, adult: pd.DataFrame) -> None:
    df = adult.head(10).copy()
    df.loc[2, "age"] = 3
    with pytest.raises(SchemaError, match="'age'"):
        codec.encode(df)
    with pytest.raises(SchemaError, match="augmentations"):
        codec.encode(adult.head(2), augmentations=0)


# -- layout, permutations, augmentation ----------------------------------------------------------------------

def test_layout_and_labels(codec: TabularCodec, adult: pd.DataFrame) -> None:
    enc = codec.encode(adult.head(30))
    d = codec.n_columns
    tokens, labels = enc.tokens.numpy(), enc.labels.numpy()
    assert (tokens[:, 0::3] == codec.prompt_ids).all() and (tokens[:, 2::3] == codec.end_ids).all()
    assert (labels[:, 0::3] == IGNORE_INDEX).all()
    assert (labels[:, 1::3] == tokens[:, 1::3]).all() and (labels[:, 2::3] == tokens[:, 2::3]).all()
    assert codec.vocab_size == 1 + 2 * d + sum(s.n_values for s in codec.schema)
    with_bos = TabularCodec(codec.schema, bos=True).encode(adult.head(3))
    assert with_bos.tokens.shape[1] == 3 * d + 1 and (with_bos.labels[:, 0] == IGNORE_INDEX).all()
    assert torch.equal(with_bos.tokens[:, 1:], enc.tokens[:3])


def test_permuted_augmented_sequences_decode_to_their_row(codec: TabularCodec, adult: pd.DataFrame) -> None:
    rows = adult.sample(500, random_state=0).reset_index(drop=True)
    k = 3
    enc = codec.encode(rows, order="random", augmentations=k, rng=np.random.default_rng(1))
    assert enc.tokens.shape == (500 * k, 45)
    assert enc.example_ids.tolist() == np.repeat(np.arange(500), k).tolist()
    orders = enc.orders.numpy()
    assert (np.sort(orders, axis=1) == np.arange(15)).all()
    copies = orders.reshape(500, k, 15)
    assert (copies[:, 0] != copies[:, 1]).any(axis=1).mean() > 0.99  # the K copies differ in order
    assert (orders[:, 0] == 0).mean() < 0.2  # not schema order
    plain = codec.decode(codec.encode(rows).tokens)
    back = codec.decode(enc.tokens)
    expected = plain.iloc[enc.example_ids.numpy()].reset_index(drop=True)
    pd.testing.assert_frame_equal(back, expected)
    fixed = list(reversed(codec.columns))
    rev = codec.encode(rows.head(5), order=fixed)
    assert (rev.orders.numpy() == np.arange(14, -1, -1)).all()
    pd.testing.assert_frame_equal(codec.decode(rev.tokens), plain.head(5))
    with pytest.raises(SchemaError, match="every column"):
        codec.encode(rows.head(2), order=fixed[:-1])


# -- masks --------------------------------------------------------------------------------------------------

def test_masks_allow_exactly_the_columns_tokens() -> None:
    schema = Schema(adult_schema().columns[:4] + _missing_schema().columns)
    codec = TabularCodec(schema)
    union = torch.zeros(codec.vocab_size, dtype=torch.bool)
    for j, spec in enumerate(schema):
        # Oracle: every value of the column's domain, encoded (other columns fixed at their first value).
        domain = spec.values()
        frame = pd.DataFrame({s.name: [s.values()[0]] * len(domain) for s in schema})
        frame[spec.name] = domain
        tokens = codec.encode(frame).tokens[:, 3 * j + 1]
        expected = torch.zeros(codec.vocab_size, dtype=torch.bool)
        expected[tokens] = True
        assert len(set(tokens.tolist())) == spec.n_values
        assert torch.equal(codec.allowed_mask(spec.name), expected), spec.name
        assert not (union & expected).any()  # no token shared between columns
        union |= expected
    union[torch.as_tensor(codec.prompt_ids)] = True
    union[torch.as_tensor(codec.end_ids)] = True
    union[BOS_ID] = True
    assert union.all()
    with pytest.raises(SchemaError, match="no column"):
        codec.allowed_mask("salary")


def test_mask_ids_allow_every_encoded_token_and_pin_end_tokens(
    codec: TabularCodec, adult: pd.DataFrame
) -> None:
    enc = codec.encode(adult.head(300), order="random", rng=np.random.default_rng(2))
    table = codec.mask_table()
    allowed = table[enc.mask_ids]  # M T V
    assert allowed.gather(-1, enc.tokens[..., None]).all()
    ends = allowed[:, 2::3]
    assert (ends.sum(-1) == 1).all()  # an end token is the only choice after a value
    assert (enc.mask_ids[:, 0::3] == 0).all()


# -- likelihood ---------------------------------------------------------------------------------------------

def test_constrained_log_likelihood_matches_a_per_position_loop() -> None:
    schema = _missing_schema()
    codec = TabularCodec(schema)
    enc = codec.encode(_missing_frame(), order="random", rng=np.random.default_rng(3))
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(len(enc), codec.seq_len, codec.vocab_size, generator=gen)
    got = codec.token_log_probs(logits, enc)
    free = codec.token_log_probs(logits, enc, constrained=False)
    for m in range(len(enc)):
        order = enc.orders[m].tolist()
        total = 0.0
        for slot, col in enumerate(order):
            t = 3 * slot + 1  # the value token; logits at t-1 (the prompt) predict it
            allowed = codec.allowed_mask(schema.names[col])
            lp = torch.log_softmax(logits[m, t - 1][allowed], dim=-1)
            value_rank = int(allowed[: enc.tokens[m, t]].sum())
            assert got[m, t] == pytest.approx(float(lp[value_rank]), abs=1e-5)
            assert got[m, t + 1] == 0.0  # the end token is forced
            plain = torch.log_softmax(logits[m, t - 1], -1)[enc.tokens[m, t]]
            assert free[m, t] == pytest.approx(float(plain), abs=1e-5)
            total += float(lp[value_rank])
        assert got[m, 0::3].abs().sum() == 0  # prompts are never predicted
        assert codec.sequence_log_likelihood(logits, enc)[m] == pytest.approx(total, abs=1e-4)



@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_value_log_likelihood_is_the_codecs_likelihood_of_the_full_logits(temperature: float) -> None:
    """The training objective's fast path (output head at the prompt positions only) against the codec's
    likelihood of the model's logits at every position, divided by the sampling temperature."""
    from tramontane.synth.synthesizer import value_log_likelihood

    schema = _missing_schema()
    codec = TabularCodec(schema)
    enc = codec.encode(_missing_frame(), order="random", rng=np.random.default_rng(5))
    model = random_model(tiny_args(sliding_window=None, vocab_size=codec.vocab_size))
    with torch.no_grad():
        want = codec.sequence_log_likelihood(model(enc.tokens) / temperature, enc)
        got = value_log_likelihood(model, codec, enc, temperature)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    if temperature != 1.0:  # and the temperature is applied, not ignored
        assert not torch.allclose(got, value_log_likelihood(model, codec, enc), atol=1e-3)

# -- decoding errors ----------------------------------------------------------------------------------------

def test_malformed_sequences_are_flagged(codec: TabularCodec, adult: pd.DataFrame) -> None:
    good = codec.encode(adult.head(1)).tokens[0]
    bad = good.repeat(5, 1)
    bad[1, 1] = int(codec.value_offsets[1])  # a workclass value in the age slot
    bad[2, 3] = int(codec.prompt_ids[0])  # age twice, workclass never
    bad[3, 2] = int(codec.end_ids[1])  # wrong end token
    bad[4, 4] = codec.vocab_size + 3  # out of the vocabulary
    assert codec.is_valid(torch.cat([good[None], bad[1:]])).tolist() == [True, False, False, False, False]
    with pytest.raises(DataError, match=r"4 token sequence\(s\)"):
        codec.decode(bad[1:])
    with pytest.raises(DataError, match="shape"):
        codec.decode(good[None, :-1])
    assert codec.token_name(int(good[1])) == "age=39" and codec.token_name(int(good[0])) == "<age>"


# -- sampling -----------------------------------------------------------------------------------------------

def _model_for(codec: TabularCodec, extra_vocab: int = 0, seed: int = 0, window: int | None = 8):
    args = tiny_args(vocab_size=codec.vocab_size + extra_vocab, sliding_window=window)
    return random_model(args, seed=seed)


def _greedy_by_recompute(model, codec: TabularCodec, order: list[int]) -> list[int]:
    """Oracle: run the whole prefix through the model without a cache for every value."""
    table = codec.mask_table()
    seq = [BOS_ID] if codec.bos else []
    for col in order:
        seq.append(int(codec.prompt_ids[col]))
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1].float()
        mask = torch.zeros(logits.shape[0], dtype=torch.bool)
        mask[: codec.vocab_size] = table[1 + col]
        seq += [int(logits.masked_fill(~mask, float("-inf")).argmax()), int(codec.end_ids[col])]
    return seq


@pytest.mark.parametrize("bos", [False, True])
def test_greedy_cached_sampling_equals_full_recompute(bos: bool) -> None:
    codec = TabularCodec(_missing_schema(), bos=bos)
    model = _model_for(codec, extra_vocab=5, seed=1, window=5)  # window < sequence: the cache rolls
    tokens = sample_tokens(model, codec, 6, order="random", temperature=0.0, seed=0)
    for row in tokens:
        order = [int(codec._prompt_col[t]) for t in row[int(bos)::3]]
        assert row.tolist() == _greedy_by_recompute(model, codec, order)


def test_random_model_samples_only_valid_rows_reproducibly(codec: TabularCodec) -> None:
    model = _model_for(codec, extra_vocab=7, seed=2)  # padding tokens must never come out
    rows = sample_rows(model, codec, 96, order="random", seed=5, batch_size=40)
    assert len(rows) == 96 and list(rows.columns) == codec.columns
    codec.schema.validate(rows)  # 100% valid
    again = sample_rows(model, codec, 96, order="random", seed=5, batch_size=40)
    pd.testing.assert_frame_equal(rows, again)
    other = sample_rows(model, codec, 96, order="random", seed=6, batch_size=40)
    assert not rows.equals(other)
    tokens = sample_tokens(model, codec, 64, seed=7, temperature=1.3, top_p=0.9)
    assert codec.is_valid(tokens).all() and int(tokens.max()) < codec.vocab_size
    assert (tokens[:, 0::3] == torch.as_tensor(codec.prompt_ids)).all()  # schema order by default
    gen = torch.Generator().manual_seed(8)
    assert len(sample_rows(model, codec, 3, generator=gen)) == 3
    with pytest.raises(GenerationError, match="vocabulary"):
        sample_tokens(_model_for(TabularCodec(_missing_schema())), codec, 2)


def test_sampled_values_follow_the_restricted_softmax() -> None:
    """With a single column, rows are iid draws from softmax(logits restricted to the column's values)."""
    schema = Schema((ColumnSpec.categorical("c", ["a", "b", "c", "d"]),))
    codec = TabularCodec(schema)
    model = _model_for(codec, extra_vocab=20, seed=3)
    with torch.no_grad():
        logits = model(torch.tensor([[int(codec.prompt_ids[0])]]))[0, -1]
    allowed = codec.allowed_mask("c")
    probs = torch.softmax(logits[: codec.vocab_size][allowed] / 0.5, dim=-1)
    rows = sample_rows(model, codec, 4000, temperature=0.5, seed=9)
    freq = rows["c"].value_counts(normalize=True).reindex(["a", "b", "c", "d"], fill_value=0.0).to_numpy()
    assert np.abs(freq - probs.numpy()).max() < 0.03
