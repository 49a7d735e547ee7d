"""Known-answer tests of the acceptance policies and the propose step; no model is involved."""

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from masktok_peft import MaskTokError
from masktok_peft.generation import ConfAdaptPolicy, OffPolicy, Proposals, StaticPolicy, VerifyPolicy, build_policy
from masktok_peft.generation.adaptive import MAX_PROBE_WAIT, ProposalCount
from masktok_peft.generation.proposals import (
    choose_tokens,
    is_context_free,
    process_scores,
    processors_for_row,
    propose,
    suppress_token,
)


def make_proposals(confidence):
    confidence = torch.tensor(confidence, dtype=torch.float32)
    return Proposals(tokens=torch.zeros(confidence.shape, dtype=torch.long), confidence=confidence)


@pytest.mark.parametrize(
    "confidence, expected",
    [
        ([[0.95, 0.91, 0.5, 0.99]], [2]),  # stops at the first miss even if later positions are confident
        ([[0.95, 0.95, 0.95, 0.95]], [4]),
        ([[0.2, 0.99, 0.99, 0.99]], [1]),  # the first proposal is kept even below the threshold
        ([[0.9, 0.9, 0.1]], [2]),  # equal to the threshold counts as confident
        ([[0.99, 0.1], [0.1, 0.99], [0.95, 0.95]], [1, 1, 2]),
    ],
)
def test_confadapt_keeps_leading_confident_run(confidence, expected):
    accepted = ConfAdaptPolicy(threshold=0.9).accept(make_proposals(confidence))
    assert accepted.tolist() == expected


def test_confadapt_threshold_one_keeps_only_certain():
    accepted = ConfAdaptPolicy(threshold=1.0).accept(make_proposals([[1.0, 1.0, 0.999], [0.5, 1.0, 1.0]]))
    assert accepted.tolist() == [2, 1]


def test_static_keeps_all_proposals():
    accepted = StaticPolicy().accept(make_proposals([[0.1, 0.2, 0.3], [0.9, 0.0, 0.0]]))
    assert accepted.tolist() == [3, 3]


def test_pass_width_per_policy():
    assert ConfAdaptPolicy(0.9).proposals_per_pass(8) == 8
    assert StaticPolicy().proposals_per_pass(8) == 8
    assert OffPolicy().proposals_per_pass(8) == 1


def test_build_policy_by_name():
    assert isinstance(build_policy("verify", 0.5), VerifyPolicy)
    assert isinstance(build_policy("confadapt", 0.5), ConfAdaptPolicy)
    assert build_policy("confadapt", 0.5).threshold == 0.5
    assert isinstance(build_policy("static", 0.5), StaticPolicy)
    assert isinstance(build_policy("off", 0.5), OffPolicy)


@pytest.mark.parametrize("name", ["fast", "", None, ["static"]])
def test_build_policy_unknown_name(name):
    with pytest.raises(MaskTokError, match="Unknown masktok_policy"):
        build_policy(name, 0.9)


@pytest.mark.parametrize("threshold", [0, 0.0, -0.1, 1.01, 2, "0.9", True, None])
def test_confadapt_invalid_threshold(threshold):
    with pytest.raises(MaskTokError, match="masktok_threshold"):
        ConfAdaptPolicy(threshold)


def test_proposals_shape_mismatch():
    with pytest.raises(MaskTokError, match="same"):
        Proposals(tokens=torch.zeros((2, 3), dtype=torch.long), confidence=torch.zeros((2, 4)))


def test_suppress_token_inside_and_outside_vocabulary():
    logits = torch.zeros((2, 3, 5))
    suppress_token(logits, 4)
    assert torch.isneginf(logits[..., 4]).all()
    assert not torch.isinf(logits[..., :4]).any()
    unchanged = torch.zeros((1, 1, 5))
    suppress_token(unchanged, 5)  # a mask row past the end of the matrix has no logit
    assert torch.equal(unchanged, torch.zeros((1, 1, 5)))


def test_choose_tokens_greedy_confidence_is_top1_probability():
    scores = torch.log(torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]]))
    tokens, confidence = choose_tokens(scores, do_sample=False)
    assert tokens.tolist() == [1, 0]
    assert torch.allclose(confidence, torch.tensor([0.7, 0.5]))


def test_choose_tokens_sampled_confidence_is_token_probability():
    torch.manual_seed(0)
    scores = torch.log(torch.tensor([[0.5, 0.5, 0.0]])).repeat(200, 1)
    tokens, confidence = choose_tokens(scores, do_sample=True)
    assert set(tokens.tolist()) == {0, 1}
    assert torch.allclose(confidence, torch.full((200,), 0.5))


