"""The GRPO loop, for an in-process learner or a Ray Train worker group (rank 0 drives the rollouts and
broadcasts each step's batch; every rank trains on its slice with DDP; rank 0 then pushes the new weights to
every rollout worker).

Per step: take the next prompts from a seeded permutation (the cursor is checkpointed), sample G completions
each, score them, normalise rewards within each group, recompute the old log-probabilities with the learner's
weights, and take ppo_epochs x (prompts_per_step / minibatch_prompts) clipped policy-gradient steps.
Simplification: learner log-probabilities use the sampling temperature (logits / T), the same distribution the
rollout logprobs come from."""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from components.errors import M1Error
from components.grpo import rewards
from components.grpo.batch import collect, load_prompts, split_prompts
from components.grpo.config import GRPOConfig
from components.grpo.curves import plot_curves
from components.grpo.loss import policy_loss
from components.grpo.mismatch import (
    gap_stats,
    over_threshold,
    tis_stats,
    tis_weights,
    token_gaps,
)
from components.grpo.outcomes import outcome_stats, plot_outcomes, read_pair
from components.grpo.rollout import RolloutPool
from components.model import HybridForCausalLM
from components.tracking import Tracker
from components.train import checkpoint, parallel
from components.train.harness import LoopContext
from components.train.loop import Context, param_groups


@torch.no_grad()
def heldout_accuracy(pool: RolloutPool, heldout: list[dict], grpo: GRPOConfig, seed: int,
                     path: Path | None = None) -> dict:
    """Accuracy over eval_samples samples of each held-out prompt, with its standard error over prompts. `path`
    gets one JSON line per prompt (problem, answer, accuracy, completions, reasons) for audits and paired_gain."""
    if not heldout:
        return {}
    n = grpo.eval_samples
    ro = pool.generate([r["prompt"] for r in heldout], n, grpo.max_new_tokens, max(grpo.eval_temperature, 1e-5),
                       1.0, seed)
    answers = [r["answer"] for r in heldout for _ in range(n)]
    res = [rewards.score(grpo.reward, t, a, 0.0, grpo.verify_timeout_s) for t, a in zip(ro["texts"], answers)]
    counts = np.asarray([r.correct for r in res], dtype=np.int64).reshape(len(heldout), n).sum(1)
    per_prompt = counts / n
    se = per_prompt.std(ddof=1) / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else 0.0
    stats = outcome_stats(counts, n)
    if path is not None:
        with open(path, "w") as f:
            for i, row in enumerate(heldout):
                sl = slice(i * n, (i + 1) * n)
                f.write(json.dumps({"problem": row.get("problem", row["prompt"]), "answer": row["answer"],
                                    "accuracy": float(per_prompt[i]), "completions": ro["texts"][sl],
                                    "reasons": [r.reason for r in res[sl]]}) + "\n")
    return {"heldout/accuracy": float(per_prompt.mean()), "heldout/accuracy_se": float(se),
            "heldout/unevaluated": sum(r.reason == "unevaluated" for r in res) / len(res),
            "heldout/pass_at_n": stats["pass_at_n"], "heldout/mixed_fraction": stats["mixed_fraction"],
            "heldout/prompts": float(len(heldout)), "heldout/samples": float(n)}


def paired_gain(before: Path, after: Path) -> dict:
    """Mean per-prompt accuracy change after - before on the same held-out prompts, with the standard error of
    the paired differences (smaller than the two accuracies' errors combined: prompt difficulty cancels)."""
    d = np.asarray([b["accuracy"] - a["accuracy"] for a, b in zip(*read_pair(before, after))], dtype=np.float64)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return {"heldout/gain": float(d.mean()), "heldout/gain_se": float(se)}


