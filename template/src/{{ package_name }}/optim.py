"""Optimizer and learning-rate schedule from the config."""

import logging

import torch
from omegaconf import DictConfig
from transformers import get_scheduler

from .config import ConfigError, OptimizerConfig, OptimizerName, SchedulerName
from .errors import warn

logger = logging.getLogger(__name__)

# The settings of OptimizerConfig that only some optimizers read (lr and weight_decay: all of them).
READ_BY = {
    "momentum": (OptimizerName.sgd,),
    **dict.fromkeys(["beta1", "beta2", "eps"], (OptimizerName.adamw, OptimizerName.adam)),
}


def unread_settings(name: OptimizerName) -> list:
    """The optimizer.* keys that optimizer.name=`name` does not read: a value given to one of them changes nothing."""
    return [key for key, readers in READ_BY.items() if name not in readers]


def build_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    defaults = OptimizerConfig()
    for key in unread_settings(cfg.name):
        if cfg[key] != getattr(defaults, key):  # set on purpose (the schema's default is nobody's choice)
            readers = " or ".join(name.value for name in READ_BY[key])
            warn(
                logger,
                f"optimizer.{key}={cfg[key]} does nothing with optimizer.name={cfg.name.value}: only {readers} reads "
                f"it (optimizer={READ_BY[key][0].value} to use it)",
            )
    if not any(parameter.requires_grad for parameter in model.parameters()):  # torch's own words name no model
        raise ConfigError(
            f"the model ({type(model).__name__}) has no trainable parameters (none, or all with requires_grad=False): "
            "there is nothing to train; unfreeze some"
        )
    # No weight decay on biases and norm weights (the usual transformers recipe).
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == OptimizerName.sgd:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    optimizer_class = {OptimizerName.adamw: torch.optim.AdamW, OptimizerName.adam: torch.optim.Adam}[cfg.name]
    return optimizer_class(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    """A schedule over optimizer steps (the loop steps it once per optimizer step)."""
    if cfg.warmup_steps >= max_steps and cfg.name != SchedulerName.constant:  # a short run under a task's warmup, say
        warn(
            logger,
            f"scheduler.warmup_steps={cfg.warmup_steps} is not below trainer.max_steps={max_steps}: the learning rate "
            "never reaches optimizer.lr (lower scheduler.warmup_steps, or scheduler=constant)",
        )
    return get_scheduler(cfg.name.value, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps)


def keep_configured_settings(optimizer, scheduler, configured: dict) -> None:
    """After a resume, the config's optimizer settings over the checkpoint's (`configured`: the optimizer's
    state_dict before the checkpoint loaded). A checkpoint brings its run's param groups (lr, weight decay, betas,
    momentum, ...) and the schedule's base learning rates, which silently undid a change that resume_allow accepted
    (optimizer.lr=1e-4 to go on more slowly, say); settings that did not change are set to what they were. Another
    kind of optimizer (sgd after adamw) starts from a state of its own: the saved one is of no use to it."""
    saved = optimizer.state_dict()["param_groups"]
    if [sorted(group) for group in saved] != [sorted(group) for group in configured["param_groups"]]:
        optimizer.load_state_dict(configured)
    for group, settings in zip(optimizer.param_groups, configured["param_groups"]):
        group.update({key: value for key, value in settings.items() if key not in ("params", "lr")})
    schedule = getattr(scheduler, "scheduler", scheduler)  # the LambdaLR inside Accelerate's wrapper
    schedule.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base_lr, factor in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base_lr * factor(schedule.last_epoch)  # what the schedule gives at this step
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