def test_propose_reads_processed_distribution():
    # top_k=1 leaves one token with probability 1 at every position, whatever the raw logits.
    logits = torch.randn((2, 4, 10), generator=torch.Generator().manual_seed(0))
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(top_k=1)])
    proposals = propose(logits, [torch.tensor([1, 2]), torch.tensor([3])], processors, do_sample=True)
    assert torch.equal(proposals.tokens, logits.argmax(-1))
    assert torch.allclose(proposals.confidence, torch.ones((2, 4)))


def test_propose_feeds_earlier_proposals_to_processors():
    # min_new_tokens=2 after a 2-token prompt: EOS (id 0) is blocked at new positions 0 and 1 only.
    logits = torch.zeros((1, 4, 3))
    logits[..., 0] = 5.0  # EOS is the best token everywhere
    processors = LogitsProcessorList(
        [MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=2, min_new_tokens=2, eos_token_id=0)]
    )
    assert not is_context_free(processors)
    proposals = propose(logits, [torch.tensor([1, 1])], processors, do_sample=False)
    assert 0 not in proposals.tokens[0, :2].tolist()
    assert proposals.tokens[0, 2:].tolist() == [0, 0]


def test_propose_without_processors_is_argmax():
    logits = torch.randn((3, 5, 7), generator=torch.Generator().manual_seed(1))
    proposals = propose(logits, [torch.tensor([1])] * 3, LogitsProcessorList(), do_sample=False)
    assert torch.equal(proposals.tokens, logits.argmax(-1))
    assert torch.allclose(proposals.confidence, logits.softmax(-1).amax(-1))


def test_processors_for_row_selects_padding_length():
    penalty = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.tensor([0, 2]))
    temperature = TemperatureLogitsWarper(0.5)
    row_processors = processors_for_row(LogitsProcessorList([penalty, temperature]), row=1)
    assert row_processors[0].prompt_ignore_length == 2
    assert row_processors[1] is temperature
    assert torch.equal(penalty.prompt_ignore_length, torch.tensor([0, 2]))  # the original is unchanged
    # Row 1 ignores its two padding tokens (id 7), so only token 3 is penalized.
    scores = row_processors(torch.tensor([[7, 7, 3]]), torch.ones((1, 8)))
    assert scores[0, 3] < 2.0
    assert scores[0, 7] == 2.0


# The verify policy.


def one_hot_scores(tokens, vocab=6, high=10.0):
    """Return scores [len(tokens), vocab] whose argmax at row i is tokens[i]."""
    scores = torch.zeros((len(tokens), vocab))
    scores[torch.arange(len(tokens)), torch.tensor(tokens)] = high
    return scores


@pytest.mark.parametrize(
    "targets, draft, expected",
    [
        ([1, 2, 3, 4], [1, 2, 3], (3, 4)),  # whole draft accepted, then the token after it
        ([1, 2, 3, 4], [1, 5, 3], (1, 2)),  # rejected at 1: the correction is the argmax there
        ([1, 2, 3, 4], [0, 2, 3], (0, 1)),
        ([4], [], (0, 4)),  # no draft: ordinary greedy decoding
    ],
)
def test_verify_greedy_known_answers(targets, draft, expected):
    result = VerifyPolicy.verify(one_hot_scores(targets), torch.tensor(draft, dtype=torch.long), do_sample=False)
    assert result == expected


def test_verify_sampling_certain_draft_is_accepted():
    torch.manual_seed(0)
    for _ in range(20):
        accepted, _ = VerifyPolicy.verify(one_hot_scores([1, 2, 3], high=100.0), torch.tensor([1, 2]), do_sample=True)
        assert accepted == 2


def test_verify_sampling_impossible_draft_resamples_from_rest():
    # p puts no mass on the draft token 5, so it is always rejected and the correction is drawn from p itself.
    scores = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]))
    torch.manual_seed(0)
    corrections = []
    for _ in range(200):
        accepted, token = VerifyPolicy.verify(scores, torch.tensor([5]), do_sample=True)
        assert accepted == 0
        corrections.append(token)
    assert set(corrections) == {0, 1}


def test_verify_sampling_rejected_token_never_returned():
    # p = (0.6, 0.4): draft 0 is kept 60% of the time; after a rejection the residual is p without token 0.
    scores = torch.log(torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.0, 1.0]]))
    torch.manual_seed(0)
    outcomes = [VerifyPolicy.verify(scores, torch.tensor([0]), do_sample=True) for _ in range(2000)]
    accepted = [outcome for outcome in outcomes if outcome[0] == 1]
    rejected = [outcome for outcome in outcomes if outcome[0] == 0]
    assert all(token == 2 for _, token in accepted)  # after acceptance, the token after the draft
    assert all(token == 1 for _, token in rejected)
    assert len(accepted) / len(outcomes) == pytest.approx(0.6, abs=0.04)  # 4 standard deviations of 2,000 draws


