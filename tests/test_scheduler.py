"""Scheduler: chunked prefill, prefix hits, forks with copy-on-write, preemption, limits,
and a hypothesis state machine checking block accounting after every add/step/finish/abort."""

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jpaged.scheduler import Scheduler, SchedulerOutput
from jpaged.sequence import Sequence, SequenceStatus


def make_scheduler(**overrides) -> Scheduler:
    kwargs = dict(
        num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512
    )
    return Scheduler(**(kwargs | overrides))


def add(sched: Scheduler, seq_id: int, token_ids: list[int], **kwargs) -> Sequence:
    seq = Sequence(seq_id, f"req{seq_id}", token_ids, len(token_ids), **kwargs)
    sched.add_seq(seq)
    return seq


def step(sched: Scheduler) -> SchedulerOutput:
    """One engine step with fake sampling: seq s always samples token 1000 + s."""
    out = sched.schedule()
    sampled = {sid: 1000 + sid for s in out.scheduled for sid in s.sample_seq_ids}
    sched.postprocess(out, sampled)
    sched.check_invariants()
    return out


def summary(out: SchedulerOutput) -> list[tuple[int, int, int]]:
    """(seq_id, start_position, num tokens) per scheduled seq."""
    return [(s.seq_id, s.start_position, len(s.token_ids)) for s in out.scheduled]


def test_prefix_cache_hit_between_requests():
    sched = make_scheduler()
    prompt = list(range(500, 540))  # 40 tokens at block_size 16
    a = add(sched, 1, prompt)
    out = step(sched)
    assert summary(out) == [(1, 0, 40)] and out.scheduled[0].block_table == [1, 2, 3]
    b = add(sched, 2, prompt)
    out = step(sched)
    assert summary(out) == [(1, 40, 1), (2, 32, 8)]  # 32 cached tokens, the last 8 computed
    assert out.scheduled[1].token_ids == prompt[32:]
    assert b.block_table == [1, 2, 4] and a.block_table == [1, 2, 3]
    assert [sched.block_manager.blocks[i].ref_count for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    stats = sched.stats
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (80, 32)
    assert (stats.blocks_in_use, stats.peak_blocks_in_use) == (4, 4)
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 32)
    sched.finish_seq(1)
    sched.finish_seq(2)
    assert sched.stats.num_cached_blocks == 2 and not sched.has_unfinished()


def test_prefix_caching_off():
    sched = make_scheduler(enable_prefix_caching=False)
    prompt = list(range(40))
    add(sched, 1, prompt)
    step(sched)
    add(sched, 2, prompt)
    assert summary(step(sched)) == [(1, 40, 1), (2, 0, 40)]
    assert sched.stats.prefix_cache_queries == 0 and sched.stats.num_cached_blocks == 0


def test_chunked_prefill_alone():
    sched = make_scheduler(max_num_batched_tokens=32)
    seq = add(sched, 1, list(range(100)))
    outs = [step(sched) for _ in range(4)]
    assert [summary(o) for o in outs] == [[(1, 0, 32)], [(1, 32, 32)], [(1, 64, 32)], [(1, 96, 4)]]
    assert [o.scheduled[0].sample_seq_ids for o in outs] == [[], [], [], [1]]
    assert [len(o.scheduled[0].block_table) for o in outs] == [2, 4, 6, 7]
    assert seq.num_computed_tokens == 100 and seq.output_token_ids == [1001]


@pytest.mark.parametrize(
    ("budget", "chunks"), [(33, [32, 32, 32, 4]), (32, [31, 31, 31, 7])], ids=["33", "32"]
)
def test_chunked_prefill_never_starves_a_decode(budget, chunks):
    sched = make_scheduler(max_num_batched_tokens=budget)
    decode = add(sched, 1, [7, 8, 9])
    step(sched)
    add(sched, 2, list(range(100)))
    starts = [0, *[sum(chunks[:k]) for k in range(1, 4)]]
    for k, chunk in enumerate(chunks):
        out = step(sched)
        assert summary(out) == [(1, 3 + k, 1), (2, starts[k], chunk)]  # the decode comes first
        assert out.num_batched_tokens == 1 + chunk
    assert decode.output_token_ids == [1001] * 5
    assert sched.get_seq(2).output_token_ids == [1002]


