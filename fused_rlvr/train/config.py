"""The trainer's one config dataclass, its named presets, and the command line generated from it.

Every field carries its help text and (where it has one) its allowed range, so `fused-rlvr train --help`,
the config-file loader and the validation all read the same table. Precedence: preset < --config file <
command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from fused_rlvr.advantages import ESTIMATORS, SCALES, STEER_MODES
from fused_rlvr.grpo import AGGREGATIONS, IMPORTANCE, KL_ESTIMATORS, POLICY_LOSSES


class ConfigError(ValueError):
    """A config value of the wrong type or out of range, or an input / output file the run cannot use; the
    command line prints it as one line."""


def _f(default, help: str, *, choices=None, lo=None, hi=None, lo_open=False):
    return field(
        default=default, metadata={"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}
    )


@dataclass
class TrainConfig:
    # --- model and data
    model: str = _f(
        "smollm2",
        "'smollm2' (the embedded SmolLM2-135M-Instruct GGUF, no download), "
        "'tiny-random' (a randomly initialised toy model for tests), or any Hugging Face causal "
        "LM name / local path",
    )
    task: str = _f(
        "arithmetic",
        "'arithmetic' (built-in generated problems with a fixed held-out set) or a "
        "path to a JSONL file with 'prompt' and 'answer' fields",
    )
    eval_task: Optional[str] = _f(
        None, "JSONL file of held-out problems (default: the task's own held-out split)"
    )
    n_eval: int = _f(200, "held-out problems evaluated before and after training", lo=0)
    system_prompt: Optional[str] = _f(
        None, "system message for chat-template models (None: the template's own default)"
    )
    prompt_suffix: str = _f(" Answer with only the final number.", "text appended to every question")
    # --- rollouts
    steps: int = _f(20, "training steps (one rollout batch each)", lo=1)
    prompts_per_step: int = _f(8, "distinct prompts sampled per step", lo=1)
    group_size: int = _f(8, "rollouts per prompt before any extra rollouts (G)", lo=1)
    max_new_tokens: int = _f(12, "longest response, in tokens", lo=1)
    temperature: float = _f(
        1.0, "sampling temperature; the losses score the same tempered distribution", lo=0.0, lo_open=True
    )
    top_p: float = _f(
        1.0,
        "nucleus sampling (1.0: off; the loss assumes the full distribution)",
        lo=0.0,
        hi=1.0,
        lo_open=True,
    )
    gen_batch: int = _f(64, "sequences generated at once", lo=1)
    # --- algorithm
    algorithm: str = _f("grpo", "policy loss (fused_rlvr.train.algorithms)", choices=("grpo", "pacs"))
    advantage: str = _f(
        "grpo", "advantage estimator (grpo: R - mean; rloo: leave-one-out)", choices=ESTIMATORS
    )
    adv_scale: str = _f(
        "group",
        "divide advantages by the group std ('group'), the batch std, or not ('none': Dr. GRPO / DARS)",
        choices=SCALES,
    )
    drop_uniform_groups: bool = _f(False, "drop groups whose rewards are all equal (no signal; DAPO / DARS)")
    loss_agg: str = _f(
        "token-mean",
        "loss aggregation (fused_rlvr.linear_grpo_loss's agg)",
        choices=AGGREGATIONS,
    )
    policy_loss: str = _f(
        "ppo",
        "policy-gradient term: 'ppo' (clipped surrogate), 'cispo' (clipped IS weight times log-prob, "
        "cap cispo_cap) or 'sapo' (soft gate, temperatures sapo_tau_pos / sapo_tau_neg)",
        choices=POLICY_LOSSES,
    )
    cispo_cap: float = _f(
        5.0, "cispo: cap on the detached importance ratio, sg(min(r, cap))", lo=0.0, lo_open=True
    )
    sapo_tau_pos: float = _f(1.0, "sapo: gate temperature where the advantage is > 0", lo=0.0, lo_open=True)
    sapo_tau_neg: float = _f(1.05, "sapo: gate temperature where the advantage is <= 0", lo=0.0, lo_open=True)
    eps_low: float = _f(0.2, "lower clip range of the ratio", lo=0.0, hi=1.0, lo_open=True)
    eps_high: float = _f(0.28, "upper clip range of the ratio (clip-higher)", lo=0.0, hi=1.0, lo_open=True)
    dual_clip: Optional[float] = _f(
        None, "dual-clip constant c > 1 for negative advantages (None: off)", lo=1.0, lo_open=True
    )
    importance: str = _f(
        "token", "importance ratio per token (GRPO) or per sequence (GSPO)", choices=IMPORTANCE
    )
    beta: float = _f(0.0, "KL penalty weight against the initial (reference) policy", lo=0.0)
    kl: str = _f("k3", "KL estimator", choices=KL_ESTIMATORS)
    entropy_coef: float = _f(0.0, "entropy bonus weight", lo=0.0)
    steer: Optional[str] = _f(
        None, "STEER per-token reweighting mode (None: off)", choices=(None, *STEER_MODES)
    )
    steer_lambda_min: float = _f(0.5, "STEER lower weight bound", lo=0.0)
    pacs_beta: float = _f(1.0, "PACS score scale beta", lo=0.0, lo_open=True)
    dars: Optional[str] = _f(
        None,
        "DARS extra rollouts for hard prompts: equal treatment ('et') or "
        "hardness weighted ('hw') (None: off)",
        choices=(None, "et", "hw"),
    )
    # --- seed-paper methods (fused_rlvr.train.hooks)
    reward: str = _f(
        "verifier",
        "reward: the task's verifier (0/1), or RLPR's verifier-free reward (the policy's mean probability "
        "of the reference answer spliced in place of the generated one, minus the initial policy's "
        "no-reasoning score, mixed with a format reward)",
        choices=("verifier", "rlpr"),
    )
    rlpr_weight: float = _f(
        0.9, "RLPR: weight w of the probability reward; 1 - w goes to the format reward", lo=0.0, hi=1.0
    )
    rlpr_std_filter: bool = _f(
        False, "RLPR reward-std filter: drop prompts whose reward std < beta * EMA(mean std) (any reward)"
    )
    rlpr_std_beta: float = _f(0.5, "RLPR std filter: beta (authors: 0.5 for Qwen)", lo=0.0, lo_open=True)
    rlpr_std_ema: float = _f(0.99, "RLPR std filter: EMA ratio of the mean std", lo=0.0, hi=0.9999)
    refill_rounds: int = _f(
        0,
        "rounds of new prompts sampled to refill the batch after group filtering (drop_uniform_groups, "
        "the std filter)",
        lo=0,
    )
    rank_shaping: bool = _f(
        False,
        "VERL: shape advantages with the effective rank (ER, ERV, ERA) of each response's final hidden "
        "states against moving means",
    )
    guidance: Optional[str] = _f(
        None,
        "Agent-RLVR guidance for prompts whose samples all failed: re-prompt with the verifier's feedback "
        "and a plan hint; 'grpo': the guided samples join the group, scored under the unguided prompt; "
        "'dpo': they feed a DPO loss (guided successes vs failures) instead (None: off)",
        choices=(None, "grpo", "dpo"),
    )
    guidance_samples: int = _f(4, "guided samples per failed prompt", lo=1)
    guidance_hint: bool = _f(
        True,
        "guidance: put a plan hint (built-in arithmetic task: a decomposition that leaves the last step, "
        "never the answer) in the guided prompt; False: the verifier's feedback only",
    )
    dpo_beta: float = _f(0.1, "guidance='dpo': DPO beta", lo=0.0, lo_open=True)
    dpo_coef: float = _f(1.0, "guidance='dpo': weight of the DPO loss added to the policy loss", lo=0.0)
    # --- optimisation
    lr: float = _f(2e-5, "AdamW learning rate", lo=0.0, lo_open=True)
    weight_decay: float = _f(0.0, "AdamW weight decay", lo=0.0)
    warmup_steps: int = _f(
        0, "linear learning-rate warm-up, in optimizer steps (epochs x minibatches per training step)", lo=0
    )
    grad_clip: float = _f(1.0, "gradient-norm clip (0: off)", lo=0.0)
    max_bad_updates: int = _f(
        3,
        "an optimizer update whose loss or gradient norm is not finite is skipped (optimizer state "
        "untouched); this many in a row stop the run with an error",
        lo=1,
    )
    epochs: int = _f(1, "passes over each rollout batch (DARS-B: 2)", lo=1)
    minibatches: int = _f(1, "optimizer steps per epoch (1: one full-batch update per epoch)", lo=1)
    micro_batch: int = _f(
        16,
        "sequences per forward/backward (gradients accumulate with the whole-batch "
        "normaliser, so the update does not depend on it)",
        lo=1,
    )
    train_layers: int = _f(
        0,
        "train only the top N transformer layers and the final norm (0: all "
        "parameters); the lower layers run without autograd",
        lo=0,
    )
    train_lm_head: bool = _f(
        True, "train the lm-head (with tied embeddings: the embedding matrix) when train_layers is 0"
    )
    # --- runtime
    seed: int = _f(0, "seed for data order, sampling and initialisation")
    device: str = _f("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    dtype: str = _f(
        "auto",
        "'auto' (bf16 on CUDA, fp32 on CPU), 'float32' or 'bfloat16'",
        choices=("auto", "float32", "bfloat16"),
    )
    threads: int = _f(
        0,
        "CPU threads for torch (0: automatic: OMP_NUM_THREADS, else the physical cores this process may use)",
        lo=0,
    )
    backend: str = _f(
        "auto",
        "fused-op backend (auto: Triton on CUDA, chunked torch on CPU)",
        choices=("auto", "triton", "torch"),
    )
    fsdp: bool = _f(
        False,
        "shard the model with FSDP2 (fully_shard) over the processes of `torchrun --nproc_per_node N`, "
        "each rolling out prompts_per_step / N prompts; sharded checkpoints (torch.distributed.checkpoint). "
        "On by itself when WORLD_SIZE > 1",
    )
    out_dir: str = _f("runs/default", "output folder: metrics, plots, checkpoints, summary")
    eval_every: int = _f(0, "held-out evaluation every k steps (0: only before and after)", lo=0)
    save_every: int = _f(10, "checkpoint every k steps (0: only at the end and on SIGINT/SIGTERM)", lo=0)
    keep_checkpoints: int = _f(2, "checkpoints kept on disk", lo=1)
    resume: bool = _f(False, "continue from the latest checkpoint in out_dir")
    progress: bool = _f(True, "show progress bars (held-out evaluations, training steps)")
    log_samples: int = _f(2, "responses printed to samples.jsonl per step", lo=0)

    def validate(self) -> TrainConfig:
        """Check every field's type (`field_type_error`; an int given for a float field becomes a float),
        allowed values and range, then the rules between fields; a ConfigError names the field."""
        for f in fields(self):
            v = getattr(self, f.name)
            err = field_type_error(f.name, v)
            if err:
                raise ConfigError(err)
            if _FIELD_TYPES[f.name][0] is float and isinstance(v, int):
                v = float(v)
                setattr(self, f.name, v)
            meta = f.metadata
            if meta.get("choices") is not None and v not in meta["choices"]:
                raise ConfigError(
                    f"config field '{f.name}' must be one of {list(meta['choices'])}, got {v!r}"
                )
            if v is None or isinstance(v, (str, bool)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config field '{f.name}' must be finite, got {v!r}")
            lo, hi = meta.get("lo"), meta.get("hi")
            if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
                op = ">" if meta.get("lo_open") else ">="
                raise ConfigError(f"config field '{f.name}' must be {op} {lo}, got {v!r}")
            if hi is not None and v > hi:
                raise ConfigError(f"config field '{f.name}' must be <= {hi}, got {v!r}")
        if self.algorithm == "pacs" and (
            self.steer or self.beta or self.entropy_coef or self.policy_loss != "ppo"
        ):
            raise ConfigError(
                "config fields 'steer', 'beta', 'entropy_coef' and 'policy_loss' apply to "
                "algorithm='grpo' only; PACS has its own loss"
            )
        if self.policy_loss != "ppo" and self.dual_clip is not None:
            raise ConfigError(
                "config field 'dual_clip' applies to policy_loss='ppo' only, "
                f"got policy_loss={self.policy_loss!r}"
            )
        if self.algorithm == "pacs" and (self.rank_shaping or self.guidance == "dpo"):
            raise ConfigError(
                "config fields 'rank_shaping' and guidance='dpo' apply to algorithm='grpo' only; "
                "PACS does not use advantages"
            )
        if self.rlpr_std_filter and self.group_size < 2:
            raise ConfigError("config field 'group_size' must be >= 2 with rlpr_std_filter (a reward std)")
        if self.advantage == "rloo" and self.group_size < 2:
            raise ConfigError("config field 'group_size' must be >= 2 with advantage='rloo'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, tuple[type, bool]]:
    """field name -> (its type: bool, int, float or str; whether None is allowed)."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) is typing.Union and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        if base not in (bool, int, float, str):
            raise TypeError(f"TrainConfig field {name!r} has type {hint}; fields are bool, int, float or str")
        out[name] = (base, optional)
    return out


