"""`train --help` in groups by concern, as timm's train.py prints its flags; the YAML recipes stay flat. Every
TrainConfig field is in exactly one group (a test checks, so a new option cannot go unlisted)."""

TRAIN_GROUPS = (
    ("data", "where the images come from and how they are read",
     ("data", "image_size", "resize_size", "interpolation", "exif", "workers", "data_backend", "in_memory",
      "shard_info", "shuffle_buffer", "skip_bad_shards")),
    ("model", "the network, the weights it starts from, what is trained",
     ("width_mult", "num_classes", "dropout", "drop_path", "pretrained", "filter_head", "freeze", "extend_classes")),
    ("schedule", "how long, and the learning rate over the run",
     ("epochs", "max_steps", "batch_size", "lr_init", "lr_max", "lr_end", "warmup_epochs", "lr_schedule",
      "decay_epochs", "decay_rate", "lr_scaling", "lr_reference_batch")),
    ("optimizer and loss", None,
     ("optimizer", "opt_eps", "momentum", "weight_decay", "weight_decay_on", "label_smoothing", "clip_grad_norm",
      "class_weights")),
    ("augmentation and regularisation", "crops and their size over the run, colour, mixing, sampling, EMA",
     ("train_crop_size", "progressive_resize", "progressive_ramp", "progressive_multiple", "min_scale",
      "color_jitter", "auto_augment", "random_erase", "random_erase_mode", "mixup_alpha", "cutmix_alpha", "mix_prob",
      "mix_switch_prob", "repeated_aug", "balanced_sampler", "ema", "ema_every", "ema_warmup")),
    ("distillation", "a teacher's logits as a second target",
     ("teacher", "teacher_arch", "distill_loss", "distill_temperature", "distill_weight", "task_loss_weight")),
    ("head-only", "the seed's way: the backbone's features once, then only the head trains",
     ("feature_cache", "feature_views", "feature_runtime")),
    ("runtime and precision", "device, precision, compilation, processes, seeding",
     ("device", "amp", "channels_last", "compile", "dist_timeout", "seed")),
    ("checkpoints and logging", "where the run writes, how often, what it evaluates",
     ("output", "resume", "save_every", "keep_max", "eval_every", "eval_tta", "tensorboard", "log_every")),
)


def group_of(field_name: str) -> str:
    for title, _description, names in TRAIN_GROUPS:
        if field_name in names:
            return title
    raise KeyError(f"TrainConfig field {field_name!r} is in no `train --help` group (cli/groups.py)")