def test_fork_n_samples_and_copy_on_write():
    sched = make_scheduler(block_size=4, max_num_seqs=4)
    parent = add(sched, 1, [1, 2, 3, 4, 5, 6], n=3, max_tokens=8)
    assert sched.num_waiting == 1 and sched.num_running == 0
    out = step(sched)
    assert len(out.scheduled) == 1
    parent_id, c1, c2 = out.scheduled[0].sample_seq_ids
    assert parent_id == 1 and c1 < c2 and parent.n == 1
    children = [sched.get_seq(c1), sched.get_seq(c2)]
    assert [(c.sample_index, c.n, c.request_id, c.arrival) for c in children] == [
        (1, 1, "req1", parent.arrival),
        (2, 1, "req1", parent.arrival),
    ]
    for seq in (parent, *children):
        assert seq.block_table == [1, 2] and seq.num_computed_tokens == 6
        assert seq.output_token_ids == [1000 + seq.seq_id]
    assert [sched.block_manager.blocks[b].ref_count for b in (1, 2)] == [3, 3]
    assert sched.num_running == 3
    out = step(sched)  # every writer of the shared partial block 2 but the last copies it
    assert summary(out) == [(1, 6, 1), (c1, 6, 1), (c2, 6, 1)]
    assert out.block_copies == [(2, 3), (2, 4)]
    assert [s.block_table for s in out.scheduled] == [[1, 3], [1, 4], [1, 2]]
    assert [sched.block_manager.blocks[b].ref_count for b in (1, 2, 3, 4)] == [3, 1, 1, 1]
    assert sched.abort_request("req1") == [1, c1, c2]
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished()


def test_fork_seq_and_replace_last_token_for_beams():
    sched = make_scheduler(block_size=4)
    seq = add(sched, 1, [1, 2, 3, 4, 5, 6], max_tokens=8)
    with pytest.raises(ValueError, match="not running with only its last token to compute"):
        sched.fork_seq(1, 77)  # still waiting
    step(sched)  # the prompt; seq now ends in its sampled (uncomputed) token 1001
    sched.replace_last_token(1, 50)
    child = sched.fork_seq(1, 60)
    assert (seq.output_token_ids, child.output_token_ids) == ([50], [60])
    assert child.block_table == seq.block_table == [1, 2]
    assert [sched.block_manager.blocks[b].ref_count for b in (1, 2)] == [2, 2]
    sched.check_invariants()
    out = step(sched)  # both write position 6 into the shared partial block 2: one copy
    assert summary(out) == [(1, 6, 1), (child.seq_id, 6, 1)]
    assert [s.token_ids for s in out.scheduled] == [[50], [60]] and out.block_copies == [(2, 3)]
    sched.finish_seq(child.seq_id)  # a beam that falls out: its blocks back at once
    assert sched.block_manager.num_used_blocks == 2
    sched.abort_request("req1")
    assert sched.block_manager.num_used_blocks == 0


def test_samples_count_against_max_num_seqs():
    sched = make_scheduler(max_num_seqs=4)
    add(sched, 1, [1, 2, 3], n=3)
    add(sched, 2, [4, 5, 6], n=2)  # 3 + 2 samples > 4: waits
    out = step(sched)
    assert summary(out) == [(1, 0, 3)] and sched.num_waiting == 1
    _, c1, c2 = out.scheduled[0].sample_seq_ids
    sched.finish_seq(1)  # its two children still hold 2 slots: 2 + 2 <= 4
    assert summary(step(sched)) == [(c1, 3, 1), (c2, 3, 1), (2, 0, 3)]
    assert sched.num_running == 4 and sched.num_waiting == 0  # 2 forked in turn