_FIELD_TYPES = _field_types()
_TYPE_WORDS = {bool: "a bool (true or false)", int: "an integer", float: "a number", str: "a string"}


def field_type_error(name: str, value: Any) -> Optional[str]:
    """None when `value` has the type of TrainConfig field `name`, else the error message: a bool is not an
    int, an int is a float, None only for Optional fields."""
    base, optional = _FIELD_TYPES[name]
    if value is None:
        ok = optional
    elif base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if ok:
        return None
    want = _TYPE_WORDS[base] + (" or null / None" if optional else "")
    return f"config field '{name}' must be {want}, got {value!r} ({type(value).__name__})"


def ensure_out_dir(path: str) -> None:
    """Create the output folder `path` (and its parents) and check that files can be written there; a
    ConfigError names the folder otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"config field 'out_dir': cannot write to the folder {path!r}: {e.strerror or e}"
        ) from None


# Fields whose change makes a checkpoint mean something else: resuming with a different value is refused.
COMPATIBILITY_FIELDS = (
    "model",
    "task",
    "algorithm",
    "train_layers",
    "train_lm_head",
    "seed",
    "prompts_per_step",
    "group_size",
    "epochs",
    "minibatches",
    "dars",
    "dtype",
    "reward",
    "rlpr_std_filter",
    "rank_shaping",
    "guidance",
)


def check_compatible(saved: dict[str, Any], cfg: TrainConfig, folder: str) -> None:
    """Refuse to resume from a checkpoint whose config differs in a COMPATIBILITY_FIELDS field; a field the
    checkpoint predates counts as its default."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    diff = [
        f"{k}: checkpoint {saved.get(k, defaults[k])!r} vs config {getattr(cfg, k)!r}"
        for k in COMPATIBILITY_FIELDS
        if saved.get(k, defaults[k]) != getattr(cfg, k)
    ]
    if diff:
        raise ConfigError(
            f"cannot resume from {folder}: it was written with an incompatible config ({'; '.join(diff)})"
        )


