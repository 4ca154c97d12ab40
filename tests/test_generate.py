"""Generation: exact semantics on small table-driven models, then the real Transformer and the CLI."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from xlab import generate as gen
from xlab.commands import generate as cli
from xlab.commands import predict as cli_pred
from xlab.config import SEED_MAX
from xlab.errors import XLabError
from xlab.generate import predict as pred
from xlab.generate import search

EOS = 2


# ----------------------------------------------------------------------------------- stand-ins
class Bigram:
    """A model whose next-token logits depend only on the last token: logits[b, t] = table[ids[b, t]].

    Records the shape of every forward call."""

    def __init__(self, table: torch.Tensor):
        self.table = table.float()
        self.calls = []

    def __call__(self, ids):
        self.calls.append(tuple(ids.shape))
        return self.table[ids]


class FakeCache:
    def __init__(self, batch_size, capacity):
        self.batch_size, self.capacity, self.length = batch_size, capacity, 0

    def reorder(self, index):
        self.batch_size = len(index)


class CachedBigram(Bigram):
    """:class:`Bigram` with a KV-cache interface that checks batch size and capacity like the real one."""

    def __init__(self, table, max_len=1000):
        super().__init__(table)
        self.max_len = max_len

    def new_cache(self, batch_size, device=None, dtype=None):
        return FakeCache(batch_size, self.max_len)

    def __call__(self, ids, cache=None):
        if cache is not None:
            assert ids.shape[0] == cache.batch_size
            cache.length += ids.shape[1]
            if cache.length > cache.capacity:
                raise ValueError("cache overflow")
        return super().__call__(ids)


class Position:
    """Next token = (number of tokens the model sees up to and including this one) mod V, one-hot.

    The generated ids therefore spell out the visible context length at each step."""

    def __init__(self, vocab=64):
        self.vocab = vocab

    def _logits(self, lengths):  # lengths (B, T) -> (B, T, V)
        return 10.0 * torch.nn.functional.one_hot(lengths % self.vocab, self.vocab).float()

    def __call__(self, ids):
        B, T = ids.shape
        return self._logits(torch.arange(1, T + 1).expand(B, T))


class CachedPosition(Position):
    def __init__(self, vocab=64, max_len=1000):
        super().__init__(vocab)
        self.max_len = max_len

    def new_cache(self, batch_size, device=None, dtype=None):
        return FakeCache(batch_size, self.max_len)

    def __call__(self, ids, cache=None):
        if cache is None:
            return super().__call__(ids)
        B, T = ids.shape
        start = cache.length
        cache.length += T
        if cache.length > cache.capacity:
            raise ValueError("cache overflow")
        return self._logits(torch.arange(start + 1, start + T + 1).expand(B, T))


def random_table(vocab, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, vocab, generator=g) * scale


def chain_table(vocab, eos=EOS, end=7):
    """Deterministic chain: after token i comes i + 1 (wrapping past the specials), after `end` eos."""
    t = torch.full((vocab, vocab), -5.0)
    for i in range(vocab):
        nxt = eos if i == end else (i + 1 if i + 1 < vocab else 4)
        if nxt == EOS and i != end:
            nxt = 4
        t[i, nxt] = 5.0
    return t


class CharTokenizer:
    """Character tokenizer: 0 pad, 1 sos, 2 eos, 3 unk, then one id per character of ALPHABET."""

    ALPHABET = "abcdefghijklmnop ."
    pad_id, sos_id, eos_id, unk_id = 0, 1, 2, 3
    sha256 = "fake"

    @property
    def vocab_size(self):
        return 4 + len(self.ALPHABET)

    def encode(self, s):
        return [4 + self.ALPHABET.index(c) for c in s]

    def decode(self, ids):
        return "".join(self.ALPHABET[i - 4] for i in ids if i >= 4)

    def incremental_decoder(self):
        tok = self

        class Dec:
            def push(self, i):
                return tok.decode([i])

            def flush(self):
                return ""

        return Dec()


# ----------------------------------------------------------------------------------- filtering
def test_top_p_keeps_the_crossing_token():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(gen.filter_logits(logits, top_p=p))[0].tolist()
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.4) == [True, False, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    # Order in the vocabulary does not matter, only probability.
    shuffled = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    assert torch.isfinite(gen.filter_logits(shuffled, top_p=0.6))[0].tolist() == [False, True, False, True]


def test_top_k():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0]])
    kept = lambda k: torch.isfinite(gen.filter_logits(logits, top_k=k))[0].tolist()
    assert kept(1) == [False, True, False, False, False]  # exactly k, ties to the lower id
    assert kept(3) == [False, True, True, False, True]
    assert kept(0) == kept(None) == kept(5) == kept(100) == [True] * 5
    ties = torch.tensor([[3.0, 1.0, 3.0, 3.0, float("-inf")]])
    assert torch.isfinite(gen.filter_logits(ties, top_k=2))[0].tolist() == [True, False, True, False, False]
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    mask = torch.isfinite(gen.filter_logits(x, top_k=7))
    assert mask.sum(-1).tolist() == [7, 7, 7]
    assert all(set(mask[b].nonzero().view(-1).tolist()) == set(x[b].topk(7).indices.tolist()) for b in range(3))
    # top-k then top-p on the renormalised top-k probabilities: [3, 3, 2] -> 0.42, 0.42, 0.16
    assert torch.isfinite(gen.filter_logits(logits, top_k=3, top_p=0.5))[0].tolist() == [
        False,
        True,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.01),
        dict(top_p=-0.5),
        dict(num_samples=0),
    ],
)
def test_bad_sampling_values_raise(kwargs):
    with pytest.raises(ValueError):
        gen.sample(Bigram(random_table(8, 0)), [1], 3, **kwargs)


def test_bad_common_values_raise():
    m = Bigram(random_table(8, 0))
    with pytest.raises(ValueError):
        gen.greedy_search(m, [], 3)
    with pytest.raises(ValueError):
        gen.greedy_search(m, [1], -1)
    with pytest.raises(ValueError):
        gen.beam_search(m, [1], 3, beam_width=0)
    with pytest.raises(ValueError):
        gen.beam_search(m, [1], 3, length_penalty=float("inf"))


def test_inverse_cdf_picks_exact_buckets_and_never_a_zero_probability_token():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).expand(4, 4)
    u = torch.tensor([0.25, 0.6, 0.9, 0.99], dtype=torch.float64)
    assert search._inverse_cdf(probs, u).tolist() == [0, 1, 2, 3]
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0]]).expand(3, 4)
    u = torch.tensor([0.0, 0.5, 1.0 - 1e-12], dtype=torch.float64)
    assert search._inverse_cdf(probs, u).tolist() == [1, 2, 2]


def test_sampling_frequencies_follow_the_filtered_distribution():
    table = torch.zeros(6, 6)
    table[:, :4] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    table[:, 4:] = float("-inf")
    out = gen.sample(Bigram(table), [0], 2000, seed=3)[0]
    freq = np.bincount(out, minlength=6) / len(out)
    assert np.allclose(freq[:4], [0.5, 0.3, 0.15, 0.05], atol=0.03) and freq[4:].sum() == 0
    out = gen.sample(Bigram(table), [0], 500, top_p=0.6, seed=3)[0]
    assert set(out) == {0, 1}
    out = gen.sample(Bigram(table), [0], 500, temperature=0.5, seed=3)[0]
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert abs(out.count(0) / 500 - (p / p.sum())[0].item()) < 0.05


# ----------------------------------------------------------------------------- greedy, sampling
@pytest.mark.parametrize("model_cls", [Bigram, CachedBigram])
def test_greedy_exact_tokens_and_eos_stop(model_cls):
    m = model_cls(chain_table(10))
    assert gen.greedy_search(m, [1, 4], 10, eos_id=EOS) == [5, 6, 7]  # 7 -> eos, eos not returned
    assert gen.greedy_search(m, [1, 4], 2, eos_id=EOS) == [5, 6]
    assert gen.greedy_search(m, [1, 4], 5) == [5, 6, 7, 2, 3]  # no eos_id: 2 is an ordinary token
    assert gen.greedy_search(m, [1, 4], 0, eos_id=EOS) == []


def test_eos_stops_whatever_the_filtering():
    m = Bigram(chain_table(10))
    for kw in (dict(top_k=1), dict(top_p=0.3), dict(temperature=0.2), dict(temperature=5.0, top_k=1)):
        assert gen.sample(m, [6], 10, eos_id=EOS, seed=0, **kw)[0] == [7], kw
    got = []
    gen.sample(m, [6], 10, eos_id=EOS, top_k=1, on_token=lambda r, t: got.append((r, t)))
    assert got == [(0, 7)]


def test_temperature_zero_is_greedy():
    m = CachedBigram(random_table(12, 1))
    g = gen.greedy_search(m, [1], 20)
    assert gen.sample(m, [1], 20, temperature=0.0, num_samples=2, seed=5) == [g, g]


def test_same_seed_same_tokens_and_samples_independent_of_batch():
    m = CachedBigram(random_table(16, 2, scale=1.0))
    a = gen.sample(m, [1, 5], 30, seed=7, num_samples=3, top_k=8, top_p=0.95, eos_id=EOS)
    b = gen.sample(m, [1, 5], 30, seed=7, num_samples=3, top_k=8, top_p=0.95, eos_id=EOS)
    assert a == b
    assert len({tuple(x) for x in a}) == 3  # the three samples differ
    for i in range(3):  # sample i is the seed + i sample, alone or in a batch
        assert gen.sample(m, [1, 5], 30, seed=7 + i, top_k=8, top_p=0.95, eos_id=EOS)[0] == a[i]
    # cache or not: same draws
    assert gen.sample(Bigram(m.table), [1, 5], 30, seed=7, num_samples=3, top_k=8, top_p=0.95, eos_id=EOS) == a


def test_finished_rows_leave_the_batch():
    table = random_table(10, 4, scale=0.5)
    table[:, EOS] = -1.0  # eos likely enough that some samples end early
    m = CachedBigram(table)
    outs = gen.sample(m, [1], 40, seed=0, num_samples=6, eos_id=EOS)
    lengths = sorted(len(o) for o in outs)
    assert lengths[0] < 40 and EOS not in sum(outs, [])
    batch_sizes = [s[0] for s in m.calls]
    assert batch_sizes[0] == 6 and batch_sizes[-1] < 6 and batch_sizes == sorted(batch_sizes, reverse=True)


# ------------------------------------------------------------------------------------- sliding
@pytest.mark.parametrize("model", [Position(), CachedPosition(max_len=6)])
def test_context_slides_to_the_last_half_window(model):
    # max_len 6, keep 3: visible lengths 2, 3, 4, 5, 6, then the 7th token slides to 3, ...
    assert gen.greedy_search(model, [1, 9], 10, max_len=6) == [2, 3, 4, 5, 6, 3, 4, 5, 6, 3]
    # a prompt longer than max_len keeps its last max_len tokens
    assert gen.greedy_search(model, list(range(1, 11)), 6, max_len=6) == [6, 3, 4, 5, 6, 3]
    # odd max_len: keep max_len // 2 = 2
    assert gen.greedy_search(model, [1], 8, max_len=5) == [1, 2, 3, 4, 5, 2, 3, 4]
    assert gen.greedy_search(model, [1], 4, max_len=1) == [1, 1, 1, 1]


def test_sliding_uses_the_model_cfg_max_len():
    class WithCfg(CachedPosition):
        class cfg:
            max_len = 4

    assert gen.greedy_search(WithCfg(max_len=4), [1], 6) == [1, 2, 3, 4, 2, 3]
    hyp = gen.beam_search(WithCfg(max_len=4), [1], 6, beam_width=3)[0]
    assert hyp.tokens == [1, 2, 3, 4, 2, 3]


# ---------------------------------------------------------------------------------- beam search
def known_table():
    """Greedy picks 1 (p .55) and wanders; 3 (p .45) is followed by eos with p .99."""
    p = torch.full((6, 6), 1e-6)
    p[0, 1], p[0, 3] = 0.55, 0.45
    p[1, 0], p[1, 1], p[1, 3], p[1, EOS] = 0.35, 0.33, 0.31, 0.01
    p[3, EOS] = 0.99
    p[2, 4] = p[4, 4] = p[5, 4] = 1.0
    return (p / p.sum(-1, keepdim=True)).log()


@pytest.mark.parametrize("model_cls", [Bigram, CachedBigram])
def test_beam_finds_the_better_hypothesis_that_greedy_misses(model_cls):
    m = model_cls(known_table())
    assert gen.greedy_search(m, [0], 3, eos_id=EOS) == [1, 0, 1]
    lp = known_table()
    hyps = gen.beam_search(m, [0], 3, beam_width=2, eos_id=EOS, length_penalty=1.0)
    best = hyps[0]
    assert best.tokens == [3] and best.ended
    assert best.logprob == pytest.approx((lp[0, 3] + lp[3, EOS]).item(), abs=1e-5)
    assert best.score == pytest.approx(best.logprob / 2, abs=1e-6)
    # a greedy-like hypothesis scores worse: ln .55 + ln .35 + ln .55 over 3 tokens
    assert best.score > (lp[0, 1] + lp[1, 0] + lp[0, 1]).item() / 3


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("model_cls", [Bigram, CachedBigram])
def test_beam_width_one_is_greedy(seed, model_cls):
    table = random_table(9, seed, scale=1.5)
    m = model_cls(table)
    for eos in (EOS, None):
        g = gen.greedy_search(m, [1, 3], 25, eos_id=eos)
        for lp in (0.0, 1.0, 2.0):
            assert gen.beam_search(m, [1, 3], 25, beam_width=1, eos_id=eos, length_penalty=lp)[0].tokens == g


def brute_force_best(table, prompt_last, max_new, eos, alpha):
    """Best score over every continuation of up to max_new tokens (ended by eos or cut at max_new)."""
    lp = torch.log_softmax(table.double(), -1)
    best = -math.inf
    vocab = table.shape[0]
    for m in range(1, max_new + 1):
        for seq in itertools.product(range(vocab), repeat=m):
            if eos in seq[:-1]:
                continue
            if seq[-1] != eos and m < max_new:
                continue  # a continuation ends with eos or at max_new
            s, prev = 0.0, prompt_last
            for t in seq:
                s, prev = s + lp[prev, t].item(), t
            best = max(best, s / m**alpha)
    return best


@pytest.mark.parametrize("alpha", [-2.0, -1.0, -0.5, 0.0, 0.7, 1.0, 2.5])
def test_exhaustive_beam_is_optimal_so_the_stopping_bound_is_sound(alpha):
    # With a beam as wide as every candidate, beam search is exact search: it can only miss the
    # optimum by stopping too early, which a bound that ignores future length would do (for
    # alpha > 0 dividing by the current length, for alpha < 0 by max_new_tokens; both fail here).
    for seed in range(30):
        table = random_table(4, 100 + seed, scale=2.0)
        table[:, EOS] += 1.0
        hyps = gen.beam_search(Bigram(table), [1], 4, beam_width=128, eos_id=EOS, length_penalty=alpha)
        assert hyps[0].score == pytest.approx(brute_force_best(table, 1, 4, EOS, alpha), abs=1e-9)
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_beam_runs_one_batched_forward_per_step():
    m = CachedBigram(random_table(20, 9, scale=0.5))
    hyps = gen.beam_search(m, [1, 5, 6], 12, beam_width=4, eos_id=None)
    assert m.calls[0] == (1, 3)  # the prompt, once
    assert m.calls[1:] == [(4, 1)] * 11  # then one forward over all 4 beams per new token
    assert len(hyps) == 4 and all(len(h.tokens) == 12 and not h.ended for h in hyps)
    m0 = Bigram(m.table)  # without a cache: the whole context of every beam, still one call per step
    assert gen.beam_search(m0, [1, 5, 6], 12, beam_width=4)[0].tokens == hyps[0].tokens
    assert m0.calls[1:] == [(4, 3 + n) for n in range(1, 12)]


def test_beam_max_new_tokens_zero():
    assert gen.beam_search(Bigram(random_table(5, 0)), [1], 0)[0].tokens == []


# ----------------------------------------------------------------------------------- text level
def test_generate_decodes_the_whole_sequence_and_streams_the_same_text():
    tok = CharTokenizer()
    m = CachedBigram(random_table(tok.vocab_size, 11, scale=1.0))
    for kw in (dict(), dict(greedy=True), dict(beam_width=3), dict(top_k=5, top_p=0.9, temperature=0.8)):
        pieces = []
        text = gen.generate(m, tok, "ab c", max_new_tokens=12, seed=3, on_text=pieces.append, **kw)
        assert text.startswith("ab c") and "".join(pieces) == text
        assert text == gen.generate(m, tok, "ab c", max_new_tokens=12, seed=3, **kw)
    new = gen.greedy_search(m, [1] + tok.encode("ab c"), 12, eos_id=EOS)
    assert gen.generate(m, tok, "ab c", max_new_tokens=12, greedy=True) == "ab c" + tok.decode(new)
    new = gen.greedy_search(m, tok.encode("ab c"), 12, eos_id=EOS)
    assert gen.generate(m, tok, "ab c", max_new_tokens=12, greedy=True, add_sos=False) == "ab c" + tok.decode(new)
    with pytest.raises(ValueError):
        gen.generate(m, tok, "", add_sos=False)


@pytest.fixture
def fake_checkpoint(monkeypatch):
    tok = CharTokenizer()
    model = CachedBigram(random_table(tok.vocab_size, 12, scale=1.0))
    monkeypatch.setattr(cli, "load_for_cli", lambda checkpoint, device: (model, None, tok, {}))
    return model, tok


CLI_DEFAULTS = dict(
    max_new_tokens=15,
    temperature=1.0,
    top_k=None,
    top_p=1.0,
    greedy=False,
    beam_width=1,
    length_penalty=1.0,
    num_samples=1,
    seed=42,
    add_sos=True,
    device="cpu",
    stream=False,
)


@pytest.mark.parametrize("opts", [dict(), dict(num_samples=3, top_k=6), dict(greedy=True), dict(beam_width=3)])
def test_cli_stream_prints_what_non_stream_prints(fake_checkpoint, capsys, opts):
    kw = {**CLI_DEFAULTS, **opts}
    texts = cli.cli_generate("ckpt.pt", "abc", **kw)
    plain = capsys.readouterr().out
    assert cli.cli_generate("ckpt.pt", "abc", **{**kw, "stream": True}) == texts
    assert capsys.readouterr().out == plain
    n = kw["num_samples"]
    assert len(texts) == n and all(t.startswith("abc") for t in texts)
    assert plain.count("--- sample") == (n if n > 1 else 0)


@pytest.mark.parametrize(
    "opts",
    [
        dict(temperature=-1.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(beam_width=0),
        dict(num_samples=0),
        dict(num_samples=2, greedy=True),
        dict(num_samples=2, beam_width=2),
        dict(max_new_tokens=-1),
        dict(greedy=True, beam_width=3),
        dict(device="tpu"),
        dict(add_sos=False),
        dict(beam_width=10_000),  # more beams than ids: ran for minutes instead of a refusal
    ],
)
def test_cli_bad_values_are_one_line_errors(fake_checkpoint, opts):
    with pytest.raises(XLabError) as e:
        cli.cli_generate("ckpt.pt", "" if "add_sos" in opts else "abc", **{**CLI_DEFAULTS, **opts})
    assert "\n" not in str(e.value)


def test_device_resolution():
    from xlab.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu0", "mps"):
        with pytest.raises(XLabError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(XLabError):
            resolve_device("cuda")


# -------------------------------------------------------------------------------------- predict
class FakeStore:
    """The shard-store rows of the given articles (<sos> t1..tn <eos>, windows of seq_len + 1)."""

    pad_id, sos_id, eos_id = 0, 1, 2

    def __init__(self, articles, seq_len=4):
        rows = []
        for art in articles:
            toks = [1] + art + [2]
            for k in range(math.ceil((len(art) + 1) / seq_len)):
                w = toks[k * seq_len : k * seq_len + seq_len + 1]
                rows.append(w + [0] * (seq_len + 1 - len(w)))
        self.data = np.array(rows, dtype=np.uint16)
        self.splits = ["predict"]

    def rows(self, split):
        return len(self.data)

    def read_rows(self, split, indices):
        return self.data[indices]


def test_predict_articles_reassembles_articles_across_rows():
    arts = [[4, 5], [6, 7, 8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18], [5] * 8]
    store = FakeStore(arts, seq_len=4)
    found, skipped = pred.predict_articles(store, 10, 3, chunk_rows=2)
    assert [a["tokens"] for a in found] == arts[1:] and skipped == 1
    assert [a["index"] for a in found] == [1, 2, 3] and [a["row"] for a in found] == [1, 4, 6]
    found, _ = pred.predict_articles(store, 2, 1, chunk_rows=3)
    assert [a["tokens"] for a in found] == arts[:2]


def test_predict_records_and_reference_loss():
    tok = CharTokenizer()
    table = random_table(tok.vocab_size, 13, scale=1.0)
    m = CachedBigram(table)
    arts = [tok.encode("abcdefgh"), tok.encode("ab"), tok.encode("hello bb"), tok.encode("pa ma.")]
    recs, skipped = pred.predict(
        m, tok, FakeStore(arts, seq_len=3), num_articles=5, prompt_tokens=3, max_new_tokens=4, greedy=True
    )
    assert skipped == 1 and [r["index"] for r in recs] == [0, 2, 3]
    r = recs[0]
    assert (r["prompt"], r["reference"], r["prompt_tokens"], r["reference_tokens"]) == ("abc", "defg", 3, 4)
    assert recs[2]["reference"] == "ma." and recs[2]["reference_tokens"] == 4  # 3 tokens + eos
    lp = torch.log_softmax(table, -1)
    ids = tok.encode("abcdefg")
    expect = -sum(lp[ids[i - 1], ids[i]].item() for i in range(3, 7)) / 4
    assert r["reference_loss"] == pytest.approx(expect, rel=1e-5)
    ids = tok.encode("pa ma.") + [EOS]
    expect = -sum(lp[ids[i - 1], ids[i]].item() for i in range(3, 7)) / 4
    assert recs[2]["reference_loss"] == pytest.approx(expect, rel=1e-5)
    new = gen.greedy_search(m, [1] + tok.encode("abc"), 4, eos_id=EOS)
    assert r["generated"] == tok.decode(new) and r["generated_tokens"] == len(new)
    json.dumps(recs)  # plain JSON values


def test_reference_nll_through_a_sliding_window_matches_generation_context():
    model = CachedPosition(vocab=16, max_len=4)
    # Position's next token is the visible length: targets that follow the window rule cost ~0.
    nll = gen.reference_nll(model, [1, 9], [2, 3, 4, 2, 3], max_len=4)
    assert max(nll) < 1e-3
    nll = gen.reference_nll(model, [1, 9], [2, 3, 4, 5], max_len=4)  # 5 contradicts the slide
    assert max(nll[:3]) < 1e-3 and nll[3] > 5


# ------------------------------------------------------------------------- the real Transformer
def tiny_transformer(seed=0, **kw):
    from xlab.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=50, max_len=12, d_model=32, n_layers=2, n_heads=4, d_ff=48), **kw})
    return Transformer(cfg).eval()


class NoCache:
    """The same model without its cache: every step recomputes the visible context."""

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg
        self.calls = 0

    def __call__(self, ids):
        self.calls += 1
        return self.model(ids)


@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope"])
def test_transformer_cache_and_recompute_agree_past_max_len(position):
    model = tiny_transformer(position=position)
    plain = NoCache(model)
    prompt = [1, 7, 8, 9, 10]
    g = gen.greedy_search(model, prompt, 40)  # max_len 12: slides five times
    assert g == gen.greedy_search(plain, prompt, 40) and len(g) == 40
    s = gen.sample(model, prompt, 30, seed=4, num_samples=2, top_k=20)
    assert s == gen.sample(plain, prompt, 30, seed=4, num_samples=2, top_k=20)
    b = gen.beam_search(model, prompt, 20, beam_width=3, eos_id=2)
    assert [h.tokens for h in b] == [h.tokens for h in gen.beam_search(plain, prompt, 20, beam_width=3, eos_id=2)]
    assert gen.beam_search(model, prompt, 20, beam_width=1)[0].tokens == gen.greedy_search(model, prompt, 20)


def test_transformer_reference_nll_matches_one_forward():
    model = tiny_transformer(max_len=64)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    expect = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0, 2:], ids[0, 3:], reduction="none")
    assert gen.reference_nll(model, [1, 5, 6], [7, 8, 9, 10, 11]) == pytest.approx(expect.tolist(), rel=1e-5)
    # past max_len the window rule applies: cached stepping, same numbers with or without the cache
    small = tiny_transformer(max_len=4)
    a = gen.reference_nll(small, [1, 5, 6], [7, 8, 9, 10, 11])
    assert a == pytest.approx(gen.reference_nll(NoCache(small), [1, 5, 6], [7, 8, 9, 10, 11]), rel=1e-4)


# ------------------------------------------------------------- real tokenizer, store, checkpoint
def made_up_texts(n, seed):
    import random

    rng = random.Random(seed)
    words = ["ka", "lo", "rith", "the", "an", "mus", "ter", "ion", "pa", "veld", "storm", "or", "é"]
    return [" ".join(rng.choices(words, k=rng.randint(12, 40))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    """A random tiny model saved as a training checkpoint, with a real tokenizer and predict store."""
    from xlab.checkpoint import save_checkpoint, tokenizer_bytes_tensor
    from xlab.config import ModelConfig, load_config, to_dict
    from xlab.model import Transformer
    from xlab.store import TokenizerEntry, write_store
    from xlab.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("gen")
    tok = Tokenizer.train(made_up_texts(200, 1), 320, root / "tok.model", seed=1, num_threads=1)
    store = root / "store"
    write_store(store, {"predict": tok.encode(made_up_texts(6, 2))}, seq_len=16, tokenizer=TokenizerEntry.of(tok))
    cfg = load_config(
        [],
        [
            "model.d_model=32",
            "model.n_layers=1",
            "model.n_heads=2",
            "model.d_ff=64",
            "generate.top_k=10",
        ],
        use_defaults_file=False,
    )
    torch.manual_seed(0)
    model = Transformer(ModelConfig.of(cfg.model, vocab_size=tok.vocab_size, max_len=16))
    path = root / "last.pt"
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "config": to_dict(cfg),
            "model_config": model.cfg.to_dict(),
            "step": 0,
            "shards": str(store),
            "tokenizer": tokenizer_bytes_tensor(tok.to_bytes()),
            "tokenizer_sha256": tok.sha256,
        },
    )
    return path, tok, store


def test_cli_generate_with_a_real_checkpoint(real_checkpoint, capsys):
    path, tok, _ = real_checkpoint
    kw = {**CLI_DEFAULTS, "max_new_tokens": 30, "num_samples": 2}
    texts = cli.cli_generate(path, "the storm", **kw)
    out = capsys.readouterr().out
    assert cli.cli_generate(path, "the storm", **{**kw, "stream": True}) == texts
    assert capsys.readouterr().out == out
    assert all(t.startswith("the storm") for t in texts) and texts[0] != texts[1]
    assert cli.cli_generate(path, "the storm", **kw) == texts  # same seed, same text
    capsys.readouterr()
    with pytest.raises(XLabError):
        cli.cli_generate(path.parent / "missing.pt", "x", **kw)


def test_cli_predict_writes_jsonl(real_checkpoint, tmp_path, capsys):
    path, tok, store = real_checkpoint
    out = tmp_path / "pred.jsonl"
    summary = cli_pred.cli_predict(
        path,
        out=out,
        num_articles=4,
        prompt_tokens=5,
        max_new_tokens=6,
        shards_dir=None,
        greedy=True,
        seed=1,
        device="cpu",
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    texts = made_up_texts(6, 2)
    assert len(rows) == 4 and summary["articles"] == 4 and "reference loss" in capsys.readouterr().out
    for r, text in zip(rows, texts):
        assert set(r) == {
            "index",
            "row",
            "prompt",
            "reference",
            "generated",
            "prompt_tokens",
            "reference_tokens",
            "generated_tokens",
            "reference_loss",
        }
        ids = tok.encode(text)
        assert r["prompt"] + r["reference"] == tok.decode(ids[:11])
        assert r["prompt_tokens"] == 5 and r["reference_tokens"] == 6 and r["reference_loss"] > 0
    mean = sum(r["reference_loss"] * r["reference_tokens"] for r in rows) / sum(r["reference_tokens"] for r in rows)
    assert summary["reference_loss"] == pytest.approx(mean)
    # a random model is near uniform: about ln(vocab) nats per token
    assert abs(summary["reference_loss"] - math.log(tok.vocab_size)) < 1.0
    with pytest.raises(XLabError, match="lower --prompt-tokens"):
        cli_pred.cli_predict(
            path,
            out=out,
            num_articles=2,
            prompt_tokens=500,
            max_new_tokens=4,
            shards_dir=None,
            greedy=True,
            seed=1,
            device="cpu",
            force=True,
        )


def test_cli_predict_refuses_an_existing_output_unless_forced(real_checkpoint, tmp_path, cli):
    path, _, _ = real_checkpoint
    out = tmp_path / "pred.jsonl"
    out.write_text("an earlier run's predictions\n")
    args = [
        "predict",
        path,
        "--out",
        out,
        "-n",
        "1",
        "--prompt-tokens",
        "2",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]
    r = cli(args, cwd=tmp_path, check=False)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {out} already exists") and "--force" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert out.read_text() == "an earlier run's predictions\n"
    r = cli(["predict", path, "--out", tmp_path, "-n", "1", "--device", "cpu"], cwd=tmp_path, check=False)
    assert r.returncode == 2 and "is a folder" in r.stderr, r.stderr
    cli(args + ["--force"], cwd=tmp_path)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt_tokens"] == 2
    assert [f.name for f in tmp_path.iterdir()] == ["pred.jsonl"]  # written atomically: no temporary left


def test_a_prompt_longer_than_the_context_is_said_once(real_checkpoint, tmp_path, capsys):
    path, tok, _ = real_checkpoint  # model.max_len 16
    prompt = "the storm veld " * 8
    n = 1 + len(tok.encode(prompt))  # <sos> + the prompt
    assert n > 16
    cli.cli_generate(path, prompt, **{**CLI_DEFAULTS, "num_samples": 2, "stream": True})
    err = capsys.readouterr().err
    assert err == f"note: the prompt is {n} tokens and the model's context 16: its first {n - 16} tokens are dropped\n"
    cli.cli_generate(path, "the storm", **CLI_DEFAULTS)
    assert capsys.readouterr().err == ""
    kw = dict(num_articles=2, max_new_tokens=2, shards_dir=None, greedy=True, seed=1, device="cpu", force=True)
    cli_pred.cli_predict(path, out=tmp_path / "p.jsonl", prompt_tokens=17, **kw)
    assert capsys.readouterr().err.splitlines() == [
        "note: the prompt is 18 tokens and the model's context 16: its first 2 tokens are dropped"
    ]
    cli_pred.cli_predict(path, out=tmp_path / "p.jsonl", prompt_tokens=15, **kw)
    assert capsys.readouterr().err == ""


def test_cli_invalid_utf8_prompt_is_a_one_line_error(real_checkpoint, tmp_path):
    path, _, _ = real_checkpoint
    with pytest.raises(XLabError, match="position 2"):
        cli.cli_generate(path, "ab\udcffcd", **CLI_DEFAULTS)
    from xlab.checkpoint import load_model

    model, _, tok = load_model(path)
    with pytest.raises(XLabError, match="position 2"):  # as `xlab run --prompt` calls it
        gen.generate(model, tok, "ab\udcffcd", max_new_tokens=2)
    # As a user types it: a byte that is not UTF-8 reaches Python as a lone surrogate.
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [
            os.fsencode(sys.executable),
            b"-m",
            b"xlab",
            b"generate",
            os.fsencode(str(path)),
            b"ab\xffcd",
            b"--max-new-tokens",
            b"2",
        ],
        capture_output=True,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and r.stderr.decode().startswith("error: the prompt is not valid UTF-8"), r.stderr
    assert b"Traceback" not in r.stderr


@pytest.mark.parametrize("seed,n", [(-1, 1), (2**63, 1), (99999999999999999999, 1), (SEED_MAX + 1, 3)])
def test_cli_seed_out_of_range_is_a_one_line_error(fake_checkpoint, real_checkpoint, tmp_path, seed, n):
    """Seeds are the config's range (generate.seed <= 2**62), so seed + i stays a torch seed."""
    with pytest.raises(XLabError, match="generate.seed must be"):
        cli.cli_generate("ckpt.pt", "abc", **{**CLI_DEFAULTS, "seed": seed, "num_samples": n})
    path, _, _ = real_checkpoint
    with pytest.raises(XLabError, match="generate.seed must be"):
        cli_pred.cli_predict(
            path,
            out=tmp_path / "p.jsonl",
            num_articles=n,
            prompt_tokens=2,
            max_new_tokens=2,
            shards_dir=None,
            greedy=True,
            seed=seed,
            device="cpu",
        )
    assert cli.cli_generate("ckpt.pt", "abc", **{**CLI_DEFAULTS, "seed": SEED_MAX, "num_samples": n})


