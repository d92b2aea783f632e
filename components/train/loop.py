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
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from components.model import HybridForCausalLM
from components.train import checkpoint as ck
from components.train import parallel
from components.train.data import PackedRows, rows_for_step
from components.train.losses import distill_loss_sums, target_mask
from components.train.teacher_engine import load_teacher_engine

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

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def resume_dir(self, root: str, fingerprint: str) -> Path | None:
        """The newest checkpoint of this fingerprint in the root or its S3 mirror as a local directory; None: start
        afresh. Ray workers look it up themselves, not through ray.train.get_checkpoint(): Ray Train v2 takes no
        resume_from_checkpoint. They read it where it is (ranks copying it into the root would race); in-process,
        one found only in the mirror is copied into the root first."""
        if self.ray:
            found = ck.newest_checkpoint(root, fingerprint)
            return ck.download(*found) if found else None
        path = ck.latest_checkpoint(root, fingerprint)
        return ck.download(root, path) if path else None

    def report(self, metrics: dict, local_ckpt: Path | None, root: str, step: int, keep: int) -> None:
        """local_ckpt: rank 0's new checkpoint (None elsewhere and between checkpoints). On Ray, Ray Train persists
        it to the root; in-process it is copied there here. Either way rank 0 also copies it to the root's S3
        mirror, if any, so that a run whose disk is lost resumes from S3 (ck.latest_checkpoint)."""
        if local_ckpt is not None:
            mirror = ck.checkpoint_mirror(root)
            fingerprint = json.loads((local_ckpt / ck.STATE_JSON).read_text())["fingerprint"]
            for dest in ([] if self.ray else [root]) + ([mirror] if mirror else []):
                ck.upload(local_ckpt, dest, f"checkpoint_{step:06d}")
                ck.prune(dest, keep, fingerprint)
        if self.ray:
            import ray.train

            ckpt = ray.train.Checkpoint.from_directory(str(local_ckpt)) if local_ckpt else None
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, checkpoint=ckpt)