def test_verify_shape_mismatch():
    with pytest.raises(MaskTokError, match="one score row per draft token"):
        VerifyPolicy.verify(torch.zeros((2, 5)), torch.tensor([1, 2]), do_sample=False)


def test_verify_keeps_all_proposals_as_draft():
    assert VerifyPolicy().accept(make_proposals([[0.1, 0.2, 0.3]])).tolist() == [3]
    assert VerifyPolicy().proposals_per_pass(5) == 5


def test_process_scores_feeds_forced_tokens():
    # min_new_tokens=2 after a 1-token context: EOS (id 0) is blocked at positions 0 and 1 only.
    processors = LogitsProcessorList(
        [MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=1, min_new_tokens=2, eos_token_id=0)]
    )
    scores = process_scores(torch.zeros((3, 4)), torch.tensor([3]), processors, tokens=[1, 2])
    assert torch.isneginf(scores[:2, 0]).all()
    assert scores[2, 0] == 0.0


# The adaptive number of proposals per pass.


def test_proposal_count_fixed_when_not_adaptive():
    count = ProposalCount(max_k=6, adaptive=False)
    count.record(offered=6, kept=1)
    assert count.next_k() == 6


def test_proposal_count_grows_on_full_acceptance_and_shrinks_on_miss():
    count = ProposalCount(max_k=8)
    assert count.next_k() == 8
    count.record(offered=8, kept=3)
    assert count.next_k() == 4  # one more than was kept
    count.record(offered=4, kept=4)
    assert count.next_k() == 6  # two more than was offered
    count.record(offered=6, kept=6)
    count.record(offered=8, kept=8)
    assert count.next_k() == 8  # capped at max_k
    count.record(offered=8, kept=7)
    assert count.next_k() == 7  # shrinks by at least one


def test_proposal_count_respects_min_k():
    count = ProposalCount(max_k=8, min_k=3)
    count.record(offered=8, kept=1)
    assert count.next_k() == 3
    count.record(offered=3, kept=1)
    assert count.next_k() == 3


def test_proposal_count_probes_with_growing_wait():
    count = ProposalCount(max_k=8)
    count.record(offered=8, kept=1)
    count.record(offered=2, kept=1)
    widths = []
    for _ in range(400):
        k = count.next_k()
        widths.append(k)
        count.record(offered=k, kept=1)  # every proposal after the first is rejected
    probes = [index for index, k in enumerate(widths) if k == 2]
    gaps = [later - earlier for earlier, later in zip(probes[:-1], probes[1:], strict=True)]
    assert set(widths) == {1, 2}
    assert gaps == sorted(gaps)  # the wait between probes never shrinks while probes fail
    assert max(gaps) == MAX_PROBE_WAIT
    assert len(probes) <= 10  # on passes 8, 16, 32, 64, 128, then every 128 passes


def test_proposal_count_waits_before_first_probe():
    count = ProposalCount(max_k=8)
    for _ in range(12):  # keep everything for 12 passes, then drop to k = 1 on pass 15
        k = count.next_k()
        count.record(offered=k, kept=k)
    widths = []
    for _ in range(60):
        k = count.next_k()
        widths.append(k)
        count.record(offered=k, kept=1)
    drop = widths.index(1)
    first_probe = widths.index(2, drop)
    assert first_probe - drop >= 8  # a full initial wait at k = 1, even though pass 16 is a multiple of 8
    assert (13 + first_probe) % 8 == 0  # the probe falls on a pass number that is a multiple of the wait


def test_proposal_counts_probe_on_shared_passes():
    # Row i keeps every proposal on its first i passes and none after, so the rows drop to k = 1 on
    # different passes and with different probe waits.
    counts = [ProposalCount(max_k=8) for _ in range(4)]
    probe_passes = []
    for row, count in enumerate(counts):
        passes = set()
        for pass_number in range(1, 400):
            k = count.next_k()
            count.record(offered=k, kept=k if pass_number <= row else 1)
            if pass_number > 20 and k == 2:
                passes.add(pass_number)
        probe_passes.append(passes)
    assert all(probe_passes)
    # Nested sets: each probe of a row falls on a pass where every row with more probes probes too.
    by_size = sorted(probe_passes, key=len)
    for smaller, larger in zip(by_size[:-1], by_size[1:], strict=True):
        assert smaller <= larger


def test_proposal_count_successful_probe_widens():
    count = ProposalCount(max_k=8)
    count.record(offered=8, kept=1)
    count.record(offered=2, kept=1)
    while count.next_k() != 2:
        pass
    count.record(offered=2, kept=2)
    assert count.next_k() == 4


def test_proposal_count_max_k_one_never_probes():
    count = ProposalCount(max_k=1)
    assert [count.next_k() for _ in range(10)] == [1] * 10
