"""The thin RLVR trainer: one loop, in phases, over the fused losses.

    sample prompts -> rollouts -> verify -> extra rollouts (hooks) -> rewards (hooks) -> group filters
    (refilled with new prompts) -> advantages -> old / reference log-probs -> update (epochs x minibatches x
    micro-batches) -> log / eval / checkpoint

Every log-prob (policy, old, reference, hook scoring) comes from the fused op on the model's last hidden
states and lm-head weight (`fused_rlvr.integrations.hf`): no [tokens x vocab] logits exist in training or
scoring. Generation uses the model's own `generate` (it needs next-token logits of the last position only).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch

from fused_rlvr.advantages import SteerConfig, group_advantages
from fused_rlvr.grpo import linear_grpo_loss, loss_divisor
from fused_rlvr.integrations.hf import last_hidden_states, lm_head, sequence_token_stats
from fused_rlvr.pacs import linear_pacs_loss
from fused_rlvr.train import checkpoint
from fused_rlvr.train.checkpoint import Checkpointer, capture_rng, restore_rng
from fused_rlvr.train.config import TrainConfig, check_compatible, ensure_out_dir
from fused_rlvr.train.hooks import DarsHook, Hook, RolloutRequest
from fused_rlvr.train.methods import build_hooks
from fused_rlvr.train.metrics import MetricsLog, plot
from fused_rlvr.train.models import load_causal_lm
from fused_rlvr.train.rollout import RolloutBatch, format_prompt, generate
from fused_rlvr.train.tasks import Problem, Verifier, make_task

_STAT_KEYS = (
    "loss",
    "pg_loss",
    "kl_loss",
    "clip_frac_low",
    "clip_frac_high",
    "clip_frac_dual",
    "approx_kl",
    "ref_kl",
    "mean_ratio",
    "mean_entropy",
    "steer_weight_mean",
)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config field 'device' is 'cuda' but no CUDA device is available")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Trainer:
    """Builds the model, task, optimizer and hooks from a TrainConfig; `train()` runs the loop."""

    def __init__(self, cfg: TrainConfig, hooks: Sequence[Hook] = ()):
        self.cfg = cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = _device(cfg.device)
        self.model, self.tok = load_causal_lm(
            cfg.model, device=str(self.device), dtype=_dtype(cfg.dtype, self.device), seed=cfg.seed
        )
        self.head = lm_head(self.model)  # refuses heads the fused op cannot express, naming the model class
        self.model.eval()  # no dropout in any RL forward: rollouts, scoring and the loss see one distribution
        self._set_trainable()
        self.ref_model = None
        if cfg.beta > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.task = make_task(cfg.task, cfg.n_eval, cfg.seed, cfg.eval_task)
        self.heldout = self.task.heldout()[: cfg.n_eval]
        self.verifier = Verifier()
        self.hooks: list[Hook] = list(hooks) + ([DarsHook(cfg.dars)] if cfg.dars else [])
        self.hooks += build_hooks(self)  # RLPR, std filter, rank shaping, guidance, as the config asks
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warm + 1)) if warm else 1.0
        )
        self.data_rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.step = 0
        self.eval_before: Optional[dict[str, Any]] = None
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tok.pad_token_id
        self._prompts: dict[str, list[int]] = {}
        self._stop: Optional[str] = None

    # ------------------------------------------------------------------ set-up helpers
    def _set_trainable(self) -> None:
        cfg = self.cfg
        if cfg.train_layers == 0:
            self.model.requires_grad_(True)
            if not cfg.train_lm_head:
                self.head.weight.requires_grad_(False)
            return
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if layers is None:
            raise ValueError(
                f"config field 'train_layers' needs a model with .model.layers; "
                f"{type(self.model).__name__} has none (use train_layers=0)"
            )
        if cfg.train_layers > len(layers):
            raise ValueError(
                f"config field 'train_layers' must be <= {len(layers)} (the model's layers), "
                f"got {cfg.train_layers}"
            )
        self.model.requires_grad_(False)
        for layer in layers[-cfg.train_layers :]:
            layer.requires_grad_(True)
        norm = getattr(self.model.model, "norm", None)
        if norm is not None:
            norm.requires_grad_(True)

    def _eos_ids(self) -> list[int]:
        ids = {self.tok.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        return sorted(i for i in ids if i is not None)

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompts:
            self._prompts[question] = format_prompt(
                self.tok, question, self.cfg.prompt_suffix, self.cfg.system_prompt
            )
        return self._prompts[question]

    def _generate(self, prompts: list[list[int]], greedy: bool = False):
        c = self.cfg
        return generate(
            self.model,
            self.tok,
            prompts,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            greedy=greedy,
            batch_size=c.gen_batch,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
        )

    # ------------------------------------------------------------------ scoring (fused, no logits)
    @torch.no_grad()
    def score(
        self, batch: RolloutBatch, rows: Optional[torch.Tensor] = None, model=None, entropy: bool = False
    ) -> tuple[list[torch.Tensor], Optional[list[torch.Tensor]]]:
        """Per-sample response-token log-probs (and entropies) under `model` (default: the policy)."""
        model = self.model if model is None else model
        rows = torch.arange(len(batch)) if rows is None else rows
        lps, ents = [], []
        for s in range(0, len(rows), self.cfg.micro_batch):
            mb = rows[s : s + self.cfg.micro_batch]
            enc = batch.pack(mb, self.pad_id, self.device)
            st = sequence_token_stats(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                enc["response_mask"],
                temperature=self.cfg.temperature,
                return_entropy=entropy,
                backend=self.cfg.backend,
            )
            m = enc["response_mask"][:, 1:].bool()
            for j in range(len(mb)):
                lps.append(st.logprobs[j][m[j]].float().cpu())
                if entropy:
                    ents.append(st.entropy[j][m[j]].float().cpu())
        return lps, (ents if entropy else None)

    @staticmethod
    def _on_tokens(values: list[torch.Tensor], rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scatter per-sample response values into the [b, T-1] layout of a packed micro-batch."""
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        out[mask.bool()] = torch.cat([values[int(i)] for i in rows]).to(mask.device)
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, problems: Optional[list[Problem]] = None) -> dict[str, Any]:
        problems = self.heldout if problems is None else problems
        if not problems:
            return {
                "accuracy": float("nan"),
                "n": 0,
                "correct": [],
                "mean_length": float("nan"),
                "truncated": float("nan"),
                "examples": [],
            }
        ids, texts, truncated = self._generate([self.prompt_ids(p.question) for p in problems], greedy=True)
        correct = [self.verifier(t, p.answer) for t, p in zip(texts, problems)]
        return {
            "accuracy": sum(correct) / len(problems),
            "n": len(problems),
            "correct": correct,
            "mean_length": sum(len(i) for i in ids) / len(ids),
            "truncated": sum(truncated) / len(truncated),
            "examples": [
                {"question": p.question, "answer": p.answer, "response": t}
                for p, t in list(zip(problems, texts))[:5]
            ],
        }

    # ------------------------------------------------------------------ one step
    def _rollouts(self, problems: list[Problem]) -> RolloutBatch:
        g = self.cfg.group_size
        prompts = [self.prompt_ids(p.question) for p in problems]
        ids, texts, trunc = self._generate([p for p in prompts for _ in range(g)])
        batch = RolloutBatch(
            problems=problems,
            prompt_ids=prompts,
            group=torch.arange(len(problems)).repeat_interleave(g),
            response_ids=ids,
            texts=texts,
            truncated=torch.tensor(trunc, dtype=torch.bool),
            tags=["base"] * len(ids),
        )
        batch.rewards = self._verify(batch, range(len(batch)))
        return batch

    def _verify(self, batch: RolloutBatch, rows) -> torch.Tensor:
        return torch.tensor(
            [self.verifier(batch.texts[i], batch.problems[int(batch.group[i])].answer) for i in rows],
            dtype=torch.float32,
        )

    def _extra_rollouts(self, batch: RolloutBatch, requests: list[RolloutRequest]) -> None:
        prompts, groups, tags = [], [], []
        for r in requests:
            if not 0 <= r.group < batch.n_groups or r.n < 0:
                raise ValueError(
                    f"a hook asked for {r.n} rollouts in group {r.group}; the batch has "
                    f"{batch.n_groups} groups"
                )
            p = (
                batch.prompt_ids[r.group]
                if r.gen_prompt is None
                else format_prompt(self.tok, r.gen_prompt, "", self.cfg.system_prompt)
            )
            prompts += [p] * r.n
            groups += [r.group] * r.n
            tags += [r.tag] * r.n
        if not prompts:
            return
        n0 = len(batch)
        ids, texts, trunc = self._generate(prompts)
        batch.extend(groups, ids, texts, trunc, tags)
        batch.rewards = torch.cat([batch.rewards, self._verify(batch, range(n0, len(batch)))])

    def _hook_rollouts_and_rewards(self, batch: RolloutBatch) -> None:
        self._extra_rollouts(batch, [r for h in self.hooks for r in h.extra_rollouts(self, batch)])
        for h in self.hooks:
            batch.rewards = h.rewards(self, batch, batch.rewards)

    def _keep_groups(self, batch: RolloutBatch) -> torch.Tensor:
        """bool [n_groups]: not uniform (when drop_uniform_groups) and kept by every hook's keep_groups."""
        keep = torch.ones(batch.n_groups, dtype=torch.bool)
        if self.cfg.drop_uniform_groups:
            for g in range(batch.n_groups):
                keep[g] = batch.rewards[batch.group_rows(g)].unique().numel() > 1
        for h in self.hooks:
            k = h.keep_groups(self, batch)
            if k is None:
                continue
            k = torch.as_tensor(k, dtype=torch.bool).flatten().cpu()
            if k.numel() != batch.n_groups:
                raise ValueError(
                    f"hook {h.name!r}: keep_groups returned {k.numel()} values for {batch.n_groups} groups"
                )
            keep &= k
        return keep

    def _filter_groups(self, batch: RolloutBatch, rec: dict[str, Any]) -> RolloutBatch:
        c = self.cfg
        keep = self._keep_groups(batch)
        dropped, rounds = int((~keep).sum()), 0
        batch = batch.select_groups(keep)
        while batch.n_groups < c.prompts_per_step and rounds < c.refill_rounds:
            rounds += 1
            new = self._rollouts(self.task.sample(self.data_rng, c.prompts_per_step - batch.n_groups))
            self._hook_rollouts_and_rewards(new)
            keep = self._keep_groups(new)
            dropped += int((~keep).sum())
            batch = batch.concat(new.select_groups(keep))
        rec.update(groups_dropped=float(dropped), refill_rounds=float(rounds))
        return batch

    def _batch_counts(self, batch: RolloutBatch, rows: torch.Tensor) -> tuple[float, float]:
        """(response tokens, sequences) of the minibatch `rows`: what the whole-batch normalisers count (the
        FSDP trainer sums them over the ranks)."""
        return float(sum(len(batch.response_ids[int(i)]) for i in rows)), float(len(rows))

    def _divisor(self, batch: RolloutBatch, rows: torch.Tensor) -> float:
        tokens, seqs = self._batch_counts(batch, rows)
        if self.cfg.algorithm == "pacs":  # PACS averages over sequences
            return seqs
        return loss_divisor(self.cfg.loss_agg, tokens, seqs, self.cfg.max_new_tokens)

    def _micro_batches(self, batch: RolloutBatch, rows: torch.Tensor) -> list[torch.Tensor]:
        mb = self.cfg.micro_batch
        if self.cfg.algorithm != "pacs":
            return [rows[s : s + mb] for s in range(0, len(rows), mb)]
        # PACS baselines within a group: a micro-batch holds whole groups
        out, cur = [], []
        for g in sorted(set(batch.group[rows].tolist())):
            members = rows[batch.group[rows] == g].tolist()
            if cur and len(cur) + len(members) > mb:
                out.append(torch.tensor(cur))
                cur = []
            cur += members
        if cur:
            out.append(torch.tensor(cur))
        return out

    def _loss(self, batch, rows, adv, old, ref, divisor) -> tuple[torch.Tensor, dict[str, float], int]:
        c = self.cfg
        enc = batch.pack(rows, self.pad_id, self.device)
        hidden = last_hidden_states(self.model, enc["input_ids"], enc["attention_mask"])[:, :-1]
        targets = enc["input_ids"][:, 1:]
        mask = enc["response_mask"][:, 1:]
        old_t = None if old is None else self._on_tokens(old, rows, mask)
        head = self.head
        if hidden.dtype != head.weight.dtype:
            hidden = hidden.to(head.weight.dtype)
        if c.algorithm == "pacs":
            loss, st = linear_pacs_loss(
                hidden,
                head.weight,
                targets,
                batch.rewards[rows].to(self.device),
                mask,
                batch.group[rows].to(self.device),
                old_logprobs=old_t,
                beta=c.pacs_beta,
                baseline=c.advantage,
                temperature=c.temperature,
                bias=head.bias,
                softcap=head.softcap,
                backend=c.backend,
                normalizer=divisor,
            )
            return loss, {"loss": float(st.loss), "pacs_accuracy": float(st.accuracy)}, int(mask.sum())
        ref_t = None if ref is None else self._on_tokens(ref, rows, mask)
        steer = None if c.steer is None else SteerConfig(mode=c.steer, lambda_min=c.steer_lambda_min)
        loss, st = linear_grpo_loss(
            hidden,
            head.weight,
            targets,
            adv[rows].to(self.device),
            mask,
            old_logprobs=old_t,
            ref_logprobs=ref_t,
            beta=c.beta,
            kl=c.kl,
            eps_low=c.eps_low,
            eps_high=c.eps_high,
            dual_clip=c.dual_clip,
            importance=c.importance,
            agg=c.loss_agg,
            entropy_coef=c.entropy_coef,
            steer=steer,
            temperature=c.temperature,
            bias=head.bias,
            softcap=head.softcap,
            backend=c.backend,
            normalizer=divisor,
            max_len=c.max_new_tokens,
        )
        stats = {k: float(getattr(st, k)) for k in _STAT_KEYS}
        return loss, stats, int(st.n_tokens)

    def _minibatches(self, batch: RolloutBatch) -> list[torch.Tensor]:
        """Rows of each non-empty minibatch (one optimizer step each), shuffled when there are several; PACS
        splits by whole groups (its baselines are within a group)."""
        k = self.cfg.minibatches
        if self.cfg.algorithm != "pacs":
            order = torch.randperm(len(batch)) if k > 1 else torch.arange(len(batch))
            parts = list(order.tensor_split(k))
        else:
            groups = torch.randperm(batch.n_groups) if k > 1 else torch.arange(batch.n_groups)
            parts = [torch.nonzero(torch.isin(batch.group, gs)).flatten() for gs in groups.tensor_split(k)]
        return [rows for rows in parts if len(rows)]

    def _update(self, batch: RolloutBatch, adv: torch.Tensor, old, ref) -> dict[str, float]:
        c = self.cfg
        sums: dict[str, float] = {}
        tokens = 0
        grad_norms = []
        opt_steps = 0
        for _epoch in range(c.epochs):
            for rows in self._minibatches(batch):
                divisor = self._divisor(batch, rows)
                self.optimizer.zero_grad(set_to_none=True)
                for mb in self._micro_batches(batch, rows):
                    loss, stats, k = self._loss(batch, mb, adv, old, ref, divisor)
                    loss.backward()
                    tokens += k
                    for key, v in stats.items():
                        sums[key] = sums.get(key, 0.0) + v * (k if key != "loss" else 1.0)
                for h in self.hooks:
                    extra = h.extra_loss(self, batch)
                    if extra is not None:
                        extra.backward()
                if c.grad_clip > 0:
                    grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)))
                self.optimizer.step()
                self.scheduler.step()
                opt_steps += 1
        out = {k: v / max(tokens, 1) for k, v in sums.items() if k != "loss"}
        out["loss"] = sums.get("loss", 0.0) / max(opt_steps, 1)
        if grad_norms:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return out

    def train_step(self) -> dict[str, Any]:
        c = self.cfg
        t0 = time.time()
        # 1. sample prompts and 2. roll out G samples each, 3. verified by the task's checker
        problems = self.task.sample(self.data_rng, c.prompts_per_step)
        batch = self._rollouts(problems)
        rec: dict[str, Any] = {
            "reward_mean": float(batch.rewards.mean()),
            "reward_std": float(batch.rewards.std()) if len(batch) > 1 else 0.0,
            "response_length": float(batch.response_lengths().mean()),
            "truncated_frac": float(batch.truncated.float().mean()),
        }
        # 4. extra rollouts the hooks ask for (DARS depth, guidance) and 5. rewards from the hooks (RLPR)
        self._hook_rollouts_and_rewards(batch)
        # 6. group filters (drop_uniform_groups, hooks' keep_groups: RLPR's std filter); new prompts through
        #    phases 1-5 refill the dropped groups while refill rounds remain
        batch = self._filter_groups(batch, rec)
        rec.update(n_samples=len(batch), n_groups=batch.n_groups, time_rollout=time.time() - t0)
        if len(batch) == 0:
            rec["skipped"] = 1.0
            self._last_batch = None
            for h in self.hooks:
                rec.update(h.metrics())
            return rec
        # 7. advantages (group baseline), then the shaping hooks
        adv = group_advantages(batch.rewards, batch.group, estimator=c.advantage, scale=c.adv_scale)
        for h in self.hooks:
            adv = h.advantages(self, batch, adv)
        # 8. old (several updates per batch, or PACS) and reference (beta > 0) log-probs, no grad, fused
        t1 = time.time()
        old = ents = None
        if c.epochs * c.minibatches > 1 or c.algorithm == "pacs":
            old, ents = self.score(batch, entropy=True)
            rec["entropy"] = float(torch.cat(ents).mean())
        ref = self.score(batch, model=self.ref_model)[0] if self.ref_model is not None else None
        # 9. update: epochs x minibatches optimizer steps, micro-batches with the whole-batch normaliser
        # the model stays in eval mode for every RL forward (no dropout): the losses score the very
        # distribution the rollouts were sampled from
        stats = self._update(batch, adv, old, ref)
        if "mean_entropy" in stats and "entropy" not in rec:
            rec["entropy"] = stats["mean_entropy"]
        rec.update(stats)
        for h in self.hooks:
            rec.update(h.metrics())
        rec.update(
            lr=self.scheduler.get_last_lr()[0], time_update=time.time() - t1, time_step=time.time() - t0
        )
        self._last_batch = batch
        return rec

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.cfg.out_dir, "checkpoints")

    @property
    def checkpointer(self) -> Checkpointer:
        if getattr(self, "_checkpointer", None) is None:
            self._checkpointer = self._make_checkpointer()
        return self._checkpointer

    def _make_checkpointer(self) -> Checkpointer:
        return Checkpointer(self.ckpt_root, self.cfg.keep_checkpoints)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model": {
                n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad
            },
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(self.data_rng),
            "hooks": [h.state_dict() for h in self.hooks],
            "eval_before": self.eval_before,
        }

    def save(self) -> str:
        return self.checkpointer.save(self.step, self.state_dict())

    def load(self, folder: str) -> None:
        state, _ = self.checkpointer.load(folder)
        if state.get("format") == "dcp":
            raise ValueError(
                f"cannot resume from {folder}: it is a sharded FSDP2 checkpoint; resume it with --fsdp true "
                "(under torchrun with as many processes as wrote it)"
            )
        check_compatible(state["config"], self.cfg, folder)
        params = dict(self.model.named_parameters())
        names = {n for n, p in params.items() if p.requires_grad}
        if set(state["model"]) != names:
            raise ValueError(
                f"cannot resume from {folder}: its trainable parameters differ from this model's"
            )
        with torch.no_grad():
            for n, v in state["model"].items():
                params[n].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._restore_run_state(
            folder, state["config"], state["rng"], state["hooks"], state["step"], state["eval_before"]
        )

    def _restore_run_state(self, folder, saved_cfg, rng, hooks, step, eval_before) -> None:
        """What every trainer restores after its weights, optimizer and scheduler: the lr (a new --lr on
        resume is applied, not ignored), RNG states, data position, hook states, step."""
        if saved_cfg.get("lr") != self.cfg.lr:
            print(f"resume: lr {saved_cfg.get('lr')} -> {self.cfg.lr}", file=sys.stderr)
            self.scheduler.base_lrs = [self.cfg.lr for _ in self.scheduler.base_lrs]
            for g, f in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
                g["lr"] = self.cfg.lr * f(self.scheduler.last_epoch)
        restore_rng(self.data_rng, rng)
        if len(hooks) != len(self.hooks):
            raise ValueError(
                f"cannot resume from {folder}: it holds the state of {len(hooks)} hooks, "
                f"this run has {len(self.hooks)}"
            )
        for h, s in zip(self.hooks, hooks):
            h.load_state_dict(s)
        self.step = step
        self.eval_before = eval_before
        self._saved_step, self._saved_folder = step, folder

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT / SIGTERM: finish the current step, save a checkpoint, exit. A second signal aborts now."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        seen = []

        def handler(signum, frame):
            if seen:
                raise KeyboardInterrupt
            seen.append(signum)
            self._on_signal(signal.Signals(signum).name)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _on_signal(self, name: str) -> None:
        """The first SIGINT / SIGTERM: stop after the current step (the loop then saves)."""
        self._stop = name
        print(
            f"\n{name}: finishing step {self.step + 1}, then saving a checkpoint (signal again to abort "
            f"without saving)",
            file=sys.stderr,
            flush=True,
        )

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        c = self.cfg
        ensure_out_dir(c.out_dir)
        if not c.resume and self.checkpointer.has_checkpoints():
            raise ValueError(
                f"out_dir {c.out_dir!r} already holds a run with checkpoints; pass --resume to "
                f"continue it, or choose another --out-dir (nothing there is overwritten)"
            )
        self.checkpointer.prepare()
        if c.resume:
            folder = self.checkpointer.latest()
            if folder is None:
                print(f"resume: no checkpoint in {self.ckpt_root}, starting from step 0", file=sys.stderr)
            else:
                self.load(folder)
                print(f"resumed from {folder} (step {self.step})", file=sys.stderr)
        checkpoint.atomic_write_text(
            os.path.join(c.out_dir, "config.json"), json.dumps(c.to_dict(), indent=2)
        )
        log = MetricsLog(c.out_dir, resume_step=self.step)
        _truncate_samples(os.path.join(c.out_dir, "samples.jsonl"), self.step)
        t_start = time.time()
        if self.eval_before is None:
            ev = self.evaluate()
            self.eval_before = {k: v for k, v in ev.items() if k != "correct"}
            log.log({"step": 0, "eval_accuracy": ev["accuracy"], "eval_length": ev.get("mean_length")})
            print(
                f"held-out accuracy before training: {ev['accuracy']:.3f} ({ev['n']} problems)",
                file=sys.stderr,
            )
        bar = None
        if c.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        status = "finished"
        with self._signals():
            while self.step < c.steps:
                rec = self.train_step()
                self.step += 1
                rec = {"step": self.step, **rec}
                if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                    ev = self.evaluate()
                    rec.update(eval_accuracy=ev["accuracy"], eval_length=ev["mean_length"])
                log.log(rec)
                self._write_samples(rec["step"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{rec['reward_mean']:.2f}", ent=f"{rec.get('entropy', float('nan')):.2f}"
                    )
                if self._stop is not None:
                    status = f"interrupted ({self._stop})"
                    break
                if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                    self.save()
        if bar is not None:
            bar.close()
        # (a resumed run that had nothing left to do keeps its checkpoint as it is)
        unchanged = getattr(self, "_saved_step", None) == self.step
        ckpt = self._saved_folder if unchanged else self.save()
        summary: dict[str, Any] = {
            "status": status,
            "step": self.step,
            "checkpoint": ckpt,
            "train_seconds": time.time() - t_start,
            "model": c.model,
            "task": c.task,
            "algorithm": c.algorithm,
            "before": self.eval_before,
        }
        if status == "finished":
            ev = self.evaluate()
            log.records[-1].update(eval_accuracy=ev["accuracy"], eval_length=ev["mean_length"])
            checkpoint.atomic_write_text(log.path, "".join(json.dumps(r) + "\n" for r in log.records))
            summary["after"] = {k: v for k, v in ev.items() if k != "correct"}
            summary["gain_points"] = 100 * (ev["accuracy"] - self.eval_before["accuracy"])
        summary["total_seconds"] = time.time() - t_start
        log.write_csv()
        try:
            plot(
                log.records,
                os.path.join(c.out_dir, "training.png"),
                title=f"{c.model} / {c.task} / {c.algorithm}"
                + (f" + STEER {c.steer}" if c.steer else "")
                + (f" + DARS {c.dars}" if c.dars else ""),
            )
        except ImportError:
            print("matplotlib is not installed: no training.png", file=sys.stderr)
        checkpoint.atomic_write_text(os.path.join(c.out_dir, "summary.json"), json.dumps(summary, indent=2))
        return summary

    def _write_samples(self, step: int) -> None:
        batch = getattr(self, "_last_batch", None)
        if batch is None or not self.cfg.log_samples:
            return
        with open(os.path.join(self.cfg.out_dir, "samples.jsonl"), "a", encoding="utf-8") as fh:
            for i in range(min(self.cfg.log_samples, len(batch))):
                p = batch.problems[int(batch.group[i])]
                fh.write(
                    json.dumps(
                        {
                            "step": step,
                            "question": p.question,
                            "answer": p.answer,
                            "response": batch.texts[i],
                            "reward": float(batch.rewards[i]),
                        }
                    )
                    + "\n"
                )


def _truncate_samples(path: str, step: int) -> None:
    """Keep the samples of steps <= `step` (a resumed run rewrites the rest)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = [ln for ln in fh if ln.strip() and json.loads(ln).get("step", 0) <= step]
    checkpoint.atomic_write_text(path, "".join(lines))
