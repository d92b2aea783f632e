"""The training loop shared by distill / sft1 / sft2, written once for both ways it runs:
in-process (one worker, no Ray) and as Ray Train's `train_loop_per_worker` (N workers, DDP or FSDP2).

Per optimizer step every worker derives the same global batch from (seed, step), takes rows rank::world, and
splits them into micro-batches. Each micro-batch's loss SUM is scaled by world / (counted tokens in the whole
global batch) before backward, so after DDP's gradient average the step's gradient is that of the token mean
over the global batch: the loss curve does not depend on the number of workers or micro-batches.

Simplifications: the teacher runs inside each worker (no separate teacher service); held-out evaluation is
computed redundantly by every worker on the same rows (no collective needed) and logged by rank 0."""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from components.model import HybridForCausalLM
from components.tracking import Tracker
from components.train import checkpoint, parallel
from components.train.align import alignment_sums, converted_layers
from components.train.config import TrainConfig
from components.train.data import PackedRows, rows_for_step
from components.train.harness import LoopContext
from components.train.losses import (
    ce_per_token,
    ce_targets,
    distill_loss_sums,
    target_mask,
)
from components.train.on_policy import completion_batch, prompts_of, sample_completions
from components.train.teacher_engine import load_teacher_engine
from components.train.teacher_topk import TopkStore

# ray (ray.train) is imported in Context, only on Ray workers: a heavy optional dependency.

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


