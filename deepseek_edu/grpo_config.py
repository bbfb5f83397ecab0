"""`GRPOConfig`: the settings of an R1-Zero-style run in miniature (notebook 10, `grpo.py`), with the
loss variants and tasks it accepts. Re-exported by `config.py`, where every config class is imported from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config_base import _check, _ConfigDict, _is_int, _is_real

GRPO_VARIANTS = ("grpo", "dr_grpo", "dapo")
GRPO_TASKS = ("addition", "arithmetic", "countdown")


@dataclass
class GRPOConfig(_ConfigDict):
    """An R1-Zero-style run in miniature: supervised warm-up, then GRPO (`grpo.py`).

    Defaults are the course's CPU run (notebook 10, ``python -m deepseek_edu grpo``). Paper values for
    comparison: DeepSeekMath §4.2 G = 64, beta = 0.04, one update per batch (it does not state its clip
    eps; 0.2 is PPO's usual value); R1-Zero G = 16, KL coefficient 0.001 (R1's Nature version); DAPO
    eps_low 0.2 / eps_high 0.28, no KL.
    """

    task: str = "addition"  # "addition" (2-digit a+b), "arithmetic" (+ and -) or "countdown"; tasks.py
    variant: str = "grpo"  # "grpo" (DeepSeekMath), "dr_grpo" (no length / std normalisation), "dapo"
    group_size: int = 8  # G: responses sampled per prompt
    prompts_per_step: int = 8  # prompts per batch; a batch holds prompts_per_step * G responses
    steps: int = 100  # GRPO batches (each sampled once from the policy of that moment)
    updates_per_batch: int = 2  # mu: optimizer steps on each batch (pi_old = the sampling policy)
    lr: float = 5e-5  # AdamW learning rate of the GRPO phase (after warmup, constant)
    warmup_steps: int = 5  # linear warmup of the GRPO learning rate (Adam's first steps are the noisiest)
    beta: float = 0.04  # KL coefficient against the frozen reference (the SFT model); 0 = no KL term
    clip_eps_low: float = 0.2  # ratio clipped below at 1 - clip_eps_low
    clip_eps_high: float = 0.2  # ratio clipped above at 1 + clip_eps_high (DAPO's clip-higher: 0.28)
    # Sampling temperature; the log-probs of the loss use the same one. Below R1's 1.0: from an annealed
    # SFT model, samples at 1.0 were right 4x less often than greedy answers (11% vs 40%) and GRPO lowered
    # greedy accuracy; 0.7 keeps samples near what greedy evaluation reads (notebook 10, section 5).
    temperature: float = 0.7
    max_new_tokens: int = 32  # response budget in tokens (also Dr. GRPO's constant normaliser)
    format_weight: float = 0.1  # reward = accuracy + format_weight * format
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    max_skipped_steps: int = 10  # stop with NonFiniteError after this many non-finite-gradient skips in a row
    eval_every: int = 20  # GRPO steps between held-out evaluations; 0 = only before and after
    n_eval: int = 200  # distinct held-out problems, answered greedily
    sft_steps: int = 300  # supervised steps on worked solutions before GRPO; 0 = none
    sft_lr: float = 3e-3  # peak learning rate of the supervised phase (warmup + cosine)
    # Steps the SFT cosine schedule is laid out over (values below sft_steps mean sft_steps). Larger stops
    # SFT part-way, before the learning rate anneals: a model partly right and still unsure, which GRPO
    # can improve (notebook 10).
    sft_schedule_steps: int = 400
    sft_batch_size: int = 32  # worked solutions per supervised step
    seed: int = 0  # seeds the model, the problems and the sampling
    threads: int = 0  # torch CPU threads; 0 = torch's default
    device: str = "cpu"  # "cpu" or "cuda"
    out_dir: str = "runs/grpo"  # where metrics.json goes

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        e: list[str] = []
        _check(e, self.task in GRPO_TASKS, f"task={self.task!r} must be one of {GRPO_TASKS}")
        _check(e, self.variant in GRPO_VARIANTS, f"variant={self.variant!r} must be one of {GRPO_VARIANTS}")
        for name in ("group_size", "prompts_per_step", "updates_per_batch", "max_new_tokens", "n_eval",
                     "sft_batch_size"):
            value = getattr(self, name)
            _check(e, _is_int(value) and value > 0, f"{name}={value!r} must be a positive integer")
        for name in ("steps", "warmup_steps", "eval_every", "sft_steps", "sft_schedule_steps", "threads", "seed"):
            value = getattr(self, name)
            _check(e, _is_int(value) and value >= 0, f"{name}={value!r} must be an integer >= 0")
        if _is_int(self.group_size):
            _check(e, self.group_size >= 2,
                   f"group_size={self.group_size} must be >= 2 (advantages compare responses of one prompt)")
        for name in ("lr", "sft_lr", "temperature"):
            value = getattr(self, name)
            _check(e, _is_real(value) and value > 0, f"{name}={value!r} must be a finite number > 0")
        for name in ("beta", "format_weight", "grad_clip"):
            value = getattr(self, name)
            _check(e, _is_real(value) and value >= 0, f"{name}={value!r} must be a finite number >= 0")
        _check(e, _is_real(self.clip_eps_low) and 0 < self.clip_eps_low < 1,
               f"clip_eps_low={self.clip_eps_low!r} must be in (0, 1) (the ratio is clipped at 1 - clip_eps_low > 0)")
        _check(e, _is_real(self.clip_eps_high) and self.clip_eps_high > 0,
               f"clip_eps_high={self.clip_eps_high!r} must be a finite number > 0")
        _check(e, _is_int(self.max_skipped_steps) and self.max_skipped_steps >= 1,
               f"max_skipped_steps={self.max_skipped_steps!r} must be an integer >= 1")
        _check(e, isinstance(self.out_dir, str), f"out_dir={self.out_dir!r} must be a string")
        _check(e, self.device in ("cpu", "cuda"), f"device={self.device!r} must be 'cpu' or 'cuda'")
        if e:
            raise ValueError("invalid GRPOConfig: " + "; ".join(e))

    @classmethod
    def for_variant(cls, variant: str, **changes: Any) -> GRPOConfig:
        """The config with each variant's paper settings: DAPO clips at (0.2, 0.28) and drops the KL
        term (beta 0); "grpo" and "dr_grpo" keep the defaults. `changes` override either."""
        preset: dict[str, Any] = {"dapo": {"clip_eps_high": 0.28, "beta": 0.0}}.get(variant, {})
        return cls(variant=variant, **{**preset, **changes})