def sequence_stats(model, prompt_ids, comp_ids, temperature: float, device, micro: int, want_grad: bool, autocast):
    """Yields (slice, logp, entropy, mask) per micro-batch over completion positions (right-padded)."""
    for i in range(0, len(comp_ids), micro):
        P, C = prompt_ids[i:i + micro], comp_ids[i:i + micro]
        T = max(len(c) for c in C)
        L = max(len(p) + len(c) for p, c in zip(P, C))
        ids = torch.zeros(len(C), L, dtype=torch.long)
        pos = torch.zeros(len(C), T, dtype=torch.long)
        tgt = torch.zeros(len(C), T, dtype=torch.long)
        mask = torch.zeros(len(C), T, dtype=torch.bool)
        for r, (p, c) in enumerate(zip(P, C)):
            ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            pos[r, :len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
            tgt[r, :len(c)] = torch.tensor(c)
            mask[r, :len(c)] = True
        ids, pos, tgt, mask = ids.to(device), pos.to(device), tgt.to(device), mask.to(device)
        ctx = contextlib.nullcontext() if want_grad else torch.no_grad()
        with ctx, autocast:
            full = model(ids)  # right padding cannot reach earlier positions (causal)
            logits = torch.gather(full, 1, pos[..., None].expand(-1, -1, full.shape[-1])).float() / temperature
        lsm = F.log_softmax(logits, -1)
        logp = torch.gather(lsm, -1, tgt[..., None])[..., 0]
        ent = -(lsm.exp() * lsm).sum(-1)
        yield slice(i, i + len(C)), logp, ent, mask


def grpo_loop(run: LoopContext) -> dict:
    """run: the stage's GRPOConfig (run.config) and where the run lives (components.train.harness.LoopContext)."""
    grpo: GRPOConfig = run.config
    ctx = Context(run.use_ray, run.use_gpu)
    dev = ctx.device
    torch.manual_seed(run.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and grpo.bf16 else contextlib.nullcontext()
    tracker = Tracker(run.mlflow_run_id, run.out_dir, run.mlflow_uri) if ctx.rank == 0 else None
    policy = HybridForCausalLM.from_pretrained(run.model_dir, device=str(dev)).float().train()
    policy.gradient_checkpointing_enable(grpo.gradient_checkpointing)
    ref = None
    if grpo.kl_coef > 0:
        ref = HybridForCausalLM.from_pretrained(run.model_dir, device=str(dev)).eval()
        ref.requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(policy, grpo.weight_decay), lr=grpo.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # constant, as the reference
    train_rows, heldout, rejected = split_prompts(load_prompts(run.data_dir), grpo.heldout_prompts, run.seed)
    if not train_rows:
        raise M1Error(f"no usable RL prompts in {run.data_dir} ({rejected} rejected without a reference answer)")

    start, cursor, first_eval, pending, solved = 0, 0, None, None, frozenset()
    resume = ctx.resume_dir(run.checkpoint_root, run.fingerprint, run.checkpoint_mirror)
    if resume is not None:
        meta, state = checkpoint.read_state(resume)
        pending = state.get("pending_batch")  # one-step off-policy: the batch that was in flight, as it was
        if pending is not None:  # saved with its solved set as a list: weights_only loading refuses a frozenset
            pending = (*pending[:3], frozenset(pending[3]))
        policy.load_state_dict(HybridForCausalLM.from_pretrained(resume, device=str(dev)).state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start, cursor, first_eval = meta["step"], meta["prompt_cursor"], meta.get("first_eval")
        solved = frozenset(meta.get("solved_prompts", []))
        if ctx.rank == 0:
            print(f"[{run.stage}] resumed from step {start} (prompt cursor {cursor})", flush=True)
    core = policy
    model = parallel.wrap(policy, "ddp", ctx.world, dev)

    pool = prefetch = None
    if ctx.rank == 0:
        pool = RolloutPool(run.model_dir, grpo.rollout_workers, grpo.rollout_resources, str(dev))
        if grpo.one_step_off_policy:
            if not pool.remote and dev.type == "cuda":
                raise M1Error("grpo.one_step_off_policy on a GPU needs rollout actors (rollout_workers >= 1): an "
                              "in-process sampler would capture CUDA graphs while the learner runs")
            prefetch = ThreadPoolExecutor(1, thread_name_prefix="m1-rollout")
        if start:
            pool.set_weights(core.state_dict(), start)
        if tracker:
            settings = grpo.model_dump(mode="json")
            tracker.log_params({**{f"grpo.{k}": v for k, v in settings.items()}, "rl_prompts": len(train_rows),
                                "heldout_prompts": len(heldout), "rejected_no_answer": rejected})
        if first_eval is None:
            first_eval = heldout_accuracy(pool, heldout, grpo, run.seed + 10_000,
                                          Path(run.out_dir) / "heldout_before.jsonl")
            if tracker:
                tracker.log_metrics(first_eval, step=0)
            print(f"[{run.stage}] before: {first_eval}", flush=True)

    fail_after = run.fail_after_step
    G = grpo.group_size
    try:
        for step in range(start, grpo.max_steps):
            batch = None
            t_step = time.time()
            if ctx.rank == 0:
                if pending is not None:  # generated during the last step, with the weights before its update
                    batch, cursor, roll_stats, solved = pending.result() if isinstance(pending, Future) else pending
                else:
                    batch, cursor, roll_stats, solved = collect(pool, train_rows, cursor, grpo, run.seed + step,
                                                                solved)
                pending = None
                if prefetch is not None and step + 1 < grpo.max_steps:
                    pending = prefetch.submit(collect, pool, train_rows, cursor, grpo, run.seed + step + 1, solved)
                # updates the sampler's weights are behind the learner's: 0 on-policy, 1 with one-step off-policy
                roll_stats = {**roll_stats, "policy_lag": step - roll_stats["rollout_weights_version"]}
            if ctx.world > 1:
                obj = [batch, cursor]
                dist.broadcast_object_list(obj, src=0)
                batch, cursor = obj
            t_learn = time.time()
            n_seq = len(batch["tokens"])
            # old log-probabilities, recomputed by the learner before any update of this step
            old = [None] * n_seq
            for sl, lp, _, _ in sequence_stats(core, batch["prompt_ids"], batch["tokens"], grpo.temperature, dev,
                                               grpo.micro_batch, False, autocast):
                for r, k in enumerate(range(sl.start, sl.stop)):
                    old[k] = lp[r]
            # sampler/learner mismatch over the kept tokens, measured always, corrected per mismatch_correction
            gaps = token_gaps(batch["logprobs"], old, batch["keep"])
            mismatch = gap_stats(gaps, grpo.mask_threshold)
            tis = tis_weights(old, batch["logprobs"], grpo.tis_cap)
            mismatch.update(tis_stats(tis, batch["keep"], grpo.tis_cap))
            keep = batch["keep"]
            if grpo.mismatch_correction == "mask":
                keep = [k and not d for k, d in zip(keep, over_threshold(gaps, grpo.mask_threshold))]
            mismatch["mismatch_masked_fraction"] = 1 - sum(keep) / max(sum(batch["keep"]), 1)
            use_tis = grpo.mismatch_correction == "tis"
            refs = [None] * n_seq
            if ref is not None:
                for sl, lp, _, _ in sequence_stats(ref, batch["prompt_ids"], batch["tokens"], grpo.temperature, dev,
                                                   grpo.micro_batch, False, autocast):
                    for r, k in enumerate(range(sl.start, sl.stop)):
                        refs[k] = lp[r]
            adv = batch["adv"]
            stats_acc: dict[str, float] = {}
            n_upd = 0
            mb = grpo.minibatch_prompts * G
            no_signal = grpo.skip_no_signal and not any(a != 0 and k for a, k in zip(adv, keep))
            for _ in range(0 if no_signal else grpo.ppo_epochs):
                for m0 in range(0, n_seq, mb):
                    idx = list(range(m0, min(n_seq, m0 + mb)))
                    n_tok = float(sum(len(batch["tokens"][k]) for k in idx if keep[k]))
                    n_kept = float(sum(keep[k] for k in idx))
                    mine = idx[ctx.rank::ctx.world]
                    sub_p = [batch["prompt_ids"][k] for k in mine]
                    sub_c = [batch["tokens"][k] for k in mine]
                    for j, (sl, lp, ent, mask) in enumerate(sequence_stats(model, sub_p, sub_c, grpo.temperature, dev,
                                                                           grpo.micro_batch, True, autocast)):
                        ks = mine[sl]
                        T = lp.shape[1]
                        def pad(t, T=T):
                            return F.pad(t, (0, T - t.shape[0]))

                        old_lp = torch.stack([pad(old[k]) for k in ks])
                        ref_lp = torch.stack([pad(refs[k]) for k in ks]) if ref is not None else None
                        m = mask & torch.tensor([keep[k] for k in ks], device=dev)[:, None]
                        a = torch.tensor([adv[k] for k in ks], device=dev, dtype=torch.float32)
                        w_is = torch.stack([pad(tis[k]) for k in ks]).to(dev) if use_tis else None
                        loss, st = policy_loss(lp, old_lp, a, m, ent, ref_lp, clip_low=grpo.clip_low,
                                               clip_high=grpo.clip_high, entropy_coef=grpo.entropy_coef,
                                               kl_coef=grpo.kl_coef, n_tokens=max(n_tok, 1.0),
                                               dual_clip=grpo.dual_clip, loss_agg=grpo.loss_agg,
                                               n_seqs=max(n_kept, 1.0), max_len=grpo.max_new_tokens,
                                               ratio_level=grpo.ratio_level, is_weight=w_is)
                        (loss * ctx.world).backward()
                        for k, v in st.items():
                            stats_acc[k] = stats_acc.get(k, 0.0) + v
                    torch.nn.utils.clip_grad_norm_([p for p in core.parameters() if p.requires_grad], grpo.grad_clip)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    n_upd += 1
            learn_s = time.time() - t_learn
            totals = ctx.all_sum([stats_acc.get(k, 0.0) for k in ("pg_loss", "clip_fraction", "approx_kl_old", "entropy")])
            if ctx.rank == 0:
                if isinstance(pending, Future):
                    pending = pending.result()  # the next batch is done before the sampler's weights change
                sync_s = pool.set_weights(core.state_dict(), step + 1)
                step_s = time.time() - t_step
                lens = [len(t) for t in batch["tokens"]]
                n_upd = max(n_upd, 1)
                m = {**roll_stats, "pg_loss": totals[0] / n_upd, "clip_fraction": totals[1] / n_upd,
                     "approx_kl": totals[2] / n_upd, "entropy": totals[3] / n_upd, "skipped_update": float(no_signal),
                     **mismatch,
                     "learner_tokens_per_s": sum(lens) * grpo.ppo_epochs / max(learn_s, 1e-9), "sync_seconds": sync_s,
                     "learn_seconds": learn_s, "step_seconds": step_s, "sync_share": sync_s / max(step_s, 1e-9),
                     "prompt_cursor": cursor}
                if tracker:
                    tracker.log_metrics(m, step=step + 1)
                    if (step + 1) % grpo.samples_every == 0:
                        _log_samples(tracker, run.out_dir, step + 1, batch)
                print(f"[{run.stage}] step {step + 1}/{grpo.max_steps} reward {m['reward_mean']:.3f} acc {m['accuracy']:.3f} "
                      f"len {m['response_length_mean']:.0f} ent {m['entropy']:.3f} sync {sync_s:.2f}s", flush=True)
            last = step + 1 == grpo.max_steps
            local = None
            if grpo.checkpoint_every and ((step + 1) % grpo.checkpoint_every == 0 or last):
                if ctx.rank == 0:
                    local = checkpoint.staging_dir(run.checkpoint_root, "m1-grpo-") / "ckpt"
                    # with a batch in flight, the cursor and solved set after it, and the batch itself: resuming
                    # consumes it as is
                    at, solved_at = (pending[1], pending[3]) if pending is not None else (cursor, solved)
                    checkpoint.write_local(local, core, opt, sched, step + 1, at,
                                           {"fingerprint": run.fingerprint, "prompt_cursor": at,
                                            "solved_prompts": sorted(solved_at),
                                            "first_eval": first_eval, "stage": run.stage}, run.model_dir,
                                           trainer_extra={"pending_batch": (*pending[:3], sorted(pending[3]))}
                                           if pending is not None else None)
                ctx.report({"step": step + 1}, local, run.checkpoint_root, step + 1, grpo.keep_checkpoints,
                           run.checkpoint_mirror)
                if local is not None:
                    shutil.rmtree(local.parent, ignore_errors=True)
            # Ray Train hears of checkpoints only: a report between them waits up to 2 s for the controller's poll
            # (components/train/loop.py)
            if step + 1 == fail_after:
                raise RuntimeError(f"M1_FAIL_AFTER_STEP={fail_after}: injected failure after step {step + 1}")
    except BaseException:
        # a batch in flight must not keep generating (and holding the rollout actors) after the stage failed:
        # queued work is dropped, a running collect finishes on its own without being waited for
        if prefetch is not None:
            prefetch.shutdown(wait=False, cancel_futures=True)
        raise

    if prefetch is not None:
        prefetch.shutdown()
    if ctx.rank != 0:
        return {}
    out = Path(run.out_dir)
    final = heldout_accuracy(pool, heldout, grpo, run.seed + 10_000, out / "heldout_after.jsonl")
    outcomes_png = None
    if final and (out / "heldout_before.jsonl").is_file():
        final.update(paired_gain(out / "heldout_before.jsonl", out / "heldout_after.jsonl"))
        outcomes_png = plot_outcomes(out, out / "heldout_outcomes.png",
                                     f"GRPO held-out outcomes: {grpo.max_steps} steps")
    if tracker:
        tracker.log_metrics(final, step=grpo.max_steps)
        for name in ("heldout_before.jsonl", "heldout_after.jsonl"):
            if (out / name).is_file():
                tracker.log_artifact(out / name, "heldout")
        if outcomes_png:
            tracker.log_artifact(outcomes_png, "plots")
    checkpoint.publish_model(core, out, run.model_dir)
    summary = {"steps": grpo.max_steps, "resumed_from": start, **final,
               **{f"{k}_before": v for k, v in (first_eval or {}).items()}}
    (out / "grpo_metrics.json").write_text(json.dumps(summary, indent=2))
    metrics_file = out / "metrics.jsonl"
    if metrics_file.is_file():
        png = plot_curves(metrics_file, out / "grpo_curves.png", f"GRPO: {grpo.max_steps} steps")
        if tracker:
            tracker.log_artifact(png, "plots")
    print(f"[{run.stage}] after: {final}", flush=True)
    return summary


def _log_samples(tracker, out_dir, step, batch, k: int = 8):
    rows = ["| problem | answer | completion | reward |", "|---|---|---|---|"]
    def esc(s):
        return str(s).replace("|", "\\|").replace("\n", " ")[:400]

    for i in range(min(k, len(batch["texts"]))):
        rows.append(f"| {esc(batch['problems'][i])} | {esc(batch['answers'][i])} | {esc(batch['texts'][i])} | "
                    f"{batch['rewards'][i]:.1f} |")
    p = Path(out_dir) / "samples" / f"step_{step:05d}.md"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(rows) + "\n")
    tracker.log_artifact(p, "samples")