def test_preempts_the_newest_then_resumes_it():
    sched = make_scheduler(num_blocks=5, block_size=4, max_num_seqs=2, max_model_len=32)
    a = add(sched, 1, [1, 2, 3, 4], max_tokens=12)
    b = add(sched, 2, [5, 6, 7, 8], max_tokens=12)
    assert summary(step(sched)) == [(1, 0, 4), (2, 0, 4)]
    for k in range(4):  # decodes at positions 4..7 fill blocks 3 and 4: the pool is full
        assert summary(step(sched)) == [(1, 4 + k, 1), (2, 4 + k, 1)]
    assert (a.block_table, b.block_table) == ([1, 3], [2, 4])
    assert sched.block_manager.num_free_blocks == 0
    out = step(sched)  # a needs a 3rd block: b, the newest, is preempted
    assert out.preempted_seq_ids == [2] and summary(out) == [(1, 8, 1)]
    assert a.block_table == [1, 3, 4]  # b's blocks came back, its tail block first
    assert (b.status, b.num_computed_tokens, b.block_table) == (SequenceStatus.WAITING, 0, [])
    assert list(sched.waiting) == [b] and sched.stats.num_preemptions == 1
    assert sched.block_manager.free_block_ids() == [2]  # b's first block, still cached
    for k in range(3):  # b (9 tokens) needs 3 blocks, 1 cached: it waits
        assert summary(step(sched)) == [(1, 9 + k, 1)]
    later = add(sched, 3, [9, 9], max_tokens=8)
    sched.finish_seq(1)
    assert sched.block_manager.free_block_ids() == [2, 4, 3, 1]
    out = step(sched)  # b first (head of the queue), resuming from its cached block
    assert summary(out) == [(2, 4, 5), (3, 0, 2)]
    assert out.scheduled[0].token_ids == [1002] * 5 and b.block_table == [2, 4, 3]
    outs = [step(sched) for _ in range(6)]
    assert [summary(o) for o in outs[:3]] == [
        [(2, 9, 1), (3, 2, 1)],
        [(2, 10, 1), (3, 3, 1)],
        [(2, 11, 1)],
    ]
    assert outs[2].preempted_seq_ids == [3]  # later, the newest, needs a block: it preempts itself
    assert b.num_output_tokens == 12 and b.block_table == [2, 4, 3, 1]
    sched.finish_seq(2)  # the engine's max_tokens stop
    assert summary(step(sched)) == [(3, 0, 5)]  # its cached block was evicted by b's 4th
    assert later.output_token_ids == [1003] * 4
    sched.finish_seq(3)
    assert sched.block_manager.num_free_blocks == 4 and sched.stats.num_preemptions == 2


def test_newest_preempts_itself_and_stops():
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_seqs=2, max_model_len=8)
    add(sched, 1, [1, 2], max_tokens=3)
    add(sched, 2, [3, 4], max_tokens=3)
    assert summary(step(sched)) == [(1, 0, 2), (2, 0, 2)]  # blocks 1, 2
    out = step(sched)  # position 2: block 3 for seq 1, none left for seq 2, the newest
    assert out.preempted_seq_ids == [2] and summary(out) == [(1, 2, 1)]
    out = step(sched)  # seq 2 needs 2 blocks (1 cached), 0 are free: it waits
    assert out.preempted_seq_ids == [] and summary(out) == [(1, 3, 1)]
    assert [s.seq_id for s in sched.waiting] == [2] and sched.stats.num_preemptions == 1