def test_beam_search_over_nan_logits_says_so():
    def nan_model(ids):
        return torch.full((ids.shape[0], ids.shape[1], 6), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        gen.beam_search(nan_model, [1], 3, beam_width=2)


# ------------------------------------------------------------------ one source for the decoding settings
@pytest.fixture
def decoding_calls(monkeypatch):
    """Run ``xlab generate`` / ``xlab predict`` in-process, recording the options that reach the
    command's work instead of doing it."""
    from typer.testing import CliRunner

    from xlab.commands import app as app_mod
    from xlab.commands import generate as gen_cmd
    from xlab.commands import predict as pred_cmd

    calls = []
    monkeypatch.setattr(gen_cmd, "cli_generate", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(pred_cmd, "cli_predict", lambda *a, **k: calls.append(k))

    def run(*args):
        r = CliRunner().invoke(app_mod.app, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return calls.pop()

    return run


def test_generate_takes_the_configuration_and_its_flags_win(decoding_calls, tmp_path):
    conf = tmp_path / "g.yaml"
    conf.write_text("generate:\n  temperature: 0.7\n  top_p: 0.9\n  max_new_tokens: 12\n")
    k = decoding_calls("generate", "x.pt", "hi", "-c", conf, "-o", "generate.temperature=0.5")
    assert (k["temperature"], k["top_p"], k["max_new_tokens"]) == (0.5, 0.9, 12)  # -o over -c over defaults
    k = decoding_calls("generate", "x.pt", "hi", "-c", conf, "-o", "generate.temperature=0.5", "--temperature", "0.3")
    assert (k["temperature"], k["top_p"]) == (0.3, 0.9)  # the flag over -o
    k = decoding_calls("predict", "x.pt", "-c", conf, "-o", "generate.top_k=7", "--max-new-tokens", "5")
    assert k["sampling"] == {"temperature": 0.7, "top_k": 7, "top_p": 0.9} and k["max_new_tokens"] == 5


def test_generate_predict_and_the_pipeline_share_their_defaults(decoding_calls):
    """Without options the three decode with the generate: section of the default configuration
    (before 0.7 the commands had their own: temperature 1.0, top-p 1.0, 100 tokens)."""
    from xlab.config import load_config

    g = load_config().generate  # what `xlab pipeline` generates with
    k = decoding_calls("generate", "x.pt", "hi")
    assert (k["temperature"], k["top_p"], k["top_k"], k["max_new_tokens"], k["seed"]) == (
        g.temperature, g.top_p, g.top_k, g.max_new_tokens, g.seed
    ) == (0.8, 0.95, None, 80, 42)  # fmt: skip
    k = decoding_calls("predict", "x.pt")
    assert k["sampling"] == {"temperature": 0.8, "top_k": None, "top_p": 0.95} and k["max_new_tokens"] == 80


def test_generate_minus_o_reaches_the_search(real_checkpoint, tmp_path, cli):
    """-o generate.temperature=0 samples at temperature 0: the greedy text."""
    path, _, _ = real_checkpoint
    args = ["generate", path, "the storm", "--device", "cpu", "--max-new-tokens", "12"]
    greedy = cli(args + ["--greedy"], cwd=tmp_path).stdout
    assert cli(args + ["-o", "generate.temperature=0"], cwd=tmp_path).stdout == greedy
    assert cli(args + ["--seed", "3"], cwd=tmp_path).stdout != greedy  # and the default samples


# ------------------------------------------------------------- length penalty over its whole range
EXTREME_ALPHAS = [-1e9, -1e6, -1000.0, -1.0, 0.0, 1e-9, 1.0, 1000.0, 1e6, 1e9]


def exact_score(logprob: float, n: int, alpha: float):
    """``logprob / n ** alpha`` in decimal arithmetic wide enough for every alpha above (2**1e9 has
    about 3e8 digits before the point: far beyond a float, well within a Decimal's exponent)."""
    from decimal import Decimal

    return Decimal(logprob) / Decimal(n) ** Decimal(alpha)


def exact_context():
    import decimal

    return decimal.localcontext(decimal.Context(prec=60, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN))


@pytest.mark.parametrize("alpha", EXTREME_ALPHAS)
def test_length_penalty_ranks_as_the_formula_says_over_its_whole_range(alpha):
    """--length-penalty=-1000 divided by 0.0 (ZeroDivisionError), 1000 and 1e9 overflowed n**alpha
    (OverflowError). The key ranks every (logprob, n) as the exact score does, without overflow."""
    from xlab.config import GenerateConfig
    from xlab.generate.hypothesis import Hypothesis

    bounds = next(f for f in __import__("dataclasses").fields(GenerateConfig) if f.name == "length_penalty")
    assert bounds.metadata["range"] == {"ge": -1e9, "le": 1e9}  # the range this test covers
    rng = np.random.default_rng(7)
    pairs = [(-float(rng.uniform(0.01, 40)), int(rng.integers(1, 12))) for _ in range(60)]
    pairs += [(0.0, 3), (-1e-300, 5), (-1e300, 1), (-2.5, 1), (-2.5, 11)]
    hyps = [Hypothesis.scored([], lp, n, alpha, True) for lp, n in pairs]
    assert all(math.isfinite(h.key) or h.logprob == 0.0 for h in hyps)
    with exact_context():
        exact = [exact_score(lp, n, alpha) for lp, n in pairs]
        want = sorted(range(len(pairs)), key=lambda i: -exact[i])
        for h, e in zip(hyps, exact):  # the reported score is the exact one wherever a float holds it
            if e != 0 and 1e-300 < abs(e) < 1e300:
                assert h.score == pytest.approx(float(e), rel=1e-9)
    assert sorted(range(len(pairs)), key=lambda i: hyps[i].key) == want


def brute_force_exact(table, prompt_last, max_new, eos, alpha):
    """The best exact score (Decimal) over every continuation, as :func:`brute_force_best`."""
    lp = torch.log_softmax(table.double(), -1)
    best = None
    for m in range(1, max_new + 1):
        for seq in itertools.product(range(table.shape[0]), repeat=m):
            if eos in seq[:-1] or (seq[-1] != eos and m < max_new):
                continue
            s, prev = 0.0, prompt_last
            for t in seq:
                s, prev = s + lp[prev, t].item(), t
            score = exact_score(s, m, alpha)
            best = score if best is None else max(best, score)
    return best


@pytest.mark.parametrize("alpha", EXTREME_ALPHAS)
def test_exhaustive_beam_is_optimal_at_extreme_length_penalties(alpha):
    for seed in range(4):
        table = random_table(4, 300 + seed, scale=2.0)
        table[:, EOS] += 1.0
        hyps = gen.beam_search(Bigram(table), [1], 4, beam_width=128, eos_id=EOS, length_penalty=alpha)
        assert [h.key for h in hyps] == sorted(h.key for h in hyps)
        with exact_context():
            got = exact_score(hyps[0].logprob, len(hyps[0].tokens) + hyps[0].ended, alpha)
            want = brute_force_exact(table, 1, 4, EOS, alpha)
            assert abs((got - want) / want) < 1e-9  # the same continuation (its sum may differ in the last bits)
    m = CachedBigram(random_table(9, 5))
    for width in (2, 4):  # the command's default search path: every width, no exception
        assert gen.beam_search(m, [1, 3], 6, beam_width=width, eos_id=EOS, length_penalty=alpha)