class Context:
    """Rank, world size, device and the reporting channel (Ray Train or local)."""

    def __init__(self, use_ray: bool, use_gpu: bool):
        self.ray = use_ray
        if use_ray:
            import ray.train

            c = ray.train.get_context()
            self.rank, self.world = c.get_world_rank(), c.get_world_size()
            self.local_rank = c.get_local_rank()
        else:
            self.rank, self.world, self.local_rank = 0, 1, 0
        self.device = torch.device(f"cuda:{self.local_rank}" if use_gpu else "cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)

    def average_gradients(self, params) -> None:
        """What DDP does in backward, for a loop that calls the model's parts directly (objective align)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def resume_dir(self, root: str, fingerprint: str, mirror: str | None = None) -> Path | None:
        """The newest checkpoint of this fingerprint in the root or its S3 mirror as a local directory; None: start
        afresh. Ray workers look it up themselves, not through ray.train.get_checkpoint(): Ray Train v2 takes no
        resume_from_checkpoint. They read it where it is (ranks copying it into the root would race); in-process,
        one found only in the mirror is copied into the root first."""
        if self.ray:
            found = checkpoint.newest_checkpoint(root, fingerprint, mirror)
            return checkpoint.download(*found) if found else None
        path = checkpoint.latest_checkpoint(root, fingerprint, mirror)
        return checkpoint.download(root, path) if path else None

    def report(self, metrics: dict, local_ckpt: Path | None, root: str, step: int, keep: int,
               mirror: str | None = None) -> None:
        """local_ckpt: rank 0's new checkpoint (None elsewhere and between checkpoints), written into
        checkpoint.staging_dir(root). A local root gets it by a rename, then Ray Train (on Ray) registers it there;
        to an S3 root Ray Train or this process copies it. Rank 0 also copies it to the root's S3 mirror
        (LoopContext.checkpoint_mirror), if any, so that a run whose disk is lost resumes from S3
        (checkpoint.latest_checkpoint)."""
        name = f"checkpoint_{step:06d}"
        if local_ckpt is not None:
            fingerprint = json.loads((local_ckpt / checkpoint.STATE_JSON).read_text())["fingerprint"]
            if mirror:  # first: placing it in a local root moves it
                checkpoint.upload(local_ckpt, mirror, name)
                checkpoint.prune(mirror, keep, fingerprint)
            if not self.ray or checkpoint.is_local(root):
                local_ckpt = Path(checkpoint.upload(local_ckpt, root, name))  # a rename when staged beside it
                if not self.ray:
                    checkpoint.prune(root, keep, fingerprint)
        if self.ray:
            import ray.train

            ckpt = ray.train.Checkpoint.from_directory(str(local_ckpt)) if local_ckpt else None
            # a local root is Ray Train's run folder: the checkpoint already lies there, so Ray registers it (and
            # prunes to keep) without copying it again; to S3, Ray Train copies it from the worker
            mode = ray.train.CheckpointUploadMode.NO_UPLOAD if checkpoint.is_local(root) else \
                ray.train.CheckpointUploadMode.SYNC
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, checkpoint=ckpt,
                             checkpoint_upload_mode=mode)


def lr_lambda(train: TrainConfig):
    warm, total, floor = train.warmup_steps, train.max_steps, train.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if train.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if train.schedule == "cosine" else 1 - frac
        return floor + (1 - floor) * shape

    return f


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


FREEZE_PATTERNS = {"mlp": (".mlp.",), "embeddings": ("embed_tokens", "lm_head"), "attention": (".self_attn.",),
                   "norms": ("layernorm", "model.norm")}


def apply_freeze(model, groups: list[str]) -> None:
    pats = [p for g in groups for p in FREEZE_PATTERNS[g]]
    for name, p in model.named_parameters():
        if any(s in name for s in pats):
            p.requires_grad_(False)


def flops_per_token(model, seq_len: int) -> float:
    """6N for the matmuls of forward + backward, plus attention scores over a causal window (6 * layers * d * L)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6.0 * n + 6.0 * len(cfg.attn_layers) * cfg.q_dim * seq_len


@torch.no_grad()
def heldout_metrics(model, teacher, rows: PackedRows, n_rows: int, micro: int, device, autocast) -> dict:
    """Token-mean reverse KL(student || teacher) and CE of student (and teacher) on the first n_rows held-out rows;
    the CE also apart for end-of-turn targets (the model's EOS ids) and the rest ("content"). Reverse KL is
    mode-seeking: a student that gives the end of turn almost no mass where the teacher gives it much pays little
    KL there but a large CE, so a few such targets can move the perplexity while the KL stays put."""
    idx = list(range(min(n_rows, len(rows))))
    kl = ce_s = ce_t = n = 0.0
    eot_ids = torch.tensor(model.config.eos_ids or [-1], device=device)
    eot = {"n": 0.0, "ce_s": 0.0, "ce_t": 0.0}
    for i in range(0, len(idx), micro):
        b = rows.batch(idx[i:i + micro], device)
        with autocast:
            s = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
            t = teacher(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"]) if teacher is not None else None
        _, kls, ces, cnt = distill_loss_sums(s, t, b["input_ids"], b["loss_mask"], b["doc_ids"], 1.0, 1.0,
                                             "reverse", 1.0)
        kl, ce_s, n = kl + float(kls), ce_s + float(ces), n + float(cnt)
        m = target_mask(b["loss_mask"], b["doc_ids"])
        targets = b["input_ids"][:, 1:][m]
        at_eot = torch.isin(targets, eot_ids)
        eot["n"] += float(at_eot.sum())
        if bool(at_eot.any()):
            eot["ce_s"] += float(ce_per_token(s[:, :-1][m][at_eot], targets[at_eot]).sum())
        if t is not None:
            ce_tok = ce_per_token(t[:, :-1][m], targets)
            ce_t += float(ce_tok.sum())
            eot["ce_t"] += float(ce_tok[at_eot].sum())
    n = max(n, 1.0)
    out = {"heldout/ce": ce_s / n, "heldout/ppl": math.exp(min(ce_s / n, 50))}
    rest = max(n - eot["n"], 1.0)
    if eot["n"]:
        out.update({"heldout/ce_end_of_turn": eot["ce_s"] / eot["n"],
                    "heldout/ppl_content": math.exp(min((ce_s - eot["ce_s"]) / rest, 50))})
    if teacher is not None:
        out.update({"heldout/kl": kl / n, "heldout/teacher_ppl": math.exp(min(ce_t / n, 50))})
        if eot["n"]:
            out.update({"heldout/teacher_ce_end_of_turn": eot["ce_t"] / eot["n"],
                        "heldout/teacher_ppl_content": math.exp(min((ce_t - eot["ce_t"]) / rest, 50))})
    return out


def train_loop(run: LoopContext) -> dict:
    """run: the stage's TrainConfig (run.config) and where the run lives (components.train.harness.LoopContext);
    with run.teacher_topk_dir, precomputed teacher top-k: the teacher is not run for the training loss."""
    train: TrainConfig = run.config
    ctx = Context(run.use_ray, run.use_gpu)
    dev = ctx.device
    torch.manual_seed(run.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and train.bf16 else contextlib.nullcontext()
    tracker = Tracker(run.mlflow_run_id, run.out_dir if ctx.rank == 0 else None, run.mlflow_uri) \
        if ctx.rank == 0 else None

    model = HybridForCausalLM.from_pretrained(run.model_dir, device=str(dev)).float().train()
    apply_freeze(model, train.freeze)
    model.gradient_checkpointing_enable(train.gradient_checkpointing)
    topk = None
    if run.teacher_topk_dir:
        topk = TopkStore(run.teacher_topk_dir)
    # with a top-k store the teacher is only needed for the (exact) held-out measurement
    align, on_policy = train.objective == "align", train.objective == "on_policy"
    teacher = load_teacher_engine(run.teacher_source, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32) \
        if (train.kl_weight > 0 and topk is None) or run.heldout_dir or align else None
    data = PackedRows(run.data_dir)
    heldout = PackedRows(run.heldout_dir) if run.heldout_dir else None

    start = 0
    resume = ctx.resume_dir(run.checkpoint_root, run.fingerprint, run.checkpoint_mirror)
    if resume is not None:  # full weights go in before sharding
        meta, state = checkpoint.read_state(resume)
        model.load_state_dict(HybridForCausalLM.from_pretrained(resume, device=str(dev)).state_dict())

    core = model  # the unwrapped module (sharded in place under fsdp2)
    strategy, world = train.strategy, ctx.world
    # align calls the layers' parts, not the model: DDP would see no forward; it averages gradients itself
    model = model if align else parallel.wrap(model, strategy, world, dev)
    aligned = converted_layers(core) if align else []
    pad_id = core.config.pad_token_id if core.config.pad_token_id is not None else core.config.eos_ids[0]
    # the optimizer is made after wrapping: fully_shard replaces the parameters it would otherwise hold
    opt = torch.optim.AdamW(param_groups(core, train.weight_decay), lr=train.lr, betas=tuple(train.betas), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    if resume is not None:
        parallel.load_optimizer_state(core, opt, state["optimizer"], strategy, world)
        sched.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start = meta["step"]
        first_eval = meta.get("first_eval")
        checkpoint.release(resume)
        if ctx.rank == 0:
            print(f"[{run.stage}] resumed from step {start} ({meta['samples_consumed']} rows consumed)", flush=True)
    trainable = [p for p in core.parameters() if p.requires_grad]
    fpt = flops_per_token(core, data.seq_len)
    peak = train.peak_tflops
    if peak is None and dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    if ctx.rank == 0 and tracker:
        settings = train.model_dump(mode="json")
        tracker.log_params({"stage": run.stage, **{f"train.{k}": v for k, v in settings.items()},
                            "data_dir": run.data_dir, "model_in": run.model_dir, "world_size": ctx.world,
                            "n_params": sum(p.numel() for p in core.parameters()),
                            "n_trainable": sum(p.numel() for p in trainable)})
    if resume is None:
        first_eval = None
    if heldout is not None and start == 0:
        core.eval()
        first_eval = heldout_metrics(core, teacher, heldout, train.eval_rows, train.micro_batch_size, dev, autocast)
        core.train()
        if tracker:
            tracker.log_metrics(first_eval, step=0)

    fail_after = run.fail_after_step  # fault injection for resume tests (harness: $M1_FAIL_AFTER_STEP)
    history = []
    B, mb = train.global_batch_size, train.micro_batch_size
    for step in range(start, train.max_steps):
        t0 = time.time()
        rows = rows_for_step(step, B, len(data), run.seed)
        n_glob = max(1, data.target_tokens(rows))
        mine = rows[ctx.rank::ctx.world]
        sums = [0.0, 0.0, 0.0, 0.0] + [0.0] * len(aligned)
        micro = [mine[i:i + mb] for i in range(0, len(mine), mb)]
        if on_policy:  # the student's own completions, then the count of their tokens over every worker
            feed, skipped = [], 0
            for j, idx in enumerate(micro):
                b = data.batch(idx, dev)
                prompts = prompts_of(b["input_ids"].cpu(), b["loss_mask"].cpu(), b["doc_ids"].cpu(),
                                     train.on_policy_max_prompt)
                keep = [p for p in prompts if p]
                skipped += len(prompts) - len(keep)
                if keep:
                    seed = ((run.seed * 1_000_003 + step) * 1009 + ctx.rank) * 31 + j
                    done = sample_completions(core, keep, train.on_policy_tokens, seed)
                    feed.append((None, completion_batch(keep, done, pad_id, dev)))
            n_glob = max(1, int(ctx.all_sum([float(sum(int(target_mask(f["loss_mask"], f["doc_ids"]).sum())
                                                       for _, f in feed))])[0]))
        else:
            feed = ((idx, data.batch(idx, dev)) for idx in micro)  # rows (for the top-k store), batch
        n_feed = len(feed) if on_policy else len(micro)
        for j, (idx, b) in enumerate(feed):
            if align:  # the tokens the distillation counts (n_glob): positions 1.. whose prediction carries loss
                counted = torch.zeros_like(b["loss_mask"], dtype=torch.bool)
                counted[:, 1:] = target_mask(b["loss_mask"], b["doc_ids"])
                with autocast:
                    loss, per_layer = alignment_sums(core, teacher, b["input_ids"], b["position_ids"], b["doc_ids"],
                                                     counted)
                (loss * ctx.world / n_glob).backward()
                sums = [sums[0] + float(loss.detach()), 0.0, 0.0, sums[3] + int(b["input_ids"].numel())] + \
                    [a + v for a, v in zip(sums[4:], per_layer)]
                continue
            sync = contextlib.nullcontext() if j == n_feed - 1 or ctx.world == 1 or train.strategy != "ddp" \
                else model.no_sync()
            with sync:
                if train.kl_weight == 0:  # fine-tuning: CE through the LM head in chunks, no (b, L, vocab) logits
                    with autocast:
                        ce = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"],
                                   targets=ce_targets(b["input_ids"], b["loss_mask"], b["doc_ids"]))
                    loss, kl, ce = train.ce_weight * ce, 0.0, ce.detach()
                else:
                    with autocast:
                        logits = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
                        if topk is not None:
                            t_logits = topk.dense(idx, dev)
                        else:
                            with torch.no_grad():
                                t_logits = teacher(b["input_ids"], position_ids=b["position_ids"],
                                                   doc_ids=b["doc_ids"])
                    loss, kl, ce, _ = distill_loss_sums(logits, t_logits, b["input_ids"], b["loss_mask"],
                                                          b["doc_ids"], train.kl_weight, train.ce_weight,
                                                          train.kl_kind, train.temperature, train.js_beta)
                (loss * ctx.world / n_glob).backward()
            sums = [sums[0] + float(loss.detach()), sums[1] + float(kl), sums[2] + float(ce), sums[3] + int(b["input_ids"].numel())]
        if align:
            ctx.average_gradients(trainable)
        gnorm = parallel.scalar(torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tot = ctx.all_sum(sums)
        dt = time.time() - t0
        tokens_s = tot[3] / dt
        m = {"loss": tot[0] / n_glob, "kl": tot[1] / n_glob, "ce": tot[2] / n_glob, "lr": sched.get_last_lr()[0],
             "grad_norm": float(gnorm), "tokens_per_s": tokens_s, "step_seconds": dt,
             **{f"align_mse/layer_{i}": v / n_glob for i, v in zip(aligned, tot[4:])},
             **({"on_policy/tokens": float(n_glob), "on_policy/skipped": ctx.all_sum([float(skipped)])[0]}
                if on_policy else {})}
        if peak:
            m["mfu"] = tokens_s * fpt / (peak * 1e12 * ctx.world)
        if dev.type == "cuda":  # the mean over workers of each one's peak since it started (FSDP2 shards evenly)
            m["peak_memory_gb"] = ctx.all_sum([torch.cuda.max_memory_allocated(dev) / 2**30])[0] / ctx.world
        history.append({"step": step + 1, **m})
        if tracker and ((step + 1) % train.log_every == 0 or step + 1 == train.max_steps):
            tracker.log_metrics(m, step=step + 1)
        last = step + 1 == train.max_steps
        if train.eval_every and (step + 1) % train.eval_every == 0 and not last and heldout is not None:
            core.eval()
            ev = heldout_metrics(core, teacher, heldout, train.eval_rows, mb, dev, autocast)
            core.train()
            if tracker:
                tracker.log_metrics(ev, step=step + 1)
        local = None
        if train.checkpoint_every and ((step + 1) % train.checkpoint_every == 0 or last):
            msd = parallel.full_model_state(core, strategy, world)  # collectives: every rank joins
            osd = parallel.full_optimizer_state(core, opt, strategy, world)
            if ctx.rank == 0:
                local = checkpoint.staging_dir(run.checkpoint_root, "m1-ckpt-") / "ckpt"
                checkpoint.write_local(local, core, opt, sched, step + 1, (step + 1) * B,
                                       {"fingerprint": run.fingerprint, "stage": run.stage, "first_eval": first_eval},
                                       run.model_dir, model_state=msd, optimizer_state=osd)
            ctx.report(m, local, run.checkpoint_root, step + 1, train.keep_checkpoints,
                       run.checkpoint_mirror)
            if local is not None:
                shutil.rmtree(local.parent, ignore_errors=True)
        # No ray.train.report between checkpoints: each one waits until Ray Train's controller has taken the last
        # (it polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), which held every step to at least 2 s. The step
        # metrics go to MLflow and history.jsonl.
        if ctx.rank == 0:
            print(f"[{run.stage}] step {step + 1}/{train.max_steps} loss {m['loss']:.4f} kl {m['kl']:.4f} "
                  f"ce {m['ce']:.4f} lr {m['lr']:.2e} {tokens_s:.0f} tok/s", flush=True)
        if step + 1 == fail_after:
            raise RuntimeError(f"M1_FAIL_AFTER_STEP={fail_after}: injected failure after step {step + 1}")

    final = {}
    if heldout is not None:
        core.eval()
        final = heldout_metrics(core, teacher, heldout, train.eval_rows, mb, dev, autocast)
        if tracker:
            tracker.log_metrics(final, step=train.max_steps)
    final_state = parallel.full_model_state(core, strategy, world)
    if ctx.rank == 0:
        out = Path(run.out_dir)
        (out / "history.jsonl").open("a").writelines(json.dumps(h) + "\n" for h in history)
        summary = {"steps": train.max_steps, "resumed_from": start, **(history[-1] if history else {}),
                   **{k: v for k, v in final.items()}}
        if first_eval:
            summary.update({f"{k}_before": v for k, v in first_eval.items()})
        checkpoint.publish_model(core, out, run.model_dir, state_dict=final_state)
        (out / "train_metrics.json").write_text(json.dumps(summary, indent=2))
        return summary
    return {}