def test_rejections():
    sched = make_scheduler(num_blocks=9, block_size=16, max_model_len=2048, max_num_seqs=4)
    cases = [
        (dict(token_ids=list(range(5000))), "prompt has 5000 tokens but max_model_len is 2048"),
        (dict(token_ids=[1] * 2048), "prompt has 2048 tokens but max_model_len is 2048"),
        (
            dict(token_ids=[1] * 100, max_tokens=50),
            "prompt of 100 tokens plus up to 50 output tokens needs 10 blocks but the KV pool has 8",
        ),
        (
            dict(token_ids=[1] * 10),
            "prompt of 10 tokens plus up to 2038 output tokens needs 128 blocks but the KV pool has 8",
        ),
        (dict(token_ids=[1], max_tokens=1, n=5), "n is 5 but max_num_seqs is 4"),
        (dict(token_ids=[], max_tokens=1), "num_prompt_tokens is 0 but token_ids has 0 tokens"),
        (dict(token_ids=[1], max_tokens=0), "max_tokens must be >= 1, got 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=f"^{message}$"):
            add(sched, 1, **kwargs)
    add(sched, 1, [1] * 100, max_tokens=29)  # 128 tokens: 8 blocks, exactly the pool
    with pytest.raises(ValueError, match="seq_id 1 is already in use"):
        add(sched, 1, [1], max_tokens=1)
    assert sched.num_waiting == 1


def test_constructor_rejections():
    assert make_scheduler(max_num_batched_tokens=4).max_num_seqs == 4  # every decode fits a step
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1, got 0"):
        make_scheduler(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        make_scheduler(max_num_seqs=0)
    with pytest.raises(ValueError, match="num_blocks must be >= 2"):
        make_scheduler(num_blocks=1)


def test_abort_waiting_and_running():
    sched = make_scheduler(max_num_batched_tokens=40)
    add(sched, 1, list(range(30)))
    add(sched, 2, list(range(100, 130)))  # gets 10 tokens of budget: running mid-prefill
    add(sched, 3, [5, 6])  # waiting
    assert summary(step(sched)) == [(1, 0, 30), (2, 0, 10)]
    assert sched.abort_request("req2") == [2] and sched.abort_request("req3") == [3]
    assert sched.abort_request("req3") == [] and sched.num_waiting == 0
    assert sched.num_running == 1 and sched.block_manager.num_used_blocks == 2
    with pytest.raises(KeyError, match="seq 2 is unknown or finished"):
        sched.get_seq(2)
    sched.check_invariants()


def test_postprocess_skips_seqs_finished_mid_step_and_requires_samples():
    sched = make_scheduler()
    add(sched, 1, [1, 2])
    add(sched, 2, [3, 4])
    out = sched.schedule()
    sched.finish_seq(1)
    with pytest.raises(ValueError, match="sampled has no token for seq 2"):
        sched.postprocess(out, {1: 7})
    sched.postprocess(out, {2: 9})
    assert sched.get_seq(2).token_ids == [3, 4, 9]


def test_a_seq_at_max_model_len_must_be_finished():
    sched = make_scheduler(max_model_len=4)
    seq = add(sched, 1, [1, 2, 3])
    step(sched)
    assert seq.num_tokens == 4
    with pytest.raises(RuntimeError, match="seq 1 has 4 tokens and max_model_len is 4"):
        sched.schedule()


def test_imports_neither_jax_nor_numpy():
    code = "import sys, jpaged.scheduler; print(sorted({'jax', 'numpy'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds (shared prefixes, n in 1..3), steps, finishes and aborts on small pools."""

    @initialize(
        block_size=st.sampled_from([2, 4]),
        num_blocks=st.integers(6, 14),
        max_num_seqs=st.integers(1, 4),
        budget=st.integers(1, 16),
        caching=st.booleans(),
    )
    def setup(self, block_size, num_blocks, max_num_seqs, budget, caching):
        self.sched = Scheduler(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,  # max_num_seqs is capped at it
            max_model_len=24,
            enable_prefix_caching=caching,
        )
        self.next_id = 0
        # A fake KV pool holding token ids: [num_blocks][block_size]; catches any block
        # written while shared, a wrong prefix hit or a missed copy.
        self.pool = [[None] * block_size for _ in range(num_blocks)]
        self.prefixes = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 9, 9, 9, 9, 9, 9, 9]]

    @rule(
        prefix=st.sampled_from([0, 1, None]),
        prefix_len=st.integers(0, 9),
        suffix=st.lists(st.integers(0, 3), max_size=10),
        n=st.integers(1, 3),
        max_tokens=st.integers(1, 10),
    )
    def add(self, prefix, prefix_len, suffix, n, max_tokens):
        tokens = (self.prefixes[prefix][:prefix_len] if prefix is not None else []) + suffix
        self.next_id += 1
        seq = Sequence(self.next_id + 10**6, f"r{self.next_id}", tokens, len(tokens), n=n)
        seq.max_tokens = max_tokens
        sched, bm = self.sched, self.sched.block_manager
        max_len = min(sched.max_model_len, len(tokens) + max_tokens)
        fits = (
            1 <= len(tokens) < sched.max_model_len
            and n <= sched.max_num_seqs
            and bm.blocks_for(max_len - 1) <= bm.num_usable_blocks
        )
        if fits:
            sched.add_seq(seq)
        else:
            with pytest.raises(ValueError):
                sched.add_seq(seq)

    @rule()
    def step(self):
        sched = self.sched
        decodes = {s.seq_id for s in sched.running if s.num_tokens - s.num_computed_tokens == 1}
        out = sched.schedule()
        ids = [s.seq_id for s in out.scheduled]
        assert len(set(ids)) == len(ids) and not set(ids) & set(out.preempted_seq_ids)
        assert decodes <= set(ids) | set(out.preempted_seq_ids)  # no decode left out
        assert 0 < out.num_batched_tokens <= sched.max_num_batched_tokens or not ids
        assert out.num_batched_tokens == sum(len(s.token_ids) for s in out.scheduled)
        for s in out.scheduled:
            seq = sched.get_seq(s.seq_id)
            assert (
                s.token_ids == seq.token_ids[s.start_position : s.start_position + len(s.token_ids)]
            )
            assert len(s.block_table) == sched.block_manager.blocks_for(
                s.start_position + len(s.token_ids)
            )
            assert (s.start_position + len(s.token_ids) == seq.num_tokens) == bool(s.sample_seq_ids)
        for src, dst in out.block_copies:
            assert sched.block_manager.blocks[dst].ref_count == 1 and src != dst
            self.pool[dst] = list(self.pool[src])
        bs = sched.block_size
        for s in out.scheduled:  # the forward: write each token's "K/V" at its slot
            for i, token in enumerate(s.token_ids):
                block_id = s.block_table[(s.start_position + i) // bs]
                # only this seq (and forks made from it this step) may hold a block it writes
                readers = max(1, len(s.sample_seq_ids))
                assert sched.block_manager.blocks[block_id].ref_count == readers and block_id
                self.pool[block_id][(s.start_position + i) % bs] = token
        sampled = {sid: sid % 4 for s in out.scheduled for sid in s.sample_seq_ids}
        sched.postprocess(out, sampled)
        for sid in sampled:  # the engine's stop checks
            seq = sched.get_seq(sid)
            if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= sched.max_model_len:
                sched.finish_seq(sid)

    @precondition(lambda self: self.sched.num_running)
    @rule(data=st.data())
    def finish(self, data):
        seq = data.draw(st.sampled_from(self.sched.running))
        self.sched.finish_seq(seq.seq_id)

    @precondition(lambda self: self.sched.has_unfinished())
    @rule(data=st.data())
    def abort(self, data):
        seq = data.draw(st.sampled_from([*self.sched.running, *self.sched.waiting]))
        assert seq.seq_id in self.sched.abort_request(seq.request_id)

    @invariant()
    def consistent(self):
        if hasattr(self, "sched"):
            self.sched.check_invariants()
            bs = self.sched.block_size
            for seq in self.sched.running:  # every computed token's K/V is where the table says
                kv = [
                    self.pool[seq.block_table[p // bs]][p % bs]
                    for p in range(seq.num_computed_tokens)
                ]
                assert kv == seq.token_ids[: seq.num_computed_tokens]
            running = [s.arrival for s in self.sched.running]
            waiting = [s.arrival for s in self.sched.waiting]
            assert waiting == sorted(waiting)  # FCFS, preempted seqs back at the head
            assert not running or not waiting or max(running) <= min(waiting)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        # drain: every request must finish (no livelock). A request needs at most ~30 steps
        # alone (a 19-token prompt at a 1-token budget, 10 decodes); 40 adds on a 3-token
        # budget with preemptions took 402 steps, so the bound scales with the adds.
        for _ in range(100 * self.next_id + 100):
            if not self.sched.has_unfinished():
                break
            self.step()
            self.sched.check_invariants()
        assert not self.sched.has_unfinished()
        bm = self.sched.block_manager
        assert bm.num_free_blocks == bm.num_usable_blocks and bm.num_used_blocks == 0


SchedulerMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scheduler_state_machine = SchedulerMachine.TestCase