def lr_lambda(tc: dict):
    warm, total, floor = tc["warmup_steps"], tc["max_steps"], tc["min_lr_ratio"]

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if tc["schedule"] == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if tc["schedule"] == "cosine" else 1 - frac
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
def heldout_metrics(model, teacher, rows: PackedRows, n_rows: int, micro: int, device, autocast, tc: dict) -> dict:
    """Token-mean reverse KL(student || teacher) and CE of student (and teacher) on the first n_rows held-out rows."""
    idx = list(range(min(n_rows, len(rows))))
    kl = ce_s = ce_t = n = 0.0
    for i in range(0, len(idx), micro):
        b = rows.batch(idx[i:i + micro], device)
        with autocast:
            s = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
            t = teacher(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"]) if teacher is not None else None
        _, kls, ces, cnt = distill_loss_sums(s, t, b["input_ids"], b["loss_mask"], b["doc_ids"], 1.0, 1.0,
                                             "reverse", 1.0)
        kl, ce_s, n = kl + float(kls), ce_s + float(ces), n + float(cnt)
        if t is not None:
            m = target_mask(b["loss_mask"], b["doc_ids"])
            ce_t += float(torch.nn.functional.cross_entropy(t[:, :-1][m].float(), b["input_ids"][:, 1:][m], reduction="sum"))
    n = max(n, 1.0)
    out = {"heldout/ce": ce_s / n, "heldout/ppl": math.exp(min(ce_s / n, 50))}
    if teacher is not None:
        out.update({"heldout/kl": kl / n, "heldout/teacher_ppl": math.exp(min(ce_t / n, 50))})
    return out


def train_loop(lc: dict) -> dict:
    """lc: a plain dict (picklable for Ray): 'train' (TrainConfig as dict), model_dir, data_dir, heldout_dir,
    teacher_source, out_dir, checkpoint_root, fingerprint, seed, use_ray, use_gpu, mlflow_run_id, mlflow_uri and,
    optionally, teacher_topk_dir (precomputed teacher top-k: the teacher is not run for the training loss)."""
    from components.tracking import Tracker

    tc = lc["train"]
    ctx = Context(lc["use_ray"], lc["use_gpu"])
    dev = ctx.device
    torch.manual_seed(lc["seed"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and tc["bf16"] else contextlib.nullcontext()
    tracker = Tracker(lc.get("mlflow_run_id"), lc["out_dir"] if ctx.rank == 0 else None, lc.get("mlflow_uri")) \
        if ctx.rank == 0 else None

    model = HybridForCausalLM.from_pretrained(lc["model_dir"], device=str(dev)).float().train()
    apply_freeze(model, tc["freeze"])
    model.gradient_checkpointing_enable(tc["gradient_checkpointing"])
    topk = None
    if lc.get("teacher_topk_dir"):
        from components.train.teacher_topk import TopkStore

        topk = TopkStore(lc["teacher_topk_dir"])
    # with a top-k store the teacher is only needed for the (exact) held-out measurement
    teacher = load_teacher_engine(lc["teacher_source"], dev, torch.bfloat16 if dev.type == "cuda" else torch.float32) \
        if (tc["kl_weight"] > 0 and topk is None) or lc.get("heldout_dir") else None
    data = PackedRows(lc["data_dir"])
    heldout = PackedRows(lc["heldout_dir"]) if lc.get("heldout_dir") else None

    start = 0
    resume = ctx.resume_dir(lc["checkpoint_root"], lc["fingerprint"])
    if resume is not None:  # full weights go in before sharding
        meta, state = ck.read_state(resume)
        model.load_state_dict(HybridForCausalLM.from_pretrained(resume, device=str(dev)).state_dict())

    core = model  # the unwrapped module (sharded in place under fsdp2)
    strategy, world = tc["strategy"], ctx.world
    model = parallel.wrap(model, strategy, world, dev)
    # the optimizer is made after wrapping: fully_shard replaces the parameters it would otherwise hold
    opt = torch.optim.AdamW(param_groups(core, tc["weight_decay"]), lr=tc["lr"], betas=tuple(tc["betas"]), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    if resume is not None:
        parallel.load_optimizer_state(core, opt, state["optimizer"], strategy, world)
        sched.load_state_dict(state["scheduler"])
        ck.set_rng_state(state["rng"])
        start = meta["step"]
        first_eval = meta.get("first_eval")
        if ctx.rank == 0:
            print(f"[{lc['stage']}] resumed from step {start} ({meta['samples_consumed']} rows consumed)", flush=True)
    trainable = [p for p in core.parameters() if p.requires_grad]
    fpt = flops_per_token(core, data.seq_len)
    peak = tc["peak_tflops"]
    if peak is None and dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    if ctx.rank == 0 and tracker:
        tracker.log_params({"stage": lc["stage"], **{f"train.{k}": v for k, v in tc.items()},
                            "data_dir": lc["data_dir"], "model_in": lc["model_dir"], "world_size": ctx.world,
                            "n_params": sum(p.numel() for p in core.parameters()),
                            "n_trainable": sum(p.numel() for p in trainable)})
    if resume is None:
        first_eval = None
    if heldout is not None and start == 0:
        core.eval()
        first_eval = heldout_metrics(core, teacher, heldout, tc["eval_rows"], tc["micro_batch_size"], dev, autocast, tc)
        core.train()
        if tracker:
            tracker.log_metrics(first_eval, step=0)

    fail_after = int(os.environ.get("M1_FAIL_AFTER_STEP", "-1"))  # fault injection for resume tests
    history = []
    B, mb = tc["global_batch_size"], tc["micro_batch_size"]
    for step in range(start, tc["max_steps"]):
        t0 = time.time()
        rows = rows_for_step(step, B, len(data), lc["seed"])
        n_glob = max(1, data.target_tokens(rows))
        mine = rows[ctx.rank::ctx.world]
        sums = [0.0, 0.0, 0.0, 0.0]
        micro = [mine[i:i + mb] for i in range(0, len(mine), mb)]
        for j, idx in enumerate(micro):
            b = data.batch(idx, dev)
            sync = contextlib.nullcontext() if j == len(micro) - 1 or ctx.world == 1 or tc["strategy"] != "ddp" \
                else model.no_sync()
            with sync:
                with autocast:
                    logits = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
                    t_logits = None
                    if tc["kl_weight"] > 0 and topk is not None:
                        t_logits = topk.dense(idx, dev)
                    elif tc["kl_weight"] > 0:
                        with torch.no_grad():
                            t_logits = teacher(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
                loss, kl, ce, cnt = distill_loss_sums(logits, t_logits, b["input_ids"], b["loss_mask"], b["doc_ids"],
                                                      tc["kl_weight"], tc["ce_weight"], tc["kl_kind"],
                                                      tc["temperature"], tc["js_beta"])
                (loss * ctx.world / n_glob).backward()
            sums = [sums[0] + float(loss.detach()), sums[1] + float(kl), sums[2] + float(ce), sums[3] + int(b["input_ids"].numel())]
        gnorm = parallel.scalar(torch.nn.utils.clip_grad_norm_(trainable, tc["grad_clip"]))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tot = ctx.all_sum(sums)
        dt = time.time() - t0
        tokens_s = tot[3] / dt
        m = {"loss": tot[0] / n_glob, "kl": tot[1] / n_glob, "ce": tot[2] / n_glob, "lr": sched.get_last_lr()[0],
             "grad_norm": float(gnorm), "tokens_per_s": tokens_s, "step_seconds": dt}
        if peak:
            m["mfu"] = tokens_s * fpt / (peak * 1e12 * ctx.world)
        history.append({"step": step + 1, **m})
        if tracker and ((step + 1) % tc["log_every"] == 0 or step + 1 == tc["max_steps"]):
            tracker.log_metrics(m, step=step + 1)
        last = step + 1 == tc["max_steps"]
        if tc["eval_every"] and (step + 1) % tc["eval_every"] == 0 and not last and heldout is not None:
            core.eval()
            ev = heldout_metrics(core, teacher, heldout, tc["eval_rows"], mb, dev, autocast, tc)
            core.train()
            if tracker:
                tracker.log_metrics(ev, step=step + 1)
        local = None
        if (step + 1) % tc["checkpoint_every"] == 0 or last:
            msd = parallel.full_model_state(core, strategy, world)  # collectives: every rank joins
            osd = parallel.full_optimizer_state(core, opt, strategy, world)
            if ctx.rank == 0:
                local = Path(tempfile.mkdtemp(prefix="m1-ckpt-")) / "ckpt"
                ck.write_local(local, core, opt, sched, step + 1, (step + 1) * B,
                               {"fingerprint": lc["fingerprint"], "stage": lc["stage"], "first_eval": first_eval},
                               lc["model_dir"], model_state=msd, optimizer_state=osd)
            ctx.report(m, local, lc["checkpoint_root"], step + 1, tc["keep_checkpoints"])
            if local is not None:
                shutil.rmtree(local.parent, ignore_errors=True)
        elif ctx.ray:
            ctx.report(m, None, lc["checkpoint_root"], step + 1, tc["keep_checkpoints"])
        if ctx.rank == 0:
            print(f"[{lc['stage']}] step {step + 1}/{tc['max_steps']} loss {m['loss']:.4f} kl {m['kl']:.4f} "
                  f"ce {m['ce']:.4f} lr {m['lr']:.2e} {tokens_s:.0f} tok/s", flush=True)
        if step + 1 == fail_after:
            raise RuntimeError(f"M1_FAIL_AFTER_STEP={fail_after}: injected failure after step {step + 1}")

    final = {}
    if heldout is not None:
        core.eval()
        final = heldout_metrics(core, teacher, heldout, tc["eval_rows"], mb, dev, autocast, tc)
        if tracker:
            tracker.log_metrics(final, step=tc["max_steps"])
    final_state = parallel.full_model_state(core, strategy, world)
    if ctx.rank == 0:
        out = Path(lc["out_dir"])
        (out / "history.jsonl").open("a").writelines(json.dumps(h) + "\n" for h in history)
        summary = {"steps": tc["max_steps"], "resumed_from": start, **(history[-1] if history else {}),
                   **{k: v for k, v in final.items()}}
        if first_eval:
            summary.update({f"{k}_before": v for k, v in first_eval.items()})
        ck.publish_model(core, out, lc["model_dir"], state_dict=final_state)
        (out / "train_metrics.json").write_text(json.dumps(summary, indent=2))
        return summary
    return {}
