"""What a GRPO step trains on: the RL prompts (read, split into training and held-out by a seeded hash), the order
they are drawn in (a seeded permutation per epoch, its cursor checkpointed; with skip_solved, solved prompts are
passed over), and the step's batch: G completions per prompt, scored, with dynamic sampling drawing more prompts
until enough groups carry signal (unequal rewards)."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from components.errors import M1Error
from components.grpo.advantages import advantages, unlikeliness_scale
from components.grpo.config import GRPOConfig
from components.grpo.rewards import RewardResult, overlong_penalty, score


def load_prompts(directory: str) -> list[dict]:
    files = sorted(Path(directory).glob("*.parquet"))
    if not files:
        raise M1Error(f"no RL prompt shards in {directory} (run the curate stage first)")
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return rows


def split_prompts(rows: list[dict], n_heldout: int, seed: int) -> tuple[list[dict], list[dict], int]:
    """Rejects rows without a reference answer (returns their count); held-out = the n rows of smallest hash."""
    good = [r for r in rows if isinstance(r.get("answer"), str) and r["answer"].strip() and r.get("prompt")]

    def key(r):
        return hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest()

    ordered = sorted(good, key=key)
    return ordered[n_heldout:], ordered[:n_heldout], len(rows) - len(good)


def prompt_order(cursor: int, n: int, count: int, seed: int) -> list[int]:
    out = []
    while len(out) < count:
        epoch, off = divmod(cursor + len(out), n)
        perm = np.random.default_rng([seed, 7, epoch]).permutation(n)
        out.extend(perm[off:off + min(count - len(out), n - off)].tolist())
    return out


def draw(cursor: int, n: int, count: int, seed: int, solved: frozenset[int]) -> tuple[list[int], int, int]:
    """The next `count` prompt indices of the seeded order, passing over `solved` ones -> (picks, the cursor after
    them, how many were passed over). The cursor counts every position passed, so a resumed run draws the same."""
    if len(solved) >= n:
        raise M1Error(f"grpo.skip_solved: all {n} training prompts are solved, none is left to draw "
                      f"(lower max_steps or turn skip_solved off)")
    picks, skipped = [], 0
    while len(picks) < count:
        chunk = prompt_order(cursor, n, count - len(picks), seed)
        cursor += len(chunk)
        fresh = [i for i in chunk if i not in solved]
        skipped += len(chunk) - len(fresh)
        picks += fresh
    return picks, cursor, skipped


def score_rollouts(ro: dict, answers: list[str], grpo: GRPOConfig) -> tuple[torch.Tensor, list[RewardResult]]:
    res = [score(grpo.reward, t, a, grpo.format_weight, grpo.verify_timeout_s) for t, a in zip(ro["texts"], answers)]
    return torch.tensor([r.reward for r in res], dtype=torch.float32), res


_PER_SEQUENCE = ("prompt_ids", "tokens", "logprobs", "texts", "finish", "correct")


def refill_count(missing: int, informative: int, drawn: int, cap: int) -> int:
    """Prompts to draw for `missing` informative groups when `informative` of the `drawn` groups so far were
    (at least `missing`; with none informative yet, `cap`)."""
    if informative == 0:
        return cap
    return max(missing, min(cap, math.ceil(missing * drawn / informative)))


def collect(pool, rows: list[dict], cursor: int, grpo: GRPOConfig, seed: int, solved: frozenset[int] = frozenset()):
    """Generate, score and (with dynamic sampling) refill until prompts_per_step groups carry signal.
    -> (batch, cursor, stats, solved): with skip_solved, `solved` (indices into rows) grows by the prompts whose
    every completion was correct, and those are not drawn again."""
    G, want = grpo.group_size, grpo.prompts_per_step
    groups: list[dict] = []
    gen_tokens, gen_s, rounds, skipped, newly_solved = 0, 0.0, 0, 0, 0
    all_rewards, all_shaping, reasons, lens, trunc, zero_var, versions = [], [], [], [], 0, 0, []
    while True:
        need = refill_count(want - len(groups), len(groups), len(all_rewards) // G, grpo.refill_max_factor * want) \
            if grpo.dynamic_sampling and rounds else want
        picks, cursor, passed = draw(cursor, len(rows), need, seed, solved if grpo.skip_solved else frozenset())
        skipped += passed
        prompts = [rows[i] for i in picks]
        ro = pool.generate([p["prompt"] for p in prompts], G, grpo.max_new_tokens, grpo.temperature, grpo.top_p,
                           seed * 1000 + rounds)
        answers = [p["answer"] for p in prompts for _ in range(G)]
        rew, res = score_rollouts(ro, answers, grpo)
        shaping = [overlong_penalty(len(t), grpo.max_new_tokens, grpo.overlong_window, grpo.overlong_penalty)
                   for t in ro["tokens"]]
        gen_tokens += sum(len(t) for t in ro["tokens"])
        gen_s += ro["seconds"]
        versions += ro["versions"]
        shaped = rew
        if grpo.unlikeliness_penalty:
            mean_lp = torch.tensor([float(np.mean(lp)) if len(lp) else 0.0 for lp in ro["logprobs"]])
            shaped = rew * unlikeliness_scale(mean_lp.view(len(prompts), G), grpo.unlikeliness_penalty).flatten()
        rg = (shaped + torch.tensor(shaping, dtype=torch.float32)).view(len(prompts), G)  # what advantages see
        correct = torch.tensor([r.correct for r in res]).view(len(prompts), G)
        adv, info = advantages(rg, correct, grpo.advantage, grpo.adv_eps, grpo.passk_k)  # within each group
        zero_var += int((~info).sum())
        all_rewards += rew.tolist()
        all_shaping += shaping
        reasons += [r.reason for r in res]
        lens += [len(t) for t in ro["tokens"]]
        trunc += sum(f == "length" for f in ro["finish"])
        if grpo.skip_solved:
            done = {picks[i] for i, ok in enumerate(correct.all(1).tolist()) if ok}
            newly_solved += len(done - solved)
            solved = solved | done
        for i, p in enumerate(prompts):
            if grpo.dynamic_sampling and not bool(info[i]):
                continue
            sl = slice(i * G, (i + 1) * G)
            groups.append({"prompt": p, "rewards": rg[i], "adv": adv[i],
                           **{k: ro[k][sl] for k in _PER_SEQUENCE if k != "correct"},
                           "correct": [r.correct for r in res[sl]]})
        rounds += 1
        if not grpo.dynamic_sampling or len(groups) >= want or rounds > grpo.max_refill_rounds:
            break
    if not groups:
        raise M1Error(f"dynamic sampling left an empty batch: all {len(all_rewards) // G} groups had equal rewards "
                      f"after {rounds} rounds (raise max_refill_rounds or lower the difficulty)")
    groups = groups[:want]
    rewards = torch.stack([g["rewards"] for g in groups])
    adv = torch.stack([g["adv"] for g in groups]).flatten().tolist()
    flat = {k: [x for g in groups for x in g[k]] for k in _PER_SEQUENCE}
    keep = [not (grpo.mask_truncated and f == "length") for f in flat["finish"]]
    keep = [k and len(t) > 0 for k, t in zip(keep, flat["tokens"])]
    batch = {**flat, "adv": adv, "keep": keep, "answers": [g["prompt"]["answer"] for g in groups for _ in range(G)],
             "problems": [g["prompt"]["problem"] for g in groups for _ in range(G)],
             "rewards": rewards.flatten().tolist()}
    n = len(all_rewards)
    # reward_mean is the reward before overlong shaping (comparable across settings); the shaping's mean beside it
    stats = {"reward_mean": float(np.mean(all_rewards)), "accuracy": reasons.count("correct") / n,
             "overlong_penalty_mean": float(np.mean(all_shaping)),
             "response_length_mean": float(np.mean(lens)), "response_length_max": float(max(lens)),
             "truncated_fraction": trunc / n, "zero_variance_groups": zero_var / max(1, n // G),
             "no_think_fraction": reasons.count("no_think") / n, "reward_errors": float(reasons.count("error")),
             "unevaluated_fraction": reasons.count("unevaluated") / n,
             "rollout_tokens_per_s": gen_tokens / max(gen_s, 1e-9), "rollout_seconds": gen_s,
             "rollout_weights_version": float(min(versions)),
             "rollout_rounds": float(rounds),
             "batch_prompts": float(len(groups))}
    if grpo.skip_solved:
        stats.update({"solved_prompts": float(len(solved)), "solved_new": float(newly_solved),
                      "solved_passed_over": float(skipped)})
    return batch, cursor, stats, solved
