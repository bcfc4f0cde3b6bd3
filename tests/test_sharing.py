"""Sharing prompts and responses across the pairs of a micro-batch: the counts without building a row
(``packing.RowTally``) equal what the collator packs, and ``sharing.predict_sharing`` forecasts the two
``prefix_sharing`` metrics exactly as the collator's stats give them."""

import random

import pytest
from conftest import load_script

from prefixdpo.data.collator import PACKED_KEY, PrefixPackingCollator
from prefixdpo.data.packing import RowTally, pack_pairs, pair_shapes
from prefixdpo.data.sharing import predict_sharing, sharing_fractions


def tokenized_groups(prompts, responses, seed=0, prompt=(1, 30), response=(1, 12)):
    """Every pair of ``responses`` responses (ending in eos, id 3) for each of ``prompts`` prompts, in prompt order."""
    rng = random.Random(seed)
    out = []
    for _ in range(prompts):
        p = [rng.randrange(4, 100) for _ in range(rng.randint(*prompt))]
        rs = [[rng.randrange(4, 100) for _ in range(rng.randint(*response))] + [3] for _ in range(responses)]
        out += [{"prompt_ids": p, "chosen_ids": rs[a], "rejected_ids": rs[b]}
                for a in range(responses) for b in range(a + 1, responses)]
    return out


@pytest.mark.parametrize("max_length,mode,sharing", [(None, "keep_start", True), (20, "keep_start", True),
                                                     (20, "keep_end", True), (None, "keep_start", False)])
def test_tally_counts_what_pack_pairs_packs(max_length, mode, sharing):
    data = tokenized_groups(12, 4, seed=1)
    rng = random.Random(2)
    for _ in range(40):
        batch = rng.sample(data, rng.randint(1, 12))
        row = pack_pairs(batch, max_length, mode, sharing)
        tally = RowTally()
        for ex in batch:
            tally.add(pair_shapes(ex, max_length, mode, sharing))
        assert (tally.tokens, tally.branches, tally.sequences) == (len(row.input_ids), row.num_branches,
                                                                    row.sequences)
        if not sharing:
            assert tally.tokens == tally.unshared_tokens and row.num_branches == 2 * len(batch)


def test_cost_does_not_add():
    data = tokenized_groups(1, 4)
    tally = RowTally()
    tally.add(pair_shapes(data[0], None, "keep_start", True))
    before = (tally.tokens, tally.branches, tally.sequences)
    # Pair (0, 2) after pair (0, 1): the prompt and response 0 are in the row already; only response 2 is new.
    cost = tally.cost(pair_shapes(data[1], None, "keep_start", True))
    assert cost == 1 + len(data[1]["rejected_ids"])
    assert (tally.tokens, tally.branches, tally.sequences) == before


def test_forecast_equals_the_collators_stats():
    data = tokenized_groups(5, 4, seed=3)
    batches = [data[i : i + 4] for i in range(0, len(data), 4)]
    collator = PrefixPackingCollator(pad_token_id=0, max_length=24)
    stats = [collator(b)[PACKED_KEY]["stats"] for b in batches]
    logged = [sharing_fractions(s["packed_tokens"], s["unshared_tokens"], s["sequences"], s["branches"])
              for s in stats]
    f = predict_sharing(batches, max_length=24)
    assert f.micro_batches == len(batches) and f.pairs == len(data)
    assert f.tokens_saved_frac == pytest.approx(sum(x for x, _ in logged) / len(logged), rel=1e-12)
    assert f.responses_deduplicated_frac == pytest.approx(sum(y for _, y in logged) / len(logged), rel=1e-12)
    assert f.packed_tokens == sum(s["packed_tokens"] for s in stats)
    assert f.unshared_tokens == sum(s["unshared_tokens"] for s in stats)
    assert f.tokens_saved_frac_total == pytest.approx(1 - f.packed_tokens / f.unshared_tokens)


def test_responses_deduplicated_frac_by_definition():
    # All 6 pairs of 4 responses in one micro-batch: 12 sequences over 4 branches, 1 - 4/12.
    assert predict_sharing([tokenized_groups(1, 4)]).responses_deduplicated_frac == pytest.approx(2 / 3)
    # The same pairs one per micro-batch: each pair's two responses are two branches of its own row.
    alone = predict_sharing([[ex] for ex in tokenized_groups(1, 4)])
    assert alone.responses_deduplicated_frac == 0.0
    # Per-pair sharing saves each pair's second prompt (less one token): P - 1 of 2P + C + R.
    ex = tokenized_groups(1, 2)[0]
    p, c, r = (len(ex[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert predict_sharing([[ex]]).tokens_saved_frac == pytest.approx((p - 1) / (2 * p + c + r))
    with pytest.raises(ValueError, match="non-empty"):
        predict_sharing([[]])


def test_bench_compares_like_with_like():
    # Each trainer's speed-up is over TRL at the same Liger setting.
    pick = load_script("bench_e2e").trl_counterpart
    assert [pick(t) for t in ("ours-triton", "ours-triton+liger", "ours-fa4+graphs+liger@16384", "trl+liger",
                              "ours-triton+nogc")] == ["trl", "trl+liger", "trl+liger", "trl+liger", "trl"]


def test_bench_all_pairs_shape_builds_on_cpu(capsys):
    # scripts/bench_e2e.py's ultrafeedback-allpairs shape (run on a GPU elsewhere): its data and forecast, no GPU.
    bench = load_script("bench_e2e")
    data = bench.make_data("ultrafeedback-allpairs", 10, seed=0)
    assert len(data) == 12 and len({d["prompt"] for d in data}) == 2  # whole prompts: 4 completions, all 6 pairs
    bench.main(["--dry-run", "--datasets", "ultrafeedback", "ultrafeedback-allpairs", "--steps", "1", "--warmup", "1"])
    lines = capsys.readouterr().out.splitlines()
    saved = {line.split()[0]: float(line.split("tokens_saved_frac ")[1].split(",")[0]) for line in lines}
    assert saved["ultrafeedback-allpairs"] > saved["ultrafeedback"] + 0.3