PRESETS: dict[str, dict[str, Any]] = {
    # The README's `make train`: SmolLM2-135M on 2 CPU cores in under 15 minutes.
    "default": {},
    "cpu-quick": {"steps": 3, "n_eval": 32, "prompts_per_step": 4, "out_dir": "runs/cpu-quick"},
    # A toy run for smoke tests: random weights, no download, seconds per step.
    "tiny": {
        "model": "tiny-random",
        "steps": 4,
        "n_eval": 16,
        "prompts_per_step": 4,
        "group_size": 4,
        "max_new_tokens": 6,
        "lr": 1e-3,
        "out_dir": "runs/tiny",
        "progress": False,
    },
    "steer": {"steer": "exp", "out_dir": "runs/steer"},
    "pacs": {"algorithm": "pacs", "adv_scale": "none", "out_dir": "runs/pacs"},
    "dars": {"dars": "et", "adv_scale": "none", "drop_uniform_groups": True, "out_dir": "runs/dars"},
    # DARS-B breadth: one full-batch update per epoch, two epochs, loss sum m l / L_max.
    "dars-b": {
        "dars": "et",
        "adv_scale": "none",
        "drop_uniform_groups": True,
        "epochs": 2,
        "minibatches": 1,
        "loss_agg": "seq-mean-token-sum-norm",
        "entropy_coef": 0.001,
        "eps_high": 0.2,
        "out_dir": "runs/dars-b",
    },
    # RLPR: verifier-free probability reward with the reward-std filter, refilling dropped prompts.
    "rlpr": {"reward": "rlpr", "rlpr_std_filter": True, "refill_rounds": 2, "out_dir": "runs/rlpr"},
    # VERL: advantages shaped by the effective rank of the responses' final hidden states.
    "verl": {"rank_shaping": True, "out_dir": "runs/verl"},
    # Agent-RLVR: guided re-attempts of failed prompts join their groups (guidance='dpo' for the DPO form).
    "guidance": {"guidance": "grpo", "out_dir": "runs/guidance"},
    # GPU-sized GRPO (DAPO-style loss) for an HF model given with --model.
    "gpu": {
        "device": "cuda",
        "prompts_per_step": 64,
        "group_size": 16,
        "max_new_tokens": 512,
        "gen_batch": 512,
        "micro_batch": 32,
        "lr": 1e-6,
        "loss_agg": "dapo",
        "steps": 200,
        "eval_every": 20,
        "save_every": 20,
        "out_dir": "runs/gpu",
    },
}


def _parse_value(f: dataclasses.Field, text: str):
    base, optional = _FIELD_TYPES[f.name]
    if text.lower() in ("none", "null") and optional:
        return None
    if base is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config field '{f.name}' must be true or false, got {text!r}")
    try:
        if base is int:
            return int(text)
        if base is float:
            return float(text)
    except ValueError:
        kind = base.__name__ + (" or none" if optional else "")
        raise ConfigError(f"config field '{f.name}' must be a number ({kind}), got {text!r}") from None
    return text


def load_config_file(path: str) -> dict[str, Any]:
    """A JSON object of field -> value (unknown fields are an error naming them); a file that is missing,
    unreadable, not UTF-8 or not JSON is a one-line error naming it."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"config file {path!r} is not UTF-8 text: line {line}: {e.reason}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path!r} is not valid JSON: line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a JSON object of field: value")
    return data


def make_config(preset: str = "default", overrides: Optional[dict[str, Any]] = None) -> TrainConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    values.update(overrides or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
    return TrainConfig(**values).validate()


def build_parser(prog: str = "fused-rlvr train") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,  # `--save 1` is an error, not --save-every
        description="RLVR training with fused lm-head losses "
        "(GRPO / PACS / STEER / DARS) on the embedded SmolLM2 or any HF causal LM.",
    )
    ap.add_argument(
        "--preset", default="default", choices=sorted(PRESETS), help="named preset (default: %(default)s)"
    )
    ap.add_argument("--config", default=None, help="JSON file of field: value, applied over the preset")
    for f in fields(TrainConfig):
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        extra = f" (choices: {', '.join(map(str, meta['choices']))})" if meta.get("choices") else ""
        is_bool = isinstance(f.default, bool)
        ap.add_argument(
            flag,
            dest=f.name,
            default=None,
            metavar="BOOL" if is_bool else "V",
            nargs="?" if is_bool else None,
            const="true" if is_bool else None,
            help=f"{meta['help']}{extra} [default: {f.default!r}]",
        )
    return ap


def config_from_args(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.config:
        overrides.update(load_config_file(args.config))
    by_name = {f.name: f for f in fields(TrainConfig)}
    for name, f in by_name.items():
        text = getattr(args, name)
        if text is not None:
            overrides[name] = _parse_value(f, text)
    return make_config(args.preset, overrides)
